"""One open WebSocket as the core sees it, and what the core needs from it.

:class:`Transport` is the seam to the WebSocket layer (an adapter);
:class:`Connection` is the core's record of a connection: who, what it holds,
its limits' counters. Every room of the gateway works on these.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime
from typing import Protocol

from wsgate import errors
from wsgate.audit.records import AuditRecord, ConnectionInfo
from wsgate.plugins import Principal
from wsgate.topics import Topic


class Transport(Protocol):
    """What the gateway needs from a WebSocket connection."""

    def send_text(self, text: str) -> None:
        """Send one text message (control replies)."""

    def send_wire(self, frame: bytes) -> int:
        """Write an already framed WebSocket message (see protocol.ws_frame);
        returns ``pending_bytes()`` with the frame counted."""

    def pending_bytes(self) -> int:
        """What the connection holds in memory against its budget
        (``max_output_buffer``): bytes written but not yet sent to the peer, and,
        for the WebSocket layer, the peer's message not yet complete."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection with a close frame."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    """A time as the protocol writes it: RFC 3339, UTC, milliseconds; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class Connection:
    """One open WebSocket: who it is, what it holds, how to reach it."""

    __slots__ = ("id", "info", "transport", "subscriptions", "closed", "end_reason",
                 "mark", "bad_messages", "rejected_topics", "rate_tokens", "rate_at",
                 "expiry", "ended", "opened_at", "close_code")

    def __init__(self, info: ConnectionInfo, transport: Transport) -> None:
        self.id = info.connection_id
        self.info = info
        self.transport = transport
        #: topic text -> parsed topic, for every accepted subscription.
        self.subscriptions: dict[str, Topic] = {}
        self.closed = False
        #: The audit end reason of the subscriptions when the connection closes.
        self.end_reason = errors.END_DISCONNECT
        #: Last delivery this connection was given, for at-most-once per event.
        self.mark: object = None
        #: Recent bad messages and refused topics; each made on the first one (most
        #: connections have none).
        self.bad_messages: MinuteCount | None = None
        self.rejected_topics: MinuteCount | None = None
        self.rate_tokens = 0.0
        self.rate_at = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        #: Set once the end rows of the connection are written.
        self.ended: asyncio.Future[None] | None = None
        #: For the close log line: monotonic open time, and the close code once known.
        self.opened_at = time.monotonic()
        self.close_code: int | None = None

    @property
    def principal(self) -> Principal:
        return self.info.principal

    def record(self, action: str, topic: str, outcome: str, code: str = "",
               when: datetime | None = None) -> AuditRecord:
        """An audit row of this connection (now, unless ``when`` is given)."""
        return AuditRecord(when or utcnow(), self.info, action, topic, outcome, code)


class MinuteCount:
    """How many things a connection did in the last minute (a sliding window).

    ``add(n, now)`` records n at the monotonic time ``now`` and returns the
    total recorded over the 60 seconds up to ``now``.
    """

    __slots__ = ("_entries", "_total")

    def __init__(self) -> None:
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int, now: float) -> int:
        entries = self._entries
        entries.append((now, n))
        self._total += n
        horizon = now - 60.0
        while entries[0][0] <= horizon:
            self._total -= entries.popleft()[1]
        return self._total
