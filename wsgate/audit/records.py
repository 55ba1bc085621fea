"""What the gateway hands to the audit log, and the seam it writes through.

The gateway builds :class:`AuditRecord` values and gives them to an
:class:`AuditSink`; it never touches the database. The real sink is
``wsgate.audit.writer.AuditWriter``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

from wsgate.plugins import Principal

if TYPE_CHECKING:
    from wsgate.audit.witness import WitnessPublisher

SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
#: Non-subscription actions recorded on a connection (token renewal, expiry close...).
RENEW = "renew"
ACCEPTED = "accepted"
REJECTED = "rejected"


class AuditUnavailable(Exception):
    """The audit store cannot record now; a subscribe must be refused (fail closed)."""


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """The who and where of one WebSocket connection, shared by its rows."""

    connection_id: str
    principal: Principal
    authenticator: str
    remote_addr: str
    origin: str | None
    user_agent: str | None


class AuditRecord(NamedTuple):
    """One audit row before it is chained and stored (a named tuple: one is made
    for every topic of every subscribe, faster than a frozen dataclass).

    ``code`` is the reject code of a rejected row, the end reason (``client``,
    ``disconnect``, ``expired``...) of an accepted unsubscribe, and empty for
    an accepted subscribe.
    """

    occurred_at: datetime
    connection: ConnectionInfo
    action: str
    topic: str
    outcome: str
    code: str = ""


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One ingested event, recorded so `audit recipients` can answer who could see it."""

    event_id: str
    type: str
    topics: tuple[str, ...]
    ingest_key_id: str
    payload_sha256: str
    published_at: datetime


class AuditSink(Protocol):
    """How the gateway writes to the audit log.

    The database work happens off the event loop; these methods only hand it over
    and wait for it (or, for subscribes, are called back when it is done).
    """

    node_id: str

    async def start(self) -> None:
        """Open the store (running migrations), replay the journal and close the
        subscriptions a crash left open (code ``unclean_shutdown``)."""

    def submit_subscribes(self, records: Sequence[AuditRecord],
                          done: Callable[[Exception | None], None]) -> None:
        """Commit records (subscribe rows, accepted or rejected) durably, then call done.

        Rows arriving within a few ms share one transaction (group commit).
        ``done`` is called once, on the caller's event loop and never before this
        returns: with None once the records are committed, or with the
        :class:`AuditUnavailable` error when nothing was recorded. No coroutine per
        caller: the gateway's hot subscribe path makes one call per message.
        """

    async def write_ends(self, records: Sequence[AuditRecord]) -> None:
        """Record unsubscribe, disconnect and other rows that must never be lost.

        Never raises for a store failure: the rows go to the local journal
        and are written, in order and once, when the store is back.
        """

    async def write_events(self, events: Sequence[EventRecord]) -> None:
        """Record ingested events. Same failure rule as write_ends."""

    #: Where each signed checkpoint is copied outside the store, or None (for /metrics).
    witness: WitnessPublisher | None

    def healthy(self) -> bool:
        """True when the last write reached the store."""

    def queue_depth(self) -> int:
        """Rows waiting to be written (for /metrics)."""

    async def close(self) -> None:
        """Flush everything queued (database or journal), then release the store."""
