"""The one-node broker's history: bounded per scope, forgotten by age."""

from __future__ import annotations

import uuid

import pytest

from wsgate.broker import memory
from wsgate.broker.memory import MemoryBroker
from wsgate.config import HistoryConfig
from wsgate.events import Event, validate_events


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(memory.time, "monotonic", c)
    return c


def event_for(agent: str) -> Event:
    [event] = validate_events([{"type": "call_created", "agent_id": agent,
                                "data": {"id": str(uuid.uuid4())}}])
    return event


async def started(size: int = 3, ttl: float = 60.0) -> tuple[MemoryBroker, list[Event]]:
    delivered: list[Event] = []
    broker = MemoryBroker(HistoryConfig(size=size, ttl=ttl))
    await broker.start(delivered.extend)
    return broker, delivered


@pytest.mark.gen_test
async def test_history_keeps_the_newest_events_per_scope(clock: Clock) -> None:
    broker, delivered = await started(size=3)
    agent = str(uuid.uuid4())
    events = [event_for(agent) for _ in range(5)]
    for e in events:
        await broker.publish([e])
    assert delivered == events
    scope = events[0].topics[0].scope_key
    assert await broker.history_since(scope, events[2].event_id) == events[3:]
    assert await broker.history_since(scope, events[1].event_id) is None  # pushed out
    # with_since: the since event itself first (resume checks its topics).
    assert await broker.history_since(scope, events[2].event_id, with_since=True) == events[2:]
    assert await broker.history_since(scope, events[1].event_id, with_since=True) is None
    assert broker.history_size() == 3


@pytest.mark.gen_test
async def test_scopes_past_the_age_limit_are_forgotten_and_live_ones_kept(clock: Clock) -> None:
    broker, _ = await started(ttl=60.0)
    old, live = str(uuid.uuid4()), str(uuid.uuid4())
    first_live = event_for(live)
    await broker.publish([event_for(old)])
    await broker.publish([first_live])
    clock.now += 50
    # Republishing moves the live scope behind the old one.
    newest = event_for(live)
    await broker.publish([newest])
    clock.now += 20  # old: 70 s, live's newest: 20 s
    await broker.publish([event_for(str(uuid.uuid4()))])
    assert broker.history_size() == 3  # old forgotten: live's two events and the new one
    assert await broker.history_since(first_live.topics[0].scope_key, newest.event_id) == []


@pytest.mark.gen_test
async def test_history_adds_nothing_for_the_cyclic_collector_to_walk() -> None:
    # History holds events for minutes: each full collection walked every one of
    # them (Event, Topic and tuples, all tracked), ~15 % of a busy server's CPU.
    # Kept as plain strings, the entries are untracked after one young collection.
    import gc

    broker, _ = await started(size=1000, ttl=600.0)
    agents = [str(uuid.uuid4()) for _ in range(10)]
    events = [event_for(agents[i % 10]) for i in range(2000)]
    gc.collect()
    before = len(gc.get_objects())
    for i in range(0, len(events), 10):
        await broker.publish(events[i:i + 10])
    del events
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert broker.history_size() == 2000
    assert grown < 100, grown
    # What it gives back is still the events as published.
    scope = f"agent_id:{agents[0]}"
    kept = await broker.history_since(scope, "nope")
    assert kept is None
