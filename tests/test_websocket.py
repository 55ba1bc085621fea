"""SPEC §2 against a real server: admission, replies, codes, delivery, audit rows."""

import logging

import pytest
import sqlalchemy as sa

from tests.conftest import AGENT, CUSTOMER, OTHER_AGENT, event, wait_for

C = CUSTOMER
X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"
CALL = f"customer_id:{C}:call:{X}"


def audit_rows(server):
    """Every audit row of the server's SQLite store, oldest first, as dicts."""
    engine = sa.create_engine(server.config.audit.url)
    try:
        with engine.connect() as db:
            rows = db.execute(sa.text("SELECT * FROM audit_rows ORDER BY id")).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


# -- admission ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_no_credential_is_401_json(make_server):
    server = await make_server()
    status, body = await server.refused(token=None)
    assert status == 401
    assert body["error"]["code"] == "unauthenticated"
    assert "token" in body["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_refused_credential_is_401(make_server):
    server = await make_server()
    status, body = await server.refused(token="wrong-token")
    assert status == 401 and body["error"]["code"] == "unauthenticated"


@pytest.mark.gen_test(timeout=20)
async def test_credential_from_header_and_cookie(make_server):
    server = await make_server()
    c1 = await server.connect(token=None, headers={"Authorization": "Bearer agent-token"})
    c2 = await server.connect(token=None, headers={"Cookie": "token=agent-token"})
    assert (await c1.request({"type": "ping"})) == {"type": "pong"}
    assert (await c2.request({"type": "ping"})) == {"type": "pong"}


@pytest.mark.gen_test(timeout=20)
async def test_query_token_wins_over_header(make_server):
    server = await make_server()
    status, _ = await server.refused(token="wrong-token",
                                     headers={"Authorization": "Bearer admin-token"})
    assert status == 401


@pytest.mark.gen_test(timeout=20)
async def test_origin_not_allowed_is_403_before_auth(make_server):
    server = await make_server()
    for origin in ("https://evil.example.com", "https://app.example.com.evil.net", "null",
                   "http://app.example.com", "https://APP.example.com",
                   "https://app.example.com:8443"):
        status, body = await server.refused(token="wrong-token", headers={"Origin": origin})
        assert status == 403, origin
        assert body["error"]["code"] == "origin_not_allowed"
    client = await server.connect(headers={"Origin": "https://app.example.com"})
    assert (await client.request({"type": "ping"}))["type"] == "pong"


@pytest.mark.gen_test(timeout=20)
async def test_authenticator_down_is_503(make_server):
    from tornado.testing import bind_unused_port

    sock, port = bind_unused_port()
    sock.close()  # nothing listens there: the backend is down
    server = await make_server(auth={"plugin": "http",
                                     "options": {"url": f"http://127.0.0.1:{port}/check"}})
    status, body = await server.refused(token="anything")
    assert status == 503
    assert "retry" in body["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_connected_frame(make_server):
    server = await make_server()
    client = await server.connect(expect_connected=False)
    hello = await client.recv()
    assert hello["type"] == "connected"
    assert len(hello["connection_id"]) == 36
    assert hello["expires_at"] is None


# -- subscribe / unsubscribe ---------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_subscribe_reply_with_rejections(make_server):
    server = await make_server()
    client = await server.connect("admin-token")
    reply = await client.subscribe(CALL, f"customer_id:{C.upper()}", f"agent_id:{OTHER_AGENT}",
                                   id="s1")
    assert reply["type"] == "subscribed"
    assert reply["id"] == "s1"
    assert reply["topics"] == [CALL]
    codes = {r["topic"]: r["code"] for r in reply["rejected"]}
    assert codes == {f"customer_id:{C.upper()}": "invalid_topic",
                     f"agent_id:{OTHER_AGENT}": "forbidden"}
    messages = {r["code"]: r["message"] for r in reply["rejected"]}
    assert "canonical lower-case" in messages["invalid_topic"]
    # The connection stays open and usable.
    assert (await client.request({"type": "ping", "id": 3})) == {"type": "pong", "id": 3}


@pytest.mark.gen_test(timeout=20)
async def test_subscribe_twice_is_accepted_and_changes_nothing(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(CALL)
    again = await client.subscribe(CALL)
    assert again["topics"] == [CALL] and again["rejected"] == []
    assert len(server.gateway.index) == 1


@pytest.mark.gen_test(timeout=20)
async def test_limit_exceeded(make_server):
    server = await make_server(server={"max_subscriptions": 2})
    client = await server.connect()
    reply = await client.subscribe(f"customer_id:{C}:a", f"customer_id:{C}:b",
                                   f"customer_id:{C}:c")
    assert reply["topics"] == [f"customer_id:{C}:a", f"customer_id:{C}:b"]
    assert reply["rejected"][0]["code"] == "limit_exceeded"


@pytest.mark.gen_test(timeout=20)
async def test_unsubscribe_exact_string_and_not_subscribed(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{C}:call")
    reply = await client.unsubscribe(f"customer_id:{C}:call", f"customer_id:{C}", id=9)
    assert reply["type"] == "unsubscribed" and reply["id"] == 9
    assert reply["topics"] == [f"customer_id:{C}:call"]
    assert reply["rejected"] == [{"topic": f"customer_id:{C}", "code": "not_subscribed",
                                  "message": "this connection does not hold that topic"}]
    assert len(server.gateway.index) == 0


@pytest.mark.gen_test(timeout=20)
async def test_bad_messages_get_error_frames_and_connection_stays(make_server):
    server = await make_server()
    client = await server.connect()
    for raw in ("not json", "[]", '{"type":"Subscribe","topics":["x"]}',
                '{"type":"subscribe","topics":"x"}', b"\x00\x01"):
        await client.send(raw)
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == "bad_request", frame
        assert frame["message"]
    assert (await client.request({"type": "ping"})) == {"type": "pong"}


@pytest.mark.gen_test(timeout=20)
async def test_too_many_bad_messages_closes_1008(make_server):
    server = await make_server(server={"max_bad_messages_per_minute": 3})
    client = await server.connect()
    for _ in range(3):
        await client.send("nope")
        assert (await client.recv())["code"] == "bad_request"
    await client.send("nope")
    assert await client.closed() == 1008


@pytest.mark.gen_test(timeout=20)
async def test_frame_too_big_closes_1009(make_server):
    server = await make_server(server={"max_message_size": 1024})
    client = await server.connect()
    await client.send('{"type":"ping","id":"' + "x" * 1000 + '"}')  # under the limit
    assert (await client.recv())["type"] == "error"  # id too long, but the frame is allowed
    await client.send("x" * 1025)
    assert await client.closed() == 1009


# -- delivery --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_event_reaches_subscriber_once_with_overlapping_subscriptions(make_server):
    server = await make_server()
    client = await server.connect()
    reply = await client.subscribe(f"customer_id:{C}", f"customer_id:{C}:call", CALL,
                                   f"customer_id:{C}:*:{X}")
    assert len(reply["topics"]) == 4
    status, body = await server.post(event(agent_id=AGENT))  # two topics, both match
    assert status == 202 and body["accepted"] == 1
    frame = await client.recv()
    assert frame["type"] == "call_created"
    assert frame["topic"] == CALL
    assert frame["data"] == {"id": X}
    assert frame["event_id"] == body["event_ids"][0]
    assert frame["published_at"].endswith("Z") and len(frame["published_at"]) == 24
    await client.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_segment_match_not_characters(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{C}:queue")
    await server.post(event("queuecall_created"))
    await client.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_batch_order_kept_per_connection(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{C}")
    batch = [event(data={"id": f"r{i}", "n": i}) for i in range(50)]
    status, body = await server.post({"events": batch})
    assert status == 202 and body["accepted"] == 50
    got = [(await client.recv())["data"]["n"] for _ in range(50)]
    assert got == list(range(50))


@pytest.mark.gen_test(timeout=20)
async def test_only_matching_connections_receive(make_server):
    server = await make_server()
    admin = await server.connect("admin-token")
    agent = await server.connect("agent-token")
    other = await server.connect("other-agent-token")
    await admin.subscribe(f"customer_id:{C}:call")
    await agent.subscribe(f"agent_id:{AGENT}")
    await other.subscribe(f"agent_id:{OTHER_AGENT}")
    await server.post(event(agent_id=AGENT))
    assert (await admin.recv())["topic"] == CALL
    assert (await agent.recv())["topic"] == f"agent_id:{AGENT}:call:{X}"
    await other.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_no_events_after_unsubscribe(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(CALL)
    await client.unsubscribe(CALL)
    await server.post(event())
    await client.no_frame()


# -- audit -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_audit_rows_accepted_rejected_and_disconnect(make_server):
    server = await make_server()
    client = await server.connect("admin-token", headers={"User-Agent": "pytest-agent",
                                                          "Origin": "https://app.example.com"})
    await client.subscribe(CALL, f"agent_id:{OTHER_AGENT}", "customer_id:nope")
    await client.unsubscribe(CALL, f"customer_id:{C}")
    await client.subscribe(f"customer_id:{C}")
    client.close()
    rows = await wait_for(lambda: (r := audit_rows(server)) and
                          any(x["code"] == "disconnect" for x in r) and r)
    got = [(r["action"], r["topic"], r["outcome"], r["code"]) for r in rows]
    assert got == [
        ("subscribe", CALL, "accepted", ""),
        ("subscribe", f"agent_id:{OTHER_AGENT}", "rejected", "forbidden"),
        ("subscribe", "customer_id:nope", "rejected", "invalid_topic"),
        ("unsubscribe", CALL, "accepted", "client"),
        ("unsubscribe", f"customer_id:{C}", "rejected", "not_subscribed"),
        ("subscribe", f"customer_id:{C}", "accepted", ""),
        ("unsubscribe", f"customer_id:{C}", "accepted", "disconnect"),
    ]
    first = rows[0]
    assert first["subject"] == "alice" and first["kind"] == "agent"
    assert first["customer_id"] == C and first["agent_id"] == AGENT
    assert first["authenticator"] == "static"
    assert first["node_id"] == "test-node"
    assert first["remote_addr"] == "127.0.0.1"
    assert first["origin"] == "https://app.example.com"
    assert first["user_agent"] == "pytest-agent"
    assert len({r["connection_id"] for r in rows}) == 1


@pytest.mark.gen_test(timeout=20)
async def test_subscribe_reply_comes_after_commit(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(CALL)
    # The reply has arrived: the row must already be readable from another connection.
    assert [(r["topic"], r["outcome"]) for r in audit_rows(server)] == [(CALL, "accepted")]


@pytest.mark.gen_test(timeout=30)
async def test_pipelined_messages_are_answered_in_order_on_every_connection(make_server):
    # Subscribes sent back to back, on several connections at once, are committed
    # in shared group commits; each connection still gets one reply per message,
    # in the order sent, each after its rows are committed.
    server = await make_server()
    clients = [await server.connect() for _ in range(4)]
    sent: list[list[tuple[str, int]]] = [[] for _ in clients]
    for k in range(12):
        for i, client in enumerate(clients):
            if k == 5:
                message = {"type": "ping", "id": k}
                sent[i].append(("pong", k))
            elif k == 8:
                message = {"type": "unsubscribe", "topics": [f"{CALL}:{i}-0"], "id": k}
                sent[i].append(("unsubscribed", k))
            else:
                message = {"type": "subscribe", "topics": [f"{CALL}:{i}-{k}"], "id": k}
                sent[i].append(("subscribed", k))
            await client.send(message)
    for i, client in enumerate(clients):
        got = [await client.recv() for _ in sent[i]]
        assert [(r["type"], r["id"]) for r in got] == sent[i]
        assert all(r.get("rejected", []) == [] for r in got), got
    rows = audit_rows(server)
    subscribed = {r["topic"] for r in rows if r["action"] == "subscribe"}
    assert subscribed == {f"{CALL}:{i}-{k}" for i in range(4) for k in range(12)
                          if k not in (5, 8)}


@pytest.mark.gen_test(timeout=30)
async def test_audit_unavailable_fails_closed(make_server, tmp_path):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{C}:a")
    # Make the store unwritable: another writer holds SQLite's write lock.
    blocker = sa.create_engine(server.config.audit.url,
                               connect_args={"timeout": 0.1, "isolation_level": None})
    with blocker.connect() as db:
        db.exec_driver_sql("BEGIN IMMEDIATE")
        # The writer waits out SQLite's busy timeout, then refuses.
        reply = await client.request({"type": "subscribe", "topics": [CALL]}, timeout=30)
        db.exec_driver_sql("ROLLBACK")
    blocker.dispose()
    assert reply["topics"] == []
    assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"]
    await server.post(event())
    await client.no_frame()
    # The store is back: subscribing works again without a restart (the writer
    # retries the store after its back-off).
    await client.subscribe_until_accepted(CALL)


# -- logs ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_token_never_logged(make_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = await make_server()
    client = await server.connect("admin-token")
    await client.subscribe(CALL)
    await server.refused(token="admin-token-but-wrong")
    client.close()
    await wait_for(lambda: "connection closed" in caplog.text)
    text = caplog.text
    assert "token=***" in text
    assert "admin-token" not in text


# -- the voipbin authorizer through the wire (every rule of SPEC §4) ---------------

OTHER_C = "6a1f4c2e-da9a-11ee-8d7e-0b6f3c2d1e4f"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("token,topic,allowed", [
    ("super-token", f"customer_id:{C}:call", True),
    ("super-token", f"agent_id:{AGENT}", True),
    ("admin-token", f"customer_id:{C}", True),
    ("admin-token", f"customer_id:{OTHER_C}", False),
    ("manager-token", f"customer_id:{C}:*:{X}", True),
    ("agent-token", f"customer_id:{C}:call", False),
    ("agent-token", f"agent_id:{AGENT}:call", True),
    ("agent-token", f"agent_id:{OTHER_AGENT}", False),
    ("accesskey-token", f"customer_id:{C}", True),
    ("accesskey-token", f"customer_id:{OTHER_C}", False),
    ("accesskey-token", f"agent_id:{AGENT}", False),
    ("direct-token", CALL, True),
    ("direct-token", f"customer_id:{C}:call", False),
    ("direct-token", f"customer_id:{C}:call:{X}:more", False),
    ("direct-token", f"customer_id:{C}:*:{X}", False),
    ("direct-token", f"customer_id:{C}:queue:{X}", False),
    ("direct-token", f"customer_id:{OTHER_C}:call:{X}", False),
])
async def test_voipbin_rules_over_the_wire(make_server, token, topic, allowed):
    server = await make_server()
    client = await server.connect(token)
    reply = await client.subscribe(topic)
    if allowed:
        assert reply["topics"] == [topic] and reply["rejected"] == []
    else:
        assert reply["topics"] == []
        (rejection,) = reply["rejected"]
        assert rejection["code"] == "forbidden" and rejection["message"]
