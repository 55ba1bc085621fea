"""The one-process broker: publishing hands the events straight back to local
delivery, and keeps a bounded history per scope for resume."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence

from wsgate.broker import Deliver
from wsgate.config import HistoryConfig
from wsgate.events import Event


class MemoryBroker:
    """Broker for a single node (``memory://``)."""

    def __init__(self, history: HistoryConfig) -> None:
        self._deliver: Deliver | None = None
        self._size = history.size
        self._ttl = history.ttl
        #: scope key -> (monotonic publish time, event), oldest first; the scope
        #: published to least recently first, so trimming stops at the first live one.
        self._history: OrderedDict[str, deque[tuple[float, Event]]] = OrderedDict()

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
            for scope in {t.scope_key for t in event.topics}:
                kept = history.get(scope)
                if kept is None:
                    kept = history[scope] = deque(maxlen=self._size)
                else:
                    history.move_to_end(scope)
                kept.append((now, event))
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
            if kept[position][1].event_id == event_id:
                start = position if with_since else position + 1
                return [event for _, event in list(kept)[start:]]
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
