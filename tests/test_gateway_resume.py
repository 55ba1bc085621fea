"""wsgate.gateway.resume without a socket: a subscribe with ``since`` replays history,
then live events, with no gap and no duplicate at the seam."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import CUSTOMER, event, wait_for
from tests.fakes import HeldBroker
from wsgate.events import now_rfc3339

ALL = f"customer_id:{CUSTOMER}"
CALL = f"customer_id:{CUSTOMER}:call"


def ids(frames: list[dict]) -> list[str | None]:
    """The event id of each frame (None for a control frame)."""
    return [f.get("event_id") for f in frames]


def held_history(read_first: bool):
    return lambda config: HeldBroker(config.history, read_first=read_first)


async def in_a_new_millisecond() -> None:
    """Wait until the next event's published_at (milliseconds) differs from the last's."""
    stamp = now_rfc3339()
    await wait_for(lambda: now_rfc3339() != stamp, interval=0.001)


@pytest.mark.gen_test
async def test_resume_replays_the_missed_events_in_order_then_live(make_node):
    node = await make_node()
    [last] = await node.publish(event(data={"n": 0}))
    missed = []
    for n in (1, 2, 3):
        await in_a_new_millisecond()  # ordered by time as well as by arrival
        missed += await node.publish(event(data={"n": n}))
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL, since=last.event_id, id="r")
    frames = peer.take()
    assert frames[0] == {"type": "subscribed", "id": "r", "topics": [ALL], "rejected": [],
                         "recovered": True}
    assert ids(frames[1:]) == [e.event_id for e in missed]
    assert [f["data"]["n"] for f in frames[1:]] == [1, 2, 3]
    [live] = await node.publish(event(data={"n": 4}))
    assert ids(peer.take()) == [live.event_id]


@pytest.mark.gen_test
async def test_an_unknown_since_is_not_recovered_and_replays_nothing(make_node):
    node = await make_node()
    await node.publish(event())
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL, since="00000000-1111-2222-3333-444444444444")
    [reply] = peer.take()
    assert reply["topics"] == [ALL] and reply["recovered"] is False
    [live] = await node.publish(event())
    assert ids(peer.take()) == [live.event_id]


@pytest.mark.gen_test
async def test_without_history_nothing_is_recovered(make_node):
    node = await make_node(history={"size": 0})
    [last] = await node.publish(event())
    await node.publish(event())
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL, since=last.event_id)
    assert [(f["type"], f["recovered"]) for f in peer.take()] == [("subscribed", False)]


@pytest.mark.gen_test
@pytest.mark.parametrize("read_first", [True, False],
                         ids=["read before the live event", "read after the live event"])
async def test_an_event_published_during_the_replay_arrives_once_after_it(make_node,
                                                                          read_first):
    node = await make_node(broker=held_history(read_first))
    broker = node.gateway.broker
    [last] = await node.publish(event(data={"n": 0}))
    [missed] = await node.publish(event(data={"n": 1}))
    conn, peer = await node.connect()
    handled = node.send(conn, {"type": "subscribe", "topics": [ALL], "since": last.event_id})
    node.audit.commit()
    await asyncio.wait_for(broker.reading.reached.wait(), 5)
    # Live while history is read: held until after the replay; when the history
    # read includes it too, the held copy is not sent again.
    [during] = await node.publish(event(data={"n": 2}))
    assert peer.take() == []
    broker.reading.open()
    await handled
    assert ids(peer.take()) == [None, missed.event_id, during.event_id]
    [live] = await node.publish(event(data={"n": 3}))
    assert ids(peer.take()) == [live.event_id]


@pytest.mark.gen_test
async def test_events_of_topics_already_held_are_not_replayed(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    await node.subscribe(conn, CALL)
    [last] = await node.publish(event())
    [call] = await node.publish(event(data={"n": "call"}))
    [queue] = await node.publish(event("queue_updated", data={"n": "queue"}))
    assert ids(peer.take())[1:] == [last.event_id, call.event_id]  # live, as they came
    await node.subscribe(conn, ALL, since=last.event_id)
    frames = peer.take()
    assert frames[0]["recovered"] is True
    assert ids(frames[1:]) == [queue.event_id]


@pytest.mark.gen_test
async def test_since_an_event_of_no_resumed_topic_is_not_recovered(make_node):
    # Issue 16 item 9: a direct token resuming its own call topic with the id of a
    # queue event it cannot see got recovered: true (and the calls after it), which
    # told it that event's place in the customer's history.
    node = await make_node()
    call_topic = f"customer_id:{CUSTOMER}:call:{event()['data']['id']}"
    [queue] = await node.publish(event("queue_updated", data={"id": "q-1"}))
    [call] = await node.publish(event())
    conn, peer = await node.connect("direct-token")
    await node.subscribe(conn, call_topic, since=queue.event_id)
    frames = peer.take()
    assert frames[0]["topics"] == [call_topic]
    assert frames[0]["recovered"] is False
    assert ids(frames[1:]) == []
    # Its own topic's event resumes as before.
    [later] = await node.publish(event())
    peer.take()
    again, peer2 = await node.connect("direct-token")
    await node.subscribe(again, call_topic, since=call.event_id)
    frames = peer2.take()
    assert frames[0]["recovered"] is True
    assert ids(frames[1:]) == [later.event_id]
