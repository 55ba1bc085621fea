"""/metrics after scripted sessions, its protection, and /healthz and /readyz transitions."""

import json
import sqlite3

import pytest
import tornado.httpclient
import tornado.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    CUSTOMER,
    OTHER_CUSTOMER,
    Server,
    base_config,
    event,
    wait_for,
)
from wsgate.adapters.server import serve_metrics
from wsgate.app import build_gateway
from wsgate.audit.writer import AuditWriter
from wsgate.config import ConfigError, config_from_dict

X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"
CALL = f"customer_id:{CUSTOMER}:call:{X}"
FOREIGN = f"customer_id:{OTHER_CUSTOMER}:call"
METRICS_KEY = "metrics-key"
METRICS = {"keys": [METRICS_KEY]}


async def get(url, headers=None):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        url, headers=headers or {}, raise_error=False)
    return response.code, response.body.decode()


async def scrape(server, key=METRICS_KEY):
    """The scraped samples as {(name, ((label, value), ...)): value}."""
    code, text = await get(server.base + "/metrics", {"Authorization": f"Bearer {key}"})
    assert code == 200, text
    return parse(text)


def parse(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- what a session leaves in /metrics -------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_scripted_session_shows_in_metrics(make_server):
    server = await make_server(metrics=METRICS)
    admin = await server.connect("admin-token")
    reply = await admin.subscribe(CALL, FOREIGN, "customer_id:not-a-uuid")
    assert reply["topics"] == [CALL]
    assert {r["code"] for r in reply["rejected"]} == {"forbidden", "invalid_topic"}
    agent = await server.connect("agent-token")
    reply = await agent.subscribe(f"customer_id:{CUSTOMER}")
    assert reply["rejected"][0]["code"] == "forbidden"
    leaving = await server.connect("accesskey-token")
    await leaving.subscribe(CALL)

    assert (await server.post({"events": [event(), event("call_updated")]}))[0] == 202
    assert (await server.post(event(), key="not-the-key"))[0] == 401
    for _ in range(2):
        assert (await admin.recv())["topic"] == CALL
    for _ in range(2):
        await leaving.recv()
    leaving.ws.close(1000)
    await wait_for(lambda: len(server.gateway.connections) == 2)

    m = await scrape(server)
    assert value(m, "wsgate_connections") == 2
    assert value(m, "wsgate_subscriptions") == 1
    assert value(m, "wsgate_subscribe_rejected_total", code="forbidden") == 2
    assert value(m, "wsgate_subscribe_rejected_total", code="invalid_topic") == 1
    assert value(m, "wsgate_disconnects_total", code="1000") == 1
    assert value(m, "wsgate_events_received_total") == 2
    assert value(m, "wsgate_messages_delivered_total") == 4
    assert value(m, "wsgate_slow_consumer_closes_total") == 0
    assert value(m, "wsgate_ingest_requests_total", status="202") == 1
    assert value(m, "wsgate_ingest_requests_total", status="401") == 1
    assert value(m, "wsgate_ingest_events_accepted_total") == 2
    assert value(m, "wsgate_ingest_seconds_count") == 2
    # One observation per event per node, not per connection it reached.
    assert value(m, "wsgate_delivery_seconds_count") == 2
    assert value(m, "wsgate_audit_write_seconds_count") == 3
    assert value(m, "wsgate_audit_up") == 1
    assert value(m, "wsgate_broker_up") == 1
    assert value(m, "wsgate_history_events") == 2
    assert value(m, "wsgate_draining") == 0


@pytest.mark.gen_test(timeout=30)
async def test_slow_consumer_close_is_counted(make_server):
    # With a 1-byte output limit the first event frame makes the reader "slow".
    server = await make_server(metrics=METRICS, server={"max_output_buffer": 1})
    client = await server.connect("admin-token")
    await client.subscribe(CALL)
    assert (await server.post(event()))[0] == 202
    assert await client.closed() == 4008
    await wait_for(lambda: not server.gateway.connections)
    m = await scrape(server)
    assert value(m, "wsgate_slow_consumer_closes_total") == 1
    assert value(m, "wsgate_disconnects_total", code="4008") == 1
    assert value(m, "wsgate_connections") == 0


@pytest.mark.gen_test(timeout=30)
async def test_each_gateway_has_its_own_registry(make_server):
    first = await make_server(metrics=METRICS)
    second = await make_server(metrics=METRICS)
    await (await first.connect()).subscribe(CALL)
    assert value(await scrape(first), "wsgate_connections") == 1
    assert value(await scrape(second), "wsgate_connections") == 0


# -- protection ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_metrics_on_the_main_port_need_a_key(make_server):
    server = await make_server(metrics=METRICS)
    code, body = await get(server.base + "/metrics")
    assert code == 401 and json.loads(body)["error"]["code"] == "unauthenticated"
    code, body = await get(server.base + "/metrics", {"Authorization": "Bearer wrong"})
    assert code == 401 and "not accepted" in body


@pytest.mark.gen_test(timeout=20)
async def test_metrics_are_off_on_the_main_port_by_default(make_server):
    server = await make_server()
    code, body = await get(server.base + "/metrics",
                           {"Authorization": f"Bearer {METRICS_KEY}"})
    assert code == 404
    assert "[metrics] keys" in json.loads(body)["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_separate_metrics_listener_serves_without_a_key(make_server):
    server = await make_server()
    sock, port = tornado.testing.bind_unused_port()
    listener = serve_metrics(server.gateway, server.gateway.metrics, [sock])
    assert listener is not None
    try:
        await server.connect()
        code, text = await get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert value(parse(text), "wsgate_connections") == 1
        code, _ = await get(f"http://127.0.0.1:{port}/v1.0/events")
        assert code == 404
    finally:
        listener.stop()
        await listener.close_all_connections()


def test_no_separate_listener_unless_configured(tmp_path):
    gateway = build_gateway(base_config(tmp_path))
    assert serve_metrics(gateway, gateway.metrics) is None


@pytest.mark.parametrize("table, message", [
    ({"port": 70000}, "[metrics] port: must be 1 to 65535"),
    ({"port": 8080}, "[metrics] port: must differ from [server] port"),
    ({"keys": "one"}, "[metrics] keys: must be a list"),
])
def test_bad_metrics_config_names_the_key(table, message):
    raw = {"server": {"port": 8080}, "metrics": table}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw, source="t.toml")


# -- health and readiness -------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_healthz_answers(make_server):
    server = await make_server()
    code, body = await get(server.base + "/healthz")
    assert code == 200 and json.loads(body) == {"status": "ok"}


async def readiness(server):
    code, body = await get(server.base + "/readyz")
    return code, json.loads(body)


async def until_ready_is(server, wanted, timeout=10.0):
    """Poll /readyz until it answers wanted; return its body."""
    last = []

    async def answered():
        last[:] = await readiness(server)
        return last[0] == wanted

    await wait_for(answered, timeout, interval=0.02,
                   message=lambda: f"/readyz stayed {last[0]}: {last[1]}")
    return last[1]


async def quick_outage_server(tmp_path):
    """A started server whose audit writer gives up on a SQLite lock fast and retries
    often, and a connection to its database to hold that lock."""
    config = base_config(tmp_path)
    server = Server(config)
    # Short SQLite lock wait and retry interval keep the outage quick to see.
    server.gateway = build_gateway(config, audit=AuditWriter(
        config.audit, "test-node", retry_interval=0.05, busy_timeout_ms=50))
    await server.start()
    return server, sqlite3.connect(str(tmp_path / "audit.db"), isolation_level=None)


@pytest.mark.gen_test(timeout=30)
async def test_readyz_follows_a_locked_audit_store(tmp_path):
    server, lock = await quick_outage_server(tmp_path)
    try:
        held = await server.connect("admin-token")
        assert (await held.subscribe(CALL))["topics"] == [CALL]
        code, body = await readiness(server)
        assert code == 200 and body["ready"] is True

        # Another writer holds the database: audit writes fail.
        lock.execute("BEGIN IMMEDIATE")
        other = await server.connect("accesskey-token")
        reply = await other.subscribe(CALL)
        assert reply["rejected"][0]["code"] == "audit_unavailable"
        code, body = await readiness(server)
        assert code == 503
        assert body == {"ready": False,
                        "checks": {"audit": False, "broker": True, "accepting": True}}
        # An unsubscribe during the outage goes to the journal.
        assert (await held.unsubscribe(CALL))["topics"] == [CALL]

        lock.execute("ROLLBACK")
        body = await until_ready_is(server, 200)
        assert body["checks"]["audit"] is True
        assert (await other.subscribe(CALL))["topics"] == [CALL]
    finally:
        lock.close()
        await server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_readyz_is_503_while_draining(make_server):
    server = await make_server()
    await server.gateway.shutdown()
    code, body = await readiness(server)
    assert code == 503 and body["checks"]["accepting"] is False


@pytest.mark.gen_test(timeout=30)
async def test_readyz_recovers_without_a_new_write(tmp_path):
    """Only subscribes failed (nothing journaled): the writer probes the store by itself."""
    server, lock = await quick_outage_server(tmp_path)
    try:
        client = await server.connect("admin-token")
        lock.execute("BEGIN IMMEDIATE")
        assert (await client.subscribe(CALL))["rejected"][0]["code"] == "audit_unavailable"
        assert (await readiness(server))[0] == 503
        lock.execute("ROLLBACK")
        body = await until_ready_is(server, 200)
        assert body["checks"]["audit"] is True
    finally:
        lock.close()
        await server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_peer_close_codes_make_a_bounded_label_set(make_server):
    """A client picks its close code: 200 connections closing with 200 distinct
    codes (RFC 6455 forbids some, 3000-4999 are anyone's) leave a few series in
    wsgate_disconnects_total, not 200. A code not valid on the wire is answered
    and counted as 1002; valid private codes share one label."""
    server = await make_server(metrics=METRICS)
    invalid = [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
    private = list(range(3000, 3190))
    answers = {}
    for code in invalid + private:
        client = await server.connect("admin-token")
        client.ws.close(code)
        answers[code] = await client.closed()
    await wait_for(lambda: not server.gateway.connections)
    assert {answers[code] for code in invalid} == {1002}
    assert all(answers[code] == code for code in private)
    client = await server.connect("admin-token")
    client.ws.close(4003)  # a client may send the server's own codes: a label of their own
    assert await client.closed() == 4003
    await wait_for(lambda: not server.gateway.connections)

    code, text = await get(server.base + "/metrics", {"Authorization": f"Bearer {METRICS_KEY}"})
    assert code == 200
    series = {dict(labels)["code"]: v for (name, labels), v in parse(text).items()
              if name == "wsgate_disconnects_total"}
    assert series == {"1002": len(invalid), "3000-4999": len(private), "4003": 1}, series


def test_the_loop_histogram_is_exposed_as_prometheus_client_exposes_its_own() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from wsgate.metrics import LATENCY_BUCKETS, LoopHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("wsgate_x_seconds", "Some latency.", buckets=LATENCY_BUCKETS,
                          registry=theirs)
    mine = LoopHistogram("wsgate_x_seconds", "Some latency.", buckets=LATENCY_BUCKETS,
                         registry=ours)
    # On every bound, between bounds, below the first, past the last, zero.
    values = [*LATENCY_BUCKETS, *(b * 0.999 for b in LATENCY_BUCKETS),
              *(b * 1.001 for b in LATENCY_BUCKETS), 0.0, 1e-9, 11.0, 1e6]
    for v in values:
        reference.observe(v)
        mine.observe(v)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if "_created" not in line]

    assert lines(ours) == lines(theirs)

    def created(registry: CollectorRegistry) -> list[str]:
        return [line.rsplit(" ", 1)[0] for line in generate_latest(registry).decode().splitlines()
                if "_created" in line]

    assert created(ours) == created(theirs)
    with pytest.raises(ValueError):
        LoopHistogram("wsgate_y_seconds", "y", buckets=(1.0, 0.5), registry=ours)
