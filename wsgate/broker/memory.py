"""The one-process broker: publishing hands the events straight back to local
delivery, and keeps a bounded history per scope for resume."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence

from wsgate.broker import Deliver
from wsgate.config import HistoryConfig
from wsgate.events import Event
from wsgate.topics import Topic

#: One event as history keeps it: (monotonic publish time, event_id, type,
#: data_json, topic texts joined by spaces, published_at, audience). A flat
#: tuple of strings, a float and None, so CPython's collector stops tracking it
#: the first time it looks at it: history can hold a hundred thousand events
#: without each full collection walking them all (an Event, its Topics and
#: their tuples stay tracked as long as they live, and history keeps them for
#: minutes). A nested tuple would not do: one examined before its inner tuple
#: stays tracked. A valid topic has no space (SPEC §1).
Kept = tuple[float, str, str, str, str, str, str | None]


def _keep(now: float, event: Event) -> Kept:
    return (now, event.event_id, event.type, event.data_json,
            " ".join([t.text for t in event.topics]), event.published_at, event.audience)


def _revive(kept: Kept) -> Event:
    """The event again, as the publisher made it (its topics are concrete and valid)."""
    _, event_id, type_, data_json, texts, published_at, audience = kept
    topics = tuple([Topic(t, tuple(t.split(":"))) for t in texts.split(" ")])
    return Event(type_, data_json, topics, event_id, published_at, audience=audience)


class MemoryBroker:
    """Broker for a single node (``memory://``)."""

    def __init__(self, history: HistoryConfig) -> None:
        self._deliver: Deliver | None = None
        self._size = history.size
        self._ttl = history.ttl
        #: scope key -> events (see Kept), oldest first; the scope published to
        #: least recently first, so trimming stops at the first live one.
        self._history: OrderedDict[str, deque[Kept]] = OrderedDict()

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def publish(self, events: Sequence[Event]) -> None:
        if self._deliver is None:
            raise RuntimeError("broker not started")
        if self._size:
            self._remember(events)
        self._deliver(events)

    def _remember(self, events: Sequence[Event]) -> None:
        now = time.monotonic()
        history = self._history
        for event in events:
            entry = _keep(now, event)
            for scope in {t.scope_key for t in event.topics}:
                kept = history.get(scope)
                if kept is None:
                    kept = history[scope] = deque(maxlen=self._size)
                else:
                    history.move_to_end(scope)
                kept.append(entry)
        self._trim(now)

    def _trim(self, now: float) -> None:
        """Forget scopes whose newest event is past the age limit, so memory follows
        the live scopes. The cost is the number forgotten, not the number held."""
        horizon = now - self._ttl
        history = self._history
        while history:
            scope, kept = next(iter(history.items()))
            if kept[-1][0] >= horizon:
                break
            del history[scope]

    async def history_since(self, scope_key: str, event_id: str, *,
                            with_since: bool = False) -> list[Event] | None:
        kept = self._history.get(scope_key)
        if not kept:
            return None
        horizon = time.monotonic() - self._ttl
        while kept and kept[0][0] < horizon:
            kept.popleft()
        for position in range(len(kept) - 1, -1, -1):
            if kept[position][1] == event_id:
                start = position if with_since else position + 1
                return [_revive(entry) for entry in list(kept)[start:]]
        return None

    def history_size(self) -> int:
        """Events held in history (an event in two scopes counts twice)."""
        return sum(len(kept) for kept in self._history.values())

    def watch(self, scope_key: str) -> None:
        """Nothing to do: every event is local."""

    def unwatch(self, scope_key: str) -> None:
        """Nothing to do: every event is local."""

    async def ready(self, scope_keys: Iterable[str], timeout: float = 1.0) -> bool:
        """Always: every event is local."""
        return True

    def failure_counts(self) -> Mapping[str, int]:
        return {}  # nothing between publish and delivery can fail

    def healthy(self) -> bool:
        return self._deliver is not None

    async def close(self) -> None:
        self._deliver = None
