"""How events cross nodes. Local and clustered delivery share one path: the
gateway always publishes through the broker, and the broker hands events back
to the gateway's local delivery."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from wsgate.config import HistoryConfig
from wsgate.events import Event

#: Called by the broker with the events to deliver locally, in publish order.
Deliver = Callable[[Sequence[Event]], None]


class BrokerUnavailable(Exception):
    """Events cannot be published now (ingest answers 503 so the backend retries)."""


class Broker(Protocol):
    """The seam between the gateway and the event bus."""

    async def start(self, deliver: Deliver) -> None:
        """Connect, and from now on hand received events to deliver."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events to every node (this one included), in order.

        Raises:
            BrokerUnavailable: nothing was published.
        """

    def watch(self, scope_key: str) -> None:
        """This node has a subscriber in scope_key (``customer_id:<id>``): receive its events."""

    def unwatch(self, scope_key: str) -> None:
        """The last local subscriber of scope_key left."""

    async def ready(self, scope_keys: Iterable[str], timeout: float = 1.0) -> bool:
        """Return once events of the watched scope_keys published on any node reach
        this node (waiting at most timeout); True when they do."""

    async def history_since(self, scope_key: str, event_id: str, *,
                            with_since: bool = False) -> list[Event] | None:
        """The events of scope_key published after event_id, oldest first; with
        ``with_since``, the event event_id itself first (resume checks its topics).

        Publishing keeps a bounded history per scope (``[history] size`` and
        ``ttl``). Returns None when the history cannot cover the gap: the id
        is unknown to this scope's history, or older than what is kept.
        """

    def history_size(self) -> int:
        """Events this node holds in history (for /metrics)."""

    def failure_counts(self) -> Mapping[str, int]:
        """Failure totals for /metrics: ``publish_failures`` and ``connect_failures``
        for a broker that can fail (Redis); empty for one that cannot."""

    def healthy(self) -> bool:
        """True when events can be published and received."""

    async def close(self) -> None:
        """Stop receiving and release connections."""


def make_broker(url: str, history: HistoryConfig) -> Broker:
    """The broker for a ``[broker] url``."""
    if url == "memory://":
        from wsgate.broker.memory import MemoryBroker

        return MemoryBroker(history)
    from wsgate.broker.redis import RedisBroker

    return RedisBroker(url, history)
