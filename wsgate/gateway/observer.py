"""What the core reports as it happens, and what it lets be read at any time.

The composition root (``wsgate.app``) hands the gateway an :class:`Observer`
(the Prometheus metrics, ``wsgate.metrics.GatewayMetrics``); the core calls it
and never imports it. Whoever scrapes reads the node through
:class:`NodeState`. Data flows one way: core -> observer; collector -> state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from wsgate.audit.records import AuditSink
    from wsgate.broker import Broker
    from wsgate.events import Event


class Observer(Protocol):
    """Called by the core as things happen; each call is cheap and never raises."""

    def rejected(self, rejections: Iterable[Mapping[str, str]]) -> None:
        """Topics refused in one reply (``rejection`` entries with their ``code``)."""

    def closed(self, code: int) -> None:
        """A connection ended with this close code."""

    def audit_waited(self, seconds: float) -> None:
        """A subscribe waited this long for its audit rows."""

    def delivered(self, events: Sequence[Event]) -> None:
        """Events reached this node from the broker and were fanned out."""

    def ingested(self, status: int, accepted: int, seconds: float) -> None:
        """An ingest request was answered with status, publishing ``accepted`` events."""


class NoObserver:
    """An observer that records nothing (a gateway built without metrics)."""

    def rejected(self, rejections: Iterable[Mapping[str, str]]) -> None:
        pass

    def closed(self, code: int) -> None:
        pass

    def audit_waited(self, seconds: float) -> None:
        pass

    def delivered(self, events: Sequence[Event]) -> None:
        pass

    def ingested(self, status: int, accepted: int, seconds: float) -> None:
        pass


class NodeState(Protocol):
    """What a scrape reads from a node, at scrape time (the hot path pays nothing)."""

    #: The audit sink and the broker, read through their own Protocols.
    audit: AuditSink
    broker: Broker
    @property
    def draining(self) -> bool:
        """True while shutting down."""

    def open_connections(self) -> int:
        """Open WebSocket connections."""

    def subscription_count(self) -> int:
        """Subscriptions held by open connections."""

    def counters(self) -> Mapping[str, int]:
        """Running totals: events_received, messages_delivered, slow_consumer_closes."""
