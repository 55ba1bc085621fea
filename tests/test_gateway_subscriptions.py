"""wsgate.gateway.subscriptions without a socket: subscribe, unsubscribe, their audit rows.

The audit sink is a ControlledAuditSink, so each test decides when (and
whether) the rows of a subscribe are committed, and sees what the client
receives before and after.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import CUSTOMER, OTHER_CUSTOMER, event, next_turn
from tests.fakes import HeldBroker
from wsgate.audit.records import AuditUnavailable

ALL = f"customer_id:{CUSTOMER}"
CALL = f"customer_id:{CUSTOMER}:call"
FOREIGN = f"customer_id:{OTHER_CUSTOMER}"


def subscribe(*topics: str, **extra: object) -> dict[str, object]:
    return {"type": "subscribe", "topics": list(topics), **extra}


def codes(reply: dict) -> list[tuple[str, str]]:
    return [(r["topic"], r["code"]) for r in reply["rejected"]]


@pytest.mark.gen_test
async def test_the_reply_is_sent_only_after_the_rows_are_committed(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    handled = node.send(conn, subscribe(ALL, FOREIGN, id=1))
    await next_turn()
    assert peer.take() == []
    assert node.audit.rows() == []
    assert node.audit.commit() == 1
    await handled
    [reply] = peer.take()
    assert (reply["type"], reply["id"], reply["topics"]) == ("subscribed", 1, [ALL])
    assert codes(reply) == [(FOREIGN, "forbidden")]
    assert node.audit.rows() == [("subscribe", ALL, "accepted", ""),
                                 ("subscribe", FOREIGN, "rejected", "forbidden")]


@pytest.mark.gen_test
async def test_a_failed_commit_answers_audit_unavailable_for_each_accepted_topic(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    handled = node.send(conn, subscribe(ALL, FOREIGN, CALL, "not-a-topic"))
    assert node.audit.fail(AuditUnavailable("the store is down")) == 1
    await handled
    [reply] = peer.take()
    assert reply["type"] == "subscribed" and reply["topics"] == []
    assert sorted(codes(reply)) == sorted([
        (ALL, "audit_unavailable"), (CALL, "audit_unavailable"), (FOREIGN, "forbidden"),
        ("not-a-topic", "invalid_topic")])
    assert node.audit.rows() == []
    # Nothing was subscribed: no event reaches it.
    await node.publish(event())
    assert peer.take() == []
    # The store is back: the same subscribe is accepted.
    await node.subscribe(conn, ALL)
    assert peer.take()[0]["topics"] == [ALL]


@pytest.mark.gen_test
async def test_events_of_a_new_scope_flow_only_after_the_reply(make_node):
    node = await make_node(broker=lambda config: HeldBroker(config.history,
                                                            listening_open=False))
    broker = node.gateway.broker
    conn, peer = await node.connect()
    handled = node.send(conn, subscribe(ALL))
    await node.publish(event(data={"n": "before the commit"}))
    node.audit.commit()
    # Committed; the reply waits until the broker listens to the new scope.
    await asyncio.wait_for(broker.listening.reached.wait(), 5)
    await node.publish(event(data={"n": "before the reply"}))
    assert peer.take() == []
    broker.listening.open()
    await handled
    await node.publish(event(data={"n": "after"}))
    frames = peer.take()
    assert [f["type"] for f in frames] == ["subscribed", "call_created"]
    assert frames[1]["data"] == {"n": "after"}


@pytest.mark.gen_test
async def test_events_of_a_watched_scope_flow_right_after_the_reply(make_node):
    node = await make_node()
    first, _ = await node.connect()
    await node.subscribe(first, ALL)  # the broker listens to the scope from now on
    conn, peer = await node.connect()
    handled = node.send(conn, subscribe(CALL))
    await node.publish(event(data={"n": "before the commit"}))
    node.audit.commit()
    await node.publish(event(data={"n": "after"}))  # the reply went out at the commit
    await handled
    frames = peer.take()
    assert [f["type"] for f in frames] == ["subscribed", "call_created"]
    assert frames[1]["data"] == {"n": "after"}


@pytest.mark.gen_test
async def test_topics_past_max_subscriptions_are_refused_limit_exceeded(make_node):
    node = await make_node(server={"max_subscriptions": 2})
    conn, peer = await node.connect()
    await node.subscribe(conn, f"{CALL}:a", f"{CALL}:b", f"{CALL}:c")
    [reply] = peer.take()
    assert reply["topics"] == [f"{CALL}:a", f"{CALL}:b"]
    assert codes(reply) == [(f"{CALL}:c", "limit_exceeded")]
    # A topic it holds is accepted again at the limit (and written again).
    await node.subscribe(conn, f"{CALL}:a")
    assert peer.take()[0]["topics"] == [f"{CALL}:a"]
    assert node.audit.rows() == [
        ("subscribe", f"{CALL}:a", "accepted", ""), ("subscribe", f"{CALL}:b", "accepted", ""),
        ("subscribe", f"{CALL}:c", "rejected", "limit_exceeded"),
        ("subscribe", f"{CALL}:a", "accepted", "")]


@pytest.mark.gen_test
async def test_unsubscribe_ends_with_reason_client_and_stops_the_events(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    await node.subscribe(conn, ALL)
    await node.request(conn, {"type": "unsubscribe", "topics": [ALL, CALL], "id": "u"})
    assert peer.take()[1] == {
        "type": "unsubscribed", "id": "u", "topics": [ALL],
        "rejected": [{"topic": CALL, "code": "not_subscribed",
                      "message": "this connection does not hold that topic"}]}
    assert node.audit.rows("unsubscribe") == [("unsubscribe", ALL, "accepted", "client"),
                                              ("unsubscribe", CALL, "rejected", "not_subscribed")]
    await node.publish(event())
    assert peer.take() == []
    assert len(node.gateway.index) == 0


@pytest.mark.gen_test
async def test_a_closed_connection_ends_every_subscription_with_reason_disconnect(make_node):
    node = await make_node()
    conn, _ = await node.connect()
    other, other_peer = await node.connect()
    await node.subscribe(conn, ALL, CALL)
    await node.subscribe(other, ALL)
    node.gateway.disconnected(conn, 1000)
    await conn.ended
    assert sorted(node.audit.rows("unsubscribe")) == [
        ("unsubscribe", ALL, "accepted", "disconnect"),
        ("unsubscribe", CALL, "accepted", "disconnect")]
    assert len(node.gateway.index) == 1
    other_peer.take()
    await node.publish(event())
    assert [f["type"] for f in other_peer.take()] == ["call_created"]


@pytest.mark.gen_test
async def test_a_connection_gone_before_the_commit_ends_what_it_just_gained(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    handled = node.send(conn, subscribe(ALL))
    node.gateway.disconnected(conn, 1006)
    node.audit.commit()
    await handled
    assert peer.take() == []
    assert node.audit.rows() == [("subscribe", ALL, "accepted", ""),
                                 ("unsubscribe", ALL, "accepted", "disconnect")]
    assert len(node.gateway.index) == 0
