"""Delivery: fan events out to the local connections whose subscriptions match.

The hot path of a node: each event's frame is built once per matched topic
and written as is; a connection gets an event at most once (SPEC §1); a
connection whose unsent output passes ``max_output_buffer`` is closed with
4008 after the delivery (it is never left silently missing events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from wsgate import errors, protocol
from wsgate.events import Event
from wsgate.gateway.connection import Connection
from wsgate.index import SubscriptionIndex

#: Closes a connection with a code and a reason (the facade's close_connection).
Close = Callable[[Connection, int, str], None]


def may_receive(conn: Connection, audience: str) -> bool:
    """Whether conn may get an event restricted to customer ``audience`` (scoped ingest key)."""
    principal = conn.info.principal
    return (principal.customer_id == audience
            or SUPER_ADMIN in principal.permissions)


SUPER_ADMIN = "project_super_admin"


class Delivery:
    """Fan-out over a subscription index.

    Args:
        index: the subscriptions of this node's connections.
        max_output_buffer: unsent bytes past which a connection is a slow consumer.
        close: how to close one.
    """

    def __init__(self, index: SubscriptionIndex[Connection], max_output_buffer: int,
                 close: Close) -> None:
        self.index = index
        self.max_output_buffer = max_output_buffer
        self.close = close
        #: Running totals (read by /metrics through the facade's counters()).
        self.stats: dict[str, int] = {
            "events_received": 0, "messages_delivered": 0, "slow_consumer_closes": 0,
        }
        #: The id of the event being written right now (a replay buffer standing in
        #: for a transport reads it, so held frames carry their event id).
        self.current_event_id: str | None = None

    def deliver(self, events: Sequence[Event]) -> None:
        """Send events to the local connections whose subscriptions match (broker callback).

        Each connection gets an event at most once, with the first of the
        event's topics that matched; events go out in the order given.
        """
        index_match = self.index.match
        max_buffer = self.max_output_buffer
        delivered = 0
        for event in events:
            mark = object()
            prefix: str | None = None
            tail = ""
            self.current_event_id = event.event_id
            audience = event.audience
            for topic in event.topics:
                matched = index_match(topic.segments)
                if not matched:
                    continue
                wire: bytes | None = None
                for conn in matched:
                    if conn.mark is mark:
                        continue
                    conn.mark = mark
                    if audience is not None and not may_receive(conn, audience):
                        continue
                    if wire is None:
                        if prefix is None:
                            prefix = protocol.event_frame_prefix(event.type)
                            tail = protocol.event_frame_tail(event.event_id, event.published_at)
                        text = protocol.event_frame(prefix, topic.text, event.data_json, tail)
                        wire = protocol.ws_frame(text.encode())
                    delivered += 1
                    # The pending bytes count frames queued by the transport but not
                    # yet written, so a burst cannot pass the limit unseen.
                    if conn.transport.send_wire(wire) > max_buffer and not conn.closed:
                        self._close_slow(conn)
        self.current_event_id = None
        stats = self.stats
        stats["events_received"] += len(events)
        stats["messages_delivered"] += delivered

    def _close_slow(self, conn: Connection) -> None:
        # Closing mutates the index being iterated: do it after this delivery.
        asyncio.get_running_loop().call_soon(
            self.close, conn, errors.CLOSE_SLOW_CONSUMER,
            "slow consumer: unsent output passed its limit")
