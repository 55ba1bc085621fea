"""wsgate.gateway.delivery without a socket: fan-out, at most once, slow consumers (4008)."""

from __future__ import annotations

import pytest

from tests.conftest import AGENT, CUSTOMER, OTHER_CUSTOMER, event, next_turn, wait_for

ALL = f"customer_id:{CUSTOMER}"
CALL = f"customer_id:{CUSTOMER}:call"
X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"  # the resource id of event()


@pytest.mark.gen_test
async def test_overlapping_subscriptions_get_each_event_once_in_order(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL, CALL, f"{CALL}:*", f"agent_id:{AGENT}")
    peer.take()
    sent = await node.publish(*[event(agent_id=AGENT, data={"id": X, "n": n}) for n in range(3)])
    frames = peer.take()
    assert [f["event_id"] for f in frames] == [e.event_id for e in sent]
    assert [f["data"]["n"] for f in frames] == [0, 1, 2]
    # With the first of the event's topics that matched.
    assert {f["topic"] for f in frames} == {f"{CALL}:{X}"}
    assert node.gateway.stats["messages_delivered"] == 3


@pytest.mark.gen_test
async def test_only_matching_connections_receive_an_event(make_node):
    node = await make_node()
    mine, my_peer = await node.connect()
    foreign, foreign_peer = await node.connect("super-token")
    idle, idle_peer = await node.connect()
    await node.subscribe(mine, f"{CALL}:{X}")
    await node.subscribe(foreign, f"customer_id:{OTHER_CUSTOMER}")
    for peer in (my_peer, foreign_peer, idle_peer):
        peer.take()
    await node.publish(event())
    assert [f["topic"] for f in my_peer.take()] == [f"{CALL}:{X}"]
    assert foreign_peer.take() == []
    assert idle_peer.take() == []


@pytest.mark.gen_test
async def test_a_slow_consumer_is_closed_4008_after_the_delivery(make_node):
    node = await make_node(server={"max_output_buffer": 1000})
    slow, slow_peer = await node.connect()
    good, good_peer = await node.connect()
    await node.subscribe(slow, ALL)
    await node.subscribe(good, ALL)
    slow_peer.take()
    good_peer.take()
    slow_peer.stalled = True  # it stops reading: every frame stays pending
    pad = "x" * 300
    await node.publish(*[event(data={"n": n, "pad": pad}) for n in range(5)])
    # Past the limit at the fourth frame; the close comes after the whole delivery,
    # which reaches every other connection.
    assert [f["data"]["n"] for f in good_peer.take()] == [0, 1, 2, 3, 4]
    assert [f["data"]["n"] for f in slow_peer.take()] == [0, 1, 2, 3, 4]
    assert slow_peer.closes == []
    await wait_for(lambda: slow_peer.closes)
    assert slow_peer.closes == [(4008, "slow consumer: unsent output passed its limit")]
    await slow.ended
    assert node.audit.rows("unsubscribe") == [("unsubscribe", ALL, "accepted", "slow_consumer")]
    assert node.gateway.stats["slow_consumer_closes"] == 1
    # Nothing more is written for it; the others keep receiving.
    await node.publish(event(data={"n": 5}))
    assert slow_peer.after_close == 0
    assert [f["data"]["n"] for f in good_peer.take()] == [5]
    assert len(node.gateway.connections) == 1


@pytest.mark.gen_test
async def test_a_peer_already_holding_too_much_is_closed_at_its_next_event(make_node):
    node = await make_node(server={"max_output_buffer": 1000})
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL)
    peer.pending = 1000  # exactly the limit: not past it
    await node.publish(event())
    await next_turn()
    assert peer.closes == []
    peer.pending = 1001
    await node.publish(event())
    await wait_for(lambda: peer.closes)
    assert peer.close_code == 4008
    assert len(peer.events()) == 2


@pytest.mark.gen_test
async def test_each_published_event_is_recorded_with_its_topics(make_node):
    node = await make_node()
    sent = await node.publish(event(), event(agent_id=AGENT))
    await wait_for(lambda: len(node.audit.events) == 2)
    assert [(r.event_id, r.type, r.topics, r.ingest_key_id) for r in node.audit.events] == [
        (sent[0].event_id, "call_created", (f"{CALL}:{X}",), "test-key"),
        (sent[1].event_id, "call_created", (f"{CALL}:{X}", f"agent_id:{AGENT}:call:{X}"),
         "test-key")]
