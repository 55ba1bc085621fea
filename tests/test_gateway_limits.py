"""wsgate.gateway.limits without a socket: message rate, bad messages, refused topics
(SPEC §2, §5), on a clock the test moves."""

from __future__ import annotations

import pytest

from tests.conftest import CUSTOMER, OTHER_CUSTOMER
from tests.fakes import ManualClock
from wsgate.audit.records import AuditUnavailable
from wsgate.gateway import limits

ALL = f"customer_id:{CUSTOMER}"
FOREIGN = f"customer_id:{OTHER_CUSTOMER}"
PING = {"type": "ping"}


@pytest.fixture
def clock(monkeypatch):
    clock = ManualClock()
    monkeypatch.setattr(limits, "time", clock)
    return clock


@pytest.mark.gen_test
async def test_past_the_message_rate_the_connection_is_closed_1008(make_node, clock):
    node = await make_node(server={"max_messages_per_second": 1})
    conn, peer = await node.connect()
    for _ in range(10):  # a burst of 10 s worth
        await node.request(conn, PING)
    assert [f["type"] for f in peer.take()] == ["pong"] * 10
    clock.advance(1.0)  # refills one
    await node.request(conn, PING)
    assert peer.take() == [{"type": "pong"}]
    await node.request(conn, PING)
    assert peer.take() == []
    assert peer.closes == [(1008, "too many messages")]


@pytest.mark.gen_test
async def test_past_the_bad_message_limit_the_connection_is_closed_1008(make_node, clock):
    node = await make_node(server={"max_bad_messages_per_minute": 2})
    conn, peer = await node.connect()
    for _ in range(2):
        await node.request(conn, "not json")
    assert [(f["type"], f["code"]) for f in peer.take()] == [("error", "bad_request")] * 2
    clock.advance(59.0)
    await node.request(conn, {"type": "unknown"})
    assert peer.take() == []
    assert peer.closes == [(1008, "too many bad messages")]


@pytest.mark.gen_test
async def test_bad_messages_older_than_a_minute_are_forgotten(make_node, clock):
    node = await make_node(server={"max_bad_messages_per_minute": 2})
    conn, peer = await node.connect()
    for _ in range(2):
        await node.request(conn, "not json")
    clock.advance(60.0)
    for _ in range(2):
        await node.request(conn, "not json")
    assert [f["code"] for f in peer.take()] == ["bad_request"] * 4
    assert peer.closes == []


@pytest.mark.gen_test
async def test_past_the_refused_topic_limit_the_reply_is_sent_then_1008(make_node, clock):
    node = await make_node(server={"max_rejected_topics_per_minute": 2})
    conn, peer = await node.connect()
    await node.subscribe(conn, FOREIGN, f"{FOREIGN}:call")
    assert [r["code"] for r in peer.take()[0]["rejected"]] == ["forbidden"] * 2
    await node.subscribe(conn, ALL, f"{FOREIGN}:queue")
    [reply] = peer.take()
    assert reply["topics"] == [ALL] and len(reply["rejected"]) == 1
    assert peer.closes == [(1008, "too many refused topics: more than 2 in a minute")]
    # Answered and written like any other, and its subscription ended with the close.
    assert [row[2:] for row in node.audit.rows("subscribe")] == [
        ("rejected", "forbidden"), ("rejected", "forbidden"), ("accepted", ""),
        ("rejected", "forbidden")]
    await conn.ended
    assert node.audit.rows("unsubscribe") == [("unsubscribe", ALL, "accepted", "disconnect")]


@pytest.mark.gen_test
async def test_refused_topics_older_than_a_minute_are_forgotten(make_node, clock):
    node = await make_node(server={"max_rejected_topics_per_minute": 2})
    conn, peer = await node.connect()
    await node.subscribe(conn, FOREIGN, f"{FOREIGN}:call")
    clock.advance(60.0)
    await node.subscribe(conn, FOREIGN, f"{FOREIGN}:call")
    assert len(peer.take()) == 2
    assert peer.closes == []


@pytest.mark.gen_test
async def test_audit_unavailable_is_not_counted_against_the_client(make_node, clock):
    node = await make_node(server={"max_rejected_topics_per_minute": 1})
    conn, peer = await node.connect()
    topics = [f"{ALL}:t{i}" for i in range(5)]
    for _ in range(2):
        handled = node.send(conn, {"type": "subscribe", "topics": topics})
        node.audit.fail(AuditUnavailable("the store is down"))
        await handled
    assert [[r["code"] for r in f["rejected"]] for f in peer.take()] == \
        [["audit_unavailable"] * 5] * 2
    assert peer.closes == []
    # The client's own refusals do count: one is the limit, two are past it.
    await node.subscribe(conn, FOREIGN)
    assert peer.closes == []
    await node.subscribe(conn, f"{FOREIGN}:x")
    assert peer.close_code == 1008
