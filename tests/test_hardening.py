"""Hardening: hostile origins, tokens in logs, hostile topics and messages, limits.

Each test tries the attack against a real server (or, for the property tests,
a real gateway) and asserts what the attacker and the operator see: status
codes, close codes, reply frames, audit rows and log lines. Slow consumers,
dead peers and ingest signatures are in test_hardening_flow.py; audit faults
and crashes in test_crash.py; SIGTERM in test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import pytest
import sqlalchemy as sa
import tornado.httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    AGENT,
    CUSTOMER,
    INGEST_KEY,
    OTHER_CUSTOMER,
    base_config,
    event,
    wait_for,
)
from tests.fakes import SCRIPTED_AUTH, FakeTransport, ScriptedAuthenticator
from wsgate import errors
from wsgate.app import build_gateway
from wsgate.gateway import MinuteCount
from wsgate.plugins import Principal

C = CUSTOMER
X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"
CALL = f"customer_id:{C}:call:{X}"
ALICE = Principal(kind="agent", subject="alice", customer_id=C, agent_id=AGENT,
                  permissions=frozenset({"customer_admin"}))
SECRET_TOKEN = "s3cr3t-T0KEN-d0-not-log"
#: ``make soak`` sets WSGATE_SOAK=1: the same attacks, larger and longer.
SOAK = os.environ.get("WSGATE_SOAK") == "1"


EXPLODING_TOKEN = "explode-Zq9Wv2"


async def scripted_server(make_server: Any) -> Any:
    """A server whose authenticator (a ScriptedAuthenticator, counting its calls) takes
    ``SECRET_TOKEN`` for alice, raises an exception quoting ``EXPLODING_TOKEN`` for
    it (a careless plugin) and refuses anything else with a message that repeats it."""
    server = await make_server(**SCRIPTED_AUTH)
    server.gateway.authenticator.answers.update({
        SECRET_TOKEN: ALICE,
        EXPLODING_TOKEN: RuntimeError(f"backend rejected request for credential "
                                      f"{EXPLODING_TOKEN}")})
    return server


def db_rows(url: str, table: str = "audit_rows") -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as db:
            return [dict(r) for r in db.execute(
                sa.text(f"SELECT * FROM {table} ORDER BY id")).mappings()]
    finally:
        engine.dispose()


def dump_database(url: str) -> str:
    """Every column of every row of every table, as text (what a reviewer could read)."""
    engine = sa.create_engine(url)
    try:
        out = []
        with engine.connect() as db:
            for table in sa.inspect(engine).get_table_names():
                for row in db.execute(sa.text(f'SELECT * FROM "{table}"')):
                    out.append(" ".join(str(v) for v in row))
        return "\n".join(out)
    finally:
        engine.dispose()


async def raw_http(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after timeout)."""
    return await asyncio.wait_for(reader.read(), timeout)


# -- 1. origin ----------------------------------------------------------------------

HOSTILE_ORIGINS = [
    "https://app.example.com.evil.net",   # look-alike: allowed host as a prefix
    "https://evil-app.example.com",
    "https://appexample.com",
    "https://app.example.co",
    "https://xapp.example.com",
    "null",                               # sandboxed iframes, file:// pages
    "http://app.example.com",             # other scheme
    "wss://app.example.com",
    "https://app.example.com:443",        # explicit default port: not the same string
    "https://app.example.com:8443",       # other port
    "HTTPS://APP.EXAMPLE.COM",            # upper-case variants
    "https://App.Example.Com",
    "https://app.example.com/",           # trailing slash
    "https://app.example.com.",           # trailing dot
    "https://app.example.com, https://evil.net",
    "https://user@app.example.com",
    "https://app.example.com%2eevil.net",
    "https://аpp.example.com".encode().decode("latin-1"),  # Cyrillic a, as raw UTF-8
    "",
]


@pytest.mark.gen_test(timeout=30)
async def test_hostile_origins_get_403_before_the_authenticator_and_the_audit_log(make_server):
    server = await scripted_server(make_server)
    auth = server.gateway.authenticator
    assert isinstance(auth, ScriptedAuthenticator)
    for origin in HOSTILE_ORIGINS:
        status, body = await server.refused(token=SECRET_TOKEN, headers={"Origin": origin})
        assert status == 403, origin
        assert body["error"]["code"] == "origin_not_allowed", origin
        assert "allowed_origins" in body["error"]["message"]
    assert auth.calls == 0, "the authenticator was asked about a request from a hostile origin"
    assert server.gateway.connections == {}
    assert db_rows(server.config.audit.url) == []
    # The exact configured origin, and no Origin at all (not a browser), get through.
    allowed = await server.connect(SECRET_TOKEN, headers={"Origin": "https://app.example.com"})
    await server.connect(SECRET_TOKEN)
    assert auth.calls == 2
    assert (await allowed.subscribe(CALL))["topics"] == [CALL]


# -- 2. tokens never logged -----------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_tokens_appear_in_no_log_line_and_no_audit_column(make_server, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("tornado", "tornado.access", "tornado.application", "tornado.general",
                 "tornado.websocket", "wsgate", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    server = await scripted_server(make_server)
    secrets = [SECRET_TOKEN, EXPLODING_TOKEN, "refused-Kp7Yx4", "renew-Ee5Rt1",
               "cookie-Uu3Ii8", "bad-utf8-Hh6Jj0", INGEST_KEY]
    # A session: connect by query, header and cookie; subscribe, errors, renew, close.
    client = await server.connect(SECRET_TOKEN, headers={"User-Agent": "pytest"})
    await client.subscribe(CALL, "customer_id:not-a-uuid", f"agent_id:{X}")
    await client.send("not json")
    assert (await client.recv())["code"] == "bad_request"
    renew = await client.request({"type": "authenticate", "token": "renew-Ee5Rt1", "id": 1})
    assert renew["type"] == "error" and renew["code"] == "unauthenticated"
    boom = await client.request({"type": "authenticate", "token": EXPLODING_TOKEN})
    assert boom["type"] == "error" and boom["code"] == "unauthenticated"
    await server.connect(None, headers={"Authorization": f"Bearer {SECRET_TOKEN}"})
    await server.connect(None, headers={"Cookie": f"token={SECRET_TOKEN}"})
    assert (await server.refused("refused-Kp7Yx4"))[0] == 401
    assert (await server.refused(None, headers={"Cookie": "token=cookie-Uu3Ii8"}))[0] == 401
    # The exception path: the plugin raises with the credential in its message.
    status, body = await server.refused(EXPLODING_TOKEN)
    assert status == 503
    # A token that is not valid UTF-8 once unescaped.
    http = tornado.httpclient.AsyncHTTPClient()
    response = await http.fetch(server.base + "/v1.0/ws?token=%ffbad-utf8-Hh6Jj0",
                                raise_error=False)
    assert response.code in (400, 401)
    assert json.loads(response.body)["error"]["code"]
    assert (await server.post(event()))[0] == 202
    assert (await server.post(event(), key="wrong-" + INGEST_KEY))[0] == 401
    await client.unsubscribe(CALL)
    client.close()
    await wait_for(lambda: not server.gateway.connections or
                   len(server.gateway.connections) == 2)
    await server.stop()  # flush the audit log; the fixture's second stop is harmless
    logged = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    stored = dump_database(server.config.audit.url)
    assert "subscribe" in stored and "alice" in stored  # the dump is not empty
    assert "token=***" in logged
    for secret in secrets:
        assert secret not in logged, f"{secret} leaked into the logs"
        assert secret not in stored, f"{secret} leaked into the audit store"
    # The 503 still tells the client what happened, and the operator can see why.
    assert "RuntimeError" in logged
    assert "retry" in body["error"]["message"]


# -- 3. topics over the wire ----------------------------------------------------------

HOSTILE_TOPICS = [
    f"customer_id:{C.replace('5', '٥')}",              # Arabic-Indic digit five
    f"customer_id:{C.replace('5', '５')}",              # full-width digit
    f"customer_id:{C.replace('b', 'ｂ')}",              # full-width letter
    f"customer_id:{C}:ｃａｌｌ",
    f"customer_id:{C}:caﬀ",                             # ligature (NFKC would make it "caff")
    f"customer_id:{C}:call:%2A",
    f"customer_id%3A{C}",
    f"customer_id:{C}%3Acall",
    f"customer_id:{C}:call%00",
    f"customer_id:{C}:call:{X} ",
    f" customer_id:{C}",
    f"customer_id: {C}",
    f"customer_id:{C}:ca ll",
    f"customer_id:{C}::call",
    f"customer_id:{C}:",
    f"customer_id:{C}:call:",
    f":customer_id:{C}",
    f"customer_id:{C}:call\x00",
    f"customer_id:{C}\x00:call",
    f"customer_id:{C}:{'a' * 129}",
    f"customer_id:{C}:" + ":".join(["a"] * 7),          # 9 segments
    f"customer_id:{C}:" + ":".join(["b" * 120] * 4),    # 4 legal segments, over 512 bytes
    f"customer_id:{C.upper()}",
    f"customer_id:{{{C}}}",
    f"customer_id:{C.replace('-', '')}",
    "customer_id:00000000-0000-0000-0000-000000000000",
    "customer_id:*",
    f"Customer_ID:{C}",
    f"customer_id:{C}:call:x*",
    f"customer_id:{C}:call:**",
    f"customer_id:{C}:\u200bcall",                       # zero-width space
    f"customer_id:{C}:call\u0301",                       # combining accent
    f"customer_id:{C}:call:\ud800",                      # lone surrogate
    "",
    ":",
    "customer_id",
]


@pytest.mark.gen_test(timeout=30)
async def test_hostile_topics_are_invalid_topic_never_normalised(make_server):
    server = await make_server()
    client = await server.connect("super-token")
    for start in range(0, len(HOSTILE_TOPICS), 10):
        topics = HOSTILE_TOPICS[start:start + 10]
        reply = await client.subscribe(*topics, id=start)
        assert reply["type"] == "subscribed" and reply["id"] == start
        assert reply["topics"] == []
        assert [r["topic"] for r in reply["rejected"]] == topics  # exactly as sent
        for rejection in reply["rejected"]:
            assert rejection["code"] == "invalid_topic", rejection
            assert rejection["message"]
        reply = await client.unsubscribe(*topics)
        assert reply["topics"] == []
        assert {r["code"] for r in reply["rejected"]} == {"invalid_topic"}
    assert len(server.gateway.index) == 0
    # Nothing was normalised into a subscription: an event for the real topic reaches no one.
    assert (await server.post(event()))[0] == 202
    await client.no_frame()
    # The connection survived all of it, and each topic has its rejected row.
    assert (await client.subscribe(CALL))["topics"] == [CALL]
    rows = db_rows(server.config.audit.url)
    rejected = [r for r in rows if r["outcome"] == "rejected"]
    assert len(rejected) == 2 * len(HOSTILE_TOPICS)
    assert {r["code"] for r in rejected} == {"invalid_topic"}


@pytest.mark.gen_test(timeout=30)
async def test_hostile_event_topics_and_ids_are_refused_by_ingest(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{C}")
    concrete = [t for t in HOSTILE_TOPICS if "\ud800" not in t]
    for topic in concrete:
        status, body = await server.post(event(topics=[topic]))
        assert status == 422, topic
        assert body["error"]["details"][0]["field"].startswith("topics"), body
    for bad_id in (C.upper(), C.replace("5", "٥"), C.replace("5", "５"), f" {C}", f"{C}\x00",
                   "%35" + C[1:], "00000000-0000-0000-0000-000000000000"):
        status, body = await server.post(event(customer_id=bad_id))
        assert status == 422 and body["error"]["details"][0]["field"] == "customer_id", bad_id
    await client.no_frame()


# -- 4. any client message, end to end -------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats() | st.text(st.characters(codec=None, exclude_categories=())),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
# Lone surrogates, NUL, RTL marks: what a hostile client can put inside JSON strings.
nasty_text = st.text(st.one_of(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from(["\x00", "\u202e", "\ufeff", ":", "*", "%", "５", "٥", "é"]),
    st.characters(codec="ascii")), max_size=40)
topic_like = st.one_of(
    nasty_text,
    st.builds(lambda scope, rest: f"{scope}:{C}{rest}",
              st.sampled_from(["customer_id", "agent_id", "Customer_id"]), nasty_text),
    st.sampled_from([CALL, f"customer_id:{C}", f"agent_id:{AGENT}", f"customer_id:{C}:*:{X}"]))
message_dicts = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "authenticate", "Subscribe",
                              "subscribed", "error", ""])},
    optional={"topics": st.one_of(st.lists(topic_like, max_size=6), json_values),
              "id": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), nasty_text,
                              json_values),
              "token": st.one_of(nasty_text, json_values),
              "since": st.one_of(nasty_text, json_values),
              "extra": json_values})


def _raw_messages() -> st.SearchStrategy[str | bytes]:
    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    return st.one_of(
        message_dicts.map(dumps),
        message_dicts.map(json.dumps),                      # surrogates as \ud800 escapes
        json_values.map(json.dumps),
        st.text(),
        st.binary(max_size=64),
        # Duplicate keys: the last one wins in Python's json, whatever the order.
        st.builds(lambda a, b: f'{{"type":"{a}","topics":["{CALL}"],"type":"{b}"}}',
                  st.sampled_from(["ping", "subscribe"]), st.sampled_from(["ping", "unsubscribe"])),
        # Huge numbers and non-finite literals.
        st.sampled_from(['{"type":"ping","id":1e400}', '{"type":"ping","id":-1e400}',
                         '{"type":"ping","id":' + "9" * 5000 + "}",
                         '{"type":"ping","id":NaN}', '{"type":"ping","id":Infinity}',
                         '{"type":"ping","id":9223372036854775808}',
                         '{"type":"ping","id":-9223372036854775808}',
                         '{"type":"subscribe","topics":["' + CALL + '"],"id":1.5}']),
        # Deep nesting that would raise RecursionError in a recursive parser or printer.
        st.integers(min_value=1, max_value=200_000).map(
            lambda n: '{"type":"ping","id":' + "[" * n + "]" * n + "}"),
        st.integers(min_value=1, max_value=200_000).map(lambda n: "[" * n),
        st.integers(min_value=1, max_value=100_000).map(
            lambda n: '{"type":"subscribe","topics":["x"],"extra":' + '{"a":' * n + "1"
            + "}" * n + "}"),
    )


def test_any_client_message_gets_one_reply_through_a_real_gateway(tmp_path):
    """Every frame, however hostile, gets exactly one reply or error frame from a real
    gateway (real authorizer, real audit writer): never an exception, never a close."""
    config = base_config(tmp_path, server={"max_messages_per_second": 0,
                                           "max_bad_messages_per_minute": 10**9,
                                           "max_rejected_topics_per_minute": 10**9})
    loop = asyncio.new_event_loop()
    gateway = build_gateway(config)
    try:
        loop.run_until_complete(gateway.start())
        transport = FakeTransport()
        principal = loop.run_until_complete(gateway.authenticate("admin-token"))
        conn = gateway.open(transport, principal, "127.0.0.1", None, "hypothesis")
        assert json.loads(transport.sent.pop())["type"] == "connected"

        @settings(max_examples=5000 if SOAK else 200, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(_raw_messages())
        def one_message(raw: str | bytes) -> None:
            loop.run_until_complete(gateway.handle_message(conn, raw))
            assert transport.closes == [] and not conn.closed
            assert len(transport.sent) == 1, transport.sent
            text = transport.sent.pop()
            assert isinstance(text, str) and text.isascii()  # valid UTF-8 whatever came in
            frame = json.loads(text)
            assert frame["type"] in ("subscribed", "unsubscribed", "pong", "authenticated",
                                     "error"), frame
            if frame["type"] == "error":
                assert frame["code"] in ("bad_request", "unauthenticated") and frame["message"]
            if frame["type"] in ("subscribed", "unsubscribed"):
                for rejection in frame["rejected"]:
                    assert rejection["code"] in ("invalid_topic", "forbidden", "limit_exceeded",
                                                 "not_subscribed"), rejection

        one_message()
    finally:
        loop.run_until_complete(gateway.shutdown())
        loop.close()


WIRE_HOSTILE = [
    "[" * 100_000,
    '{"type":"ping","id":' + "[" * 50_000 + "]" * 50_000 + "}",
    '{"type":"ping","id":' + "9" * 5000 + "}",
    '{"type":"ping","id":1e400}',
    '{"type":"ping","id":NaN}',
    '{"type":"subscribe","topics":["\\ud800"],"id":"\\udfff"}',
    '{"type":"ping","type":"subscribe","topics":["' + CALL + '"]}',
    '{"type":"subscribe","topics":[' + ",".join(['"' + CALL + '"'] * 100) + "]}",
    '{"type":"authenticate","token":"\\ud800"}',
    '{"type":"subscribe","topics":["' + CALL + '"],"since":"\\u0000"}',
    '{"type":"\\u0000"}',
    "\ufeff{}",
    "",
    " ",
    "null",
    '"\\ud800"',
]


@pytest.mark.gen_test(timeout=30)
async def test_hostile_frames_over_a_live_websocket_never_close_it(make_server):
    server = await make_server(server={"max_message_size": 256 * 1024,
                                       "max_bad_messages_per_minute": 1000})
    client = await server.connect()
    for raw in WIRE_HOSTILE:
        frame = await client.request(raw)  # type: ignore[arg-type]
        assert frame is not None, f"closed by {raw[:40]!r}"
        assert frame["type"] in ("error", "subscribed", "pong"), (raw[:40], frame)
    assert (await client.request({"type": "ping", "id": "end"})) == {"type": "pong", "id": "end"}


# -- 5. limits ------------------------------------------------------------------------


def padded_ping(size: int) -> str:
    """A valid ping message of exactly size bytes (JSON allows the padding)."""
    core = '{"type":"ping","id":"edge"'
    return core + " " * (size - len(core) - 1) + "}"


@pytest.mark.gen_test(timeout=30)
async def test_frame_size_boundary(make_server):
    server = await make_server(server={"max_message_size": 4096})
    client = await server.connect()
    exact = padded_ping(4096)
    assert len(exact.encode()) == 4096
    assert (await client.request(exact)) == {"type": "pong", "id": "edge"}
    other = await server.connect()
    await other.subscribe(CALL)
    await client.send(padded_ping(4097))
    assert await client.closed() == 1009
    # Only that connection: the others go on.
    assert (await other.request({"type": "ping"})) == {"type": "pong"}


@pytest.mark.gen_test(timeout=30)
async def test_topics_per_message_and_subscriptions_per_connection(make_server):
    server = await make_server(server={"max_subscriptions": 149})
    client = await server.connect()
    topics = [f"customer_id:{C}:t{i}" for i in range(101)]
    reply = await client.subscribe(*topics)
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert "1 to 100" in reply["message"]
    assert db_rows(server.config.audit.url) == []  # a refused message subscribes nothing
    first = await client.subscribe(*topics[:100])
    assert len(first["topics"]) == 100
    second = await client.subscribe(*topics[50:101], *[f"customer_id:{C}:u{i}" for i in range(49)])
    # 50 already held (accepted, change nothing), 49 fit, the last is over the limit.
    assert len(second["topics"]) == 99
    assert [r["code"] for r in second["rejected"]] == ["limit_exceeded"]
    assert len(server.gateway.connections[next(iter(server.gateway.connections))]
               .subscriptions) == 149
    # Room comes back after an unsubscribe.
    await client.unsubscribe(topics[0])
    assert (await client.subscribe(f"customer_id:{C}:u49"))["topics"] == [f"customer_id:{C}:u49"]


@pytest.mark.gen_test(timeout=30)
async def test_connections_per_principal_and_per_address_get_429_json(make_server):
    server = await make_server(server={"max_connections_per_principal": 2,
                                       "max_connections_per_ip": 3})
    a1 = await server.connect("admin-token")
    await server.connect("admin-token")
    status, body = await server.refused("admin-token")
    assert status == 429 and body["error"]["code"] == "too_many_connections"
    assert "per principal" in body["error"]["message"]
    await server.connect("agent-token")  # another principal, the third from this address
    status, body = await server.refused("accesskey-token")
    assert status == 429 and "per address" in body["error"]["message"]
    # A closed connection gives its place back.
    a1.close()
    await wait_for(lambda: len(server.gateway.connections) == 2)
    await server.connect("admin-token")
    assert db_rows(server.config.audit.url) == []


@pytest.mark.gen_test(timeout=60)
async def test_the_default_config_limits_connections_per_principal_with_429(make_server):
    """No limit set: one token may not hold more than 100 connections (it held
    1,500, at ~0.8 MiB each with 1,000 subscriptions, when the default was 0)."""
    server = await make_server()
    limit = server.config.server.max_connections_per_principal
    assert limit == 100
    clients = [await server.connect("admin-token") for _ in range(limit)]
    status, body = await server.refused("admin-token")
    assert status == 429 and body["error"]["code"] == "too_many_connections"
    assert "at most 100 connections per principal" in body["error"]["message"]
    await server.connect("agent-token")  # another principal is still let in
    clients[0].close()
    await wait_for(lambda: len(server.gateway.connections) == limit)
    await server.connect("admin-token")


@pytest.mark.gen_test(timeout=60)
async def test_the_default_config_limits_connections_per_address(make_node):
    """No limit per address set: the 1,001st connection from one address is
    refused (too_many_connections: 429 before the upgrade), another address is not."""
    node = await make_node(server={"max_connections_per_principal": 0})
    limit = node.gateway.config.server.max_connections_per_ip
    assert limit == 1000
    for _ in range(limit):
        await node.connect("admin-token", remote_addr="203.0.113.7")
    with pytest.raises(errors.TooManyConnections, match="at most 1000 connections per address"):
        await node.connect("admin-token", remote_addr="203.0.113.7")
    await node.connect("admin-token", remote_addr="203.0.113.8")


@pytest.mark.gen_test(timeout=30)
async def test_message_rate_past_the_limit_closes_1008(make_server):
    server = await make_server(server={"max_messages_per_second": 2})  # burst of 20
    client = await server.connect()
    await client.subscribe(CALL)
    polite = await server.connect()
    for i in range(60):
        await client.send({"type": "ping", "id": i})
    pongs = 0
    while (frame := await client.recv()) is not None:
        assert frame == {"type": "pong", "id": pongs}
        pongs += 1
    assert client.ws.close_code == 1008
    assert 10 <= pongs <= 30
    rows = await wait_for(lambda: [r for r in db_rows(server.config.audit.url)
                                   if r["action"] == "unsubscribe"])
    assert [(r["topic"], r["code"]) for r in rows] == [(CALL, "disconnect")]
    assert (await polite.request({"type": "ping"})) == {"type": "pong"}


def rejected_rows(server: Any, subject: str) -> list[dict[str, Any]]:
    return [r for r in db_rows(server.config.audit.url)
            if r["outcome"] == "rejected" and r["subject"] == subject]


@pytest.mark.gen_test(timeout=30)
async def test_flood_of_refused_topics_is_closed_1008_and_the_log_stays_bounded(make_server):
    # The review's finding: a client with no rights sent subscribes of 100 refused
    # topics each as fast as it could, and every topic became an audit row.
    server = await make_server()  # max_rejected_topics_per_minute: the default, 100
    flooder = await server.connect("agent-token")  # bob: no customer-wide rights
    polite = await server.connect("admin-token")
    reply = await polite.subscribe(CALL, f"customer_id:{OTHER_CUSTOMER}", "not a topic")
    assert reply["topics"] == [CALL] and len(reply["rejected"]) == 2
    refused = [f"customer_id:{C}:call:{i}" for i in range(100)]
    for i in range(30):
        await flooder.send({"type": "subscribe", "topics": refused, "id": i})
    replies = []
    while (frame := await flooder.recv()) is not None:
        replies.append(frame)
    assert flooder.ws.close_code == 1008
    assert flooder.ws.close_reason == "too many refused topics: more than 100 in a minute"
    # 100 refusals are within the limit; the message that passed it was still answered
    # (and recorded), and nothing after it was.
    assert [r["id"] for r in replies] == [0, 1]
    assert all(r["type"] == "subscribed" and r["topics"] == [] for r in replies)
    assert all([x["code"] for x in r["rejected"]] == ["forbidden"] * 100 for r in replies)
    rows = rejected_rows(server, "bob")
    assert len(rows) == 200  # at most the limit plus one message's 100 topics
    assert {r["code"] for r in rows} == {"forbidden"}
    # Only that connection: a client with a few refusals goes on, events reach it.
    assert (await server.post(event()))[0] == 202
    assert (await polite.recv())["topic"] == CALL
    assert len(rejected_rows(server, "alice")) == 2


@pytest.mark.gen_test(timeout=30)
async def test_refused_topics_of_every_code_count_up_to_the_limit_and_not_past_it(make_server):
    server = await make_server(server={"max_rejected_topics_per_minute": 10,
                                       "max_subscriptions": 3})
    client = await server.connect("admin-token")
    forbidden = [f"customer_id:{OTHER_CUSTOMER}:call:{i}" for i in range(6)]
    reply = await client.subscribe(CALL, f"customer_id:{C}:a", forbidden[0], "not a topic")
    assert [r["code"] for r in reply["rejected"]] == ["forbidden", "invalid_topic"]  # 2
    reply = await client.subscribe(f"customer_id:{C}:b", f"customer_id:{C}:c")
    assert [r["code"] for r in reply["rejected"]] == ["limit_exceeded"]  # 3
    reply = await client.unsubscribe(f"customer_id:{C}:a", f"customer_id:{C}:z", "::")
    assert reply["topics"] == [f"customer_id:{C}:a"]
    assert [r["code"] for r in reply["rejected"]] == ["not_subscribed", "invalid_topic"]  # 5
    reply = await client.subscribe(*forbidden[1:])
    assert [r["code"] for r in reply["rejected"]] == ["forbidden"] * 5  # 10: the limit
    # At the limit, not past it: the connection is served as before.
    assert (await client.request({"type": "ping"})) == {"type": "pong"}
    assert (await server.post(event()))[0] == 202
    assert (await client.recv())["topic"] == CALL
    # One more refused topic: its reply still comes, then the close (here with a
    # topic of a new scope, whose reply waits for the broker).
    reply = await client.subscribe(f"agent_id:{AGENT}", f"customer_id:{OTHER_CUSTOMER}")
    assert reply["topics"] == [f"agent_id:{AGENT}"]
    assert [r["code"] for r in reply["rejected"]] == ["forbidden"]
    assert await client.closed() == 1008
    assert "too many refused topics" in (client.ws.close_reason or "")
    assert len(rejected_rows(server, "alice")) == 11
    # The subscriptions it held end like any other closed connection's.
    ends = await wait_for(lambda: [r for r in db_rows(server.config.audit.url)
                                   if r["action"] == "unsubscribe" and r["code"] == "disconnect"])
    assert sorted(r["topic"] for r in ends) == sorted([CALL, f"customer_id:{C}:b",
                                                       f"agent_id:{AGENT}"])


@pytest.mark.gen_test(timeout=60)
async def test_audit_unavailable_is_not_counted_against_the_client(make_server):
    server = await make_server(server={"max_rejected_topics_per_minute": 1})
    client = await server.connect("admin-token")
    topics = [f"customer_id:{C}:t{i}" for i in range(5)]
    # Make the store unwritable: another writer holds SQLite's write lock.
    blocker = sa.create_engine(server.config.audit.url,
                               connect_args={"timeout": 0.1, "isolation_level": None})
    try:
        with blocker.connect() as db:
            db.exec_driver_sql("BEGIN IMMEDIATE")
            for _ in range(2):
                reply = await client.request({"type": "subscribe", "topics": topics}, timeout=30)
                assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"] * 5
            db.exec_driver_sql("ROLLBACK")
    finally:
        blocker.dispose()
    # Ten refusals, all the server's fault: the connection is still served.
    await client.subscribe_until_accepted(CALL)
    # The client's own refusals do count: one is the limit, two are past it.
    assert len((await client.subscribe(f"customer_id:{OTHER_CUSTOMER}"))["rejected"]) == 1
    assert len((await client.subscribe(f"customer_id:{OTHER_CUSTOMER}:x"))["rejected"]) == 1
    assert await client.closed() == 1008


def test_minute_count_forgets_what_is_older_than_a_minute():
    # A client that refuses a few topics now and then, for hours, never reaches the
    # limit: only the last 60 seconds count.
    window = MinuteCount()
    assert window.add(60, now=1000.0) == 60
    assert window.add(30, now=1030.0) == 90
    assert window.add(20, now=1059.9) == 110
    assert window.add(5, now=1060.0) == 55     # the 60 at t=1000 is a minute old
    assert window.add(0, now=1119.95) == 5   # and those of t=1030 and t=1059.9
    assert window.add(1, now=5000.0) == 1


@pytest.mark.gen_test(timeout=30)
async def test_slowloris_headers_are_cut_at_the_idle_timeout(make_server):
    server = await make_server(server={"idle_connection_timeout": 1.0, "body_timeout": 1.0})
    reader, writer = await raw_http(server.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 400
    started = time.monotonic()
    closed_after = None
    try:
        for byte in request:  # one byte every 20 ms: the headers never end in time
            writer.write(bytes((byte,)))
            await writer.drain()
            if reader.at_eof() or writer.is_closing():
                break
            try:
                data = await asyncio.wait_for(reader.read(100), 0.02)
            except TimeoutError:
                continue
            if not data:
                break
            raise AssertionError(f"answered an incomplete request: {data!r}")
        closed_after = time.monotonic() - started
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None and 0.9 <= closed_after < 3.0, closed_after


@pytest.mark.gen_test(timeout=30)
async def test_incomplete_body_and_idle_keepalive_are_cut(make_server):
    server = await make_server(server={"idle_connection_timeout": 1.0, "body_timeout": 1.0})
    reader, writer = await raw_http(server.port)
    try:
        writer.write(b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + INGEST_KEY.encode() + b"\r\n"
                     b"Content-Length: 500\r\n\r\n{\"type\":")
        await writer.drain()
        started = time.monotonic()
        data = await read_until_closed(reader, 5.0)
        assert data == b""  # no answer to half a body; just closed
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        writer.close()
    # A keep-alive connection that sends nothing after its request is closed too.
    reader, writer = await raw_http(server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        started = time.monotonic()
        data = await read_until_closed(reader, 5.0)
        assert data.startswith(b"HTTP/1.1 200")
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_chunked_body_over_the_limit_is_413_before_it_is_read(make_server):
    server = await make_server(ingest={"max_body_bytes": 1000})
    reader, writer = await raw_http(server.port)
    try:
        writer.write(b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + INGEST_KEY.encode() + b"\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (600, b" " * 600))
        writer.write(b"%x\r\n%s" % (10**8, b" " * 1000))  # announces 100 MB, sends 1000 B
        await writer.drain()
        data = await read_until_closed(reader, 5.0)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b'"payload_too_large"' in data


@pytest.mark.gen_test(timeout=60)
async def test_refused_renewals_count_against_the_same_limit(make_server):
    """Each refused ``authenticate`` writes a rejected audit row: past the limit, 1008."""
    server = await make_server(server={"max_rejected_topics_per_minute": 3})
    client = await server.connect("admin-token")
    for i in range(3):
        reply = await client.request({"type": "authenticate", "token": f"nope-{i}", "id": i})
        assert (reply["type"], reply["code"]) == ("error", "unauthenticated")
    reply = await client.request({"type": "authenticate", "token": "nope-3", "id": 3})
    assert reply["code"] == "unauthenticated"  # answered, then closed
    assert await client.closed() == 1008
    renewals = [r for r in db_rows(server.config.audit.url) if r["action"] == "renew"]
    assert len(renewals) == 4
