"""Resume after a reconnect: a subscribe with ``since`` (SPEC §2).

The reply says whether the gap is covered (``recovered``); the events the
broker's history still holds after ``since`` are sent first, in order, then
live events. Live events that arrive while history is read are held in a
:class:`ReplayBuffer` and sent after the replay, minus any it already sent:
no gap and no duplicate at the seam.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from wsgate import protocol
from wsgate.broker import Broker
from wsgate.events import Event
from wsgate.gateway.connection import Connection, Transport
from wsgate.gateway.delivery import may_receive
from wsgate.topics import Topic, matches

log = logging.getLogger("wsgate.gateway")


class ReplayBuffer:
    """Stands in for a connection's transport while its history is replayed.

    Control frames pass straight through; live event frames are held, each with
    the id of its event (``event_id()`` names the event being delivered), and
    sent by :meth:`flush` after the replay, skipping events the replay sent.
    """

    __slots__ = ("inner", "frames", "held", "event_id")

    def __init__(self, inner: Transport, event_id: Callable[[], str | None]) -> None:
        self.inner = inner
        self.event_id = event_id
        self.frames: list[tuple[str | None, bytes]] = []
        #: Bytes in frames (deliver asks after every frame: no re-summing).
        self.held = 0

    def send_text(self, text: str) -> None:
        self.inner.send_text(text)

    def send_wire(self, frame: bytes) -> int:
        self.frames.append((self.event_id(), frame))
        self.held += len(frame)
        return self.inner.pending_bytes() + self.held

    def pending_bytes(self) -> int:
        return self.inner.pending_bytes() + self.held

    def close(self, code: int, reason: str) -> None:
        self.inner.close(code, reason)

    def flush(self, skip: set[str]) -> None:
        """Send the held frames in order, except those of the events in skip."""
        for event_id, frame in self.frames:
            if event_id is not None and event_id in skip:
                continue
            self.inner.send_wire(frame)
        self.frames.clear()
        self.held = 0


def _matches_any(subscriptions: list[Topic], event: tuple[str, ...]) -> bool:
    return any(matches(t.segments, event) for t in subscriptions)


class Resume:
    """Replays history into a connection before its new subscriptions go live.

    Args:
        broker: whose history is read.
        add: indexes one subscription (Subscriptions.add).
        current_event_id: the id of the event being delivered (Delivery's).
    """

    def __init__(self, broker: Broker, add: Callable[[Connection, Topic], None],
                 current_event_id: Callable[[], str | None]) -> None:
        self.broker = broker
        self.add = add
        self.current_event_id = current_event_id

    async def resume(self, conn: Connection, msg: protocol.ClientMessage,
                     accepted: list[Topic], rejected: list[dict[str, str]],
                     new_topics: list[Topic], held: list[Topic], since: str) -> None:
        """Subscribe with ``since``: index, reply, replay what history holds, go live.

        ``held`` are the topics the connection held before this subscribe:
        events matching them went out live already and are not replayed.
        """
        buffer = ReplayBuffer(conn.transport, self.current_event_id)
        conn.transport = buffer
        sent: set[str] = set()
        try:
            for topic in new_topics:
                self.add(conn, topic)
            replay = (await self.history_after(new_topics, since, accepted)
                      if new_topics else None)
            if conn.closed:
                return
            buffer.inner.send_text(protocol.reply(msg, [t.text for t in accepted], rejected,
                                                  replay is not None))
            for event in replay or ():
                if event.audience is not None and not may_receive(conn, event.audience):
                    continue
                if any(_matches_any(held, t.segments) for t in event.topics):
                    continue
                for topic in event.topics:
                    if _matches_any(new_topics, topic.segments):
                        text = protocol.event_frame(protocol.event_frame_prefix(event.type),
                                                    topic.text, event.data_json,
                                                    protocol.event_frame_tail(
                                                        event.event_id, event.published_at))
                        buffer.inner.send_wire(protocol.ws_frame(text.encode()))
                        sent.add(event.event_id)
                        break
        finally:
            conn.transport = buffer.inner
        buffer.flush(skip=sent)

    async def history_after(self, topics: list[Topic], since: str,
                            accepted: list[Topic]) -> list[Event] | None:
        """Events after since in the scopes of topics, oldest first; None if a gap.

        Also None when the ``since`` event matches none of ``accepted`` (the
        topics this subscribe resumes): an id of an event the client could not
        see must not tell it whether that event is in the history, nor where.
        """
        merged: dict[str, Event] = {}
        for scope in dict.fromkeys(t.scope_key for t in topics):
            try:
                found = await self.broker.history_since(scope, since, with_since=True)
            except Exception:
                log.exception("history of %s could not be read", scope)
                return None
            if not found or found[0].event_id != since:
                return None
            if not any(_matches_any(accepted, t.segments) for t in found[0].topics):
                return None
            for event in found[1:]:
                merged.setdefault(event.event_id, event)
        return sorted(merged.values(), key=lambda e: e.published_at)
