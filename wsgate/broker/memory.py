"""The one-process broker: publishing hands the events straight back to local delivery."""

from __future__ import annotations

from collections.abc import Sequence

from wsgate.broker import Deliver
from wsgate.events import Event


class MemoryBroker:
    """Broker for a single node (``memory://``)."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def publish(self, events: Sequence[Event]) -> None:
        if self._deliver is None:
            raise RuntimeError("broker not started")
        self._deliver(events)

    def watch(self, scope_key: str) -> None:
        """Nothing to do: every event is local."""

    def unwatch(self, scope_key: str) -> None:
        """Nothing to do: every event is local."""

    def healthy(self) -> bool:
        return self._deliver is not None

    async def close(self) -> None:
        self._deliver = None
