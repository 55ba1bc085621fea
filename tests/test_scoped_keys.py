"""Scoped ingest keys (SPEC §3 "Scoped keys") over the wire, with two customers:
the memory broker and the real Redis broker (``WSGATE_TEST_REDIS_URL``)."""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any

import pytest
import redis

from tests.conftest import (
    AGENT,
    CUSTOMER,
    INGEST_KEY,
    OTHER_CUSTOMER,
    TOKENS,
    base_config,
    event,
    service_missing,
)
from wsgate.config import ConfigError, ScopedSecret
from wsgate.events import Event

REDIS_URL = os.environ.get("WSGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: An agent of OTHER_CUSTOMER (no super admin): the review's victim.
VICTIM_AGENT = "b7e1d2c3-da9a-11ee-8f00-1a2b3c4d5e6f"
SCOPED_KEY = "acme-scoped-ingest-key"
SCOPED_SECRET = "acme-scoped-hmac-secret"
SCOPED_TOKENS = {**TOKENS, "victim-token": {
    "kind": "agent", "subject": "dave", "customer_id": OTHER_CUSTOMER,
    "agent_id": VICTIM_AGENT, "permissions": ["customer_agent"]}}


def tables(broker_url: str = "memory://") -> dict[str, Any]:
    return {"auth": {"plugin": "static", "options": {"tokens": SCOPED_TOKENS}},
            "ingest": {"keys": [INGEST_KEY, {"key": SCOPED_KEY, "customers": [CUSTOMER]}],
                       "hmac_secrets": [{"key": SCOPED_SECRET, "customers": [CUSTOMER]}]},
            "broker": {"url": broker_url}}


@pytest.fixture(params=["memory", "redis"])
def broker_url(request: Any) -> Any:
    if request.param == "memory":
        yield "memory://"
        return
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        service_missing(f"Redis at {REDIS_URL}")
    prefix = f"wsgate-test-{uuid.uuid4().hex[:10]}:"
    yield REDIS_URL + ("&" if "?" in REDIS_URL else "?") + f"prefix={prefix}"
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_scoped_key_cannot_reach_another_customers_agent(
        make_server, broker_url, tmp_path) -> None:
    server = await make_server(base_config(tmp_path, **tables(broker_url)))
    victim = await server.connect("victim-token")
    assert (await victim.subscribe(f"agent_id:{VICTIM_AGENT}"))["topics"]
    own = await server.connect("agent-token")
    assert (await own.subscribe(f"agent_id:{AGENT}"))["topics"]
    root = await server.connect("super-token")
    assert (await root.subscribe(f"agent_id:{VICTIM_AGENT}"))["topics"]

    # For its own customer, but naming the other customer's agent: accepted
    # (the agent topic is the event's own), yet delivered to nobody of OTHER_CUSTOMER.
    status, body = await server.post(event(agent_id=VICTIM_AGENT, data={"n": 1}), key=SCOPED_KEY)
    assert status == 202, body
    frame = await root.recv()  # a super admin still gets it
    assert frame["type"] == "call_created" and frame["data"] == {"n": 1}
    status, body = await server.post(event(agent_id=AGENT, data={"n": 2}), key=SCOPED_KEY)
    assert status == 202, body
    frame = await own.recv()
    assert frame["data"] == {"n": 2}
    await victim.no_frame(0.3)

    # An unscoped key behaves as before: it reaches the agent.
    status, body = await server.post(event(agent_id=VICTIM_AGENT, data={"n": 3}))
    assert status == 202, body
    assert (await victim.recv())["data"] == {"n": 3}


@pytest.mark.gen_test(timeout=30)
async def test_a_scoped_key_posting_outside_its_customers_is_403_and_publishes_nothing(
        make_server, broker_url, tmp_path) -> None:
    server = await make_server(base_config(tmp_path, **tables(broker_url)))
    watcher = await server.connect("admin-token")
    assert (await watcher.subscribe(f"customer_id:{CUSTOMER}"))["topics"]
    root = await server.connect("super-token")
    assert (await root.subscribe(f"customer_id:{OTHER_CUSTOMER}"))["topics"]

    batch = [event(data={"n": 1}), event(customer_id=OTHER_CUSTOMER, data={"n": 2}),
             event(data={"n": 3}, topics=[f"customer_id:{OTHER_CUSTOMER}:x"]),
             {"type": "call_created", "data": {}, "agent_id": AGENT}]
    status, body = await server.post({"events": batch}, key=SCOPED_KEY)
    assert status == 403, body
    assert body["error"]["code"] == "forbidden"
    assert [(d["index"], d["field"]) for d in body["error"]["details"]] == [
        (1, "customer_id"), (2, "topics"), (3, "customer_id")]
    await watcher.no_frame(0.3)
    await root.no_frame(0.05)

    # Its own customer's topics and the event's own agent topic are fine.
    status, body = await server.post(
        event(data={"n": 4}, agent_id=AGENT,
              topics=[f"customer_id:{CUSTOMER}:queue:q1", f"agent_id:{AGENT}:x"]),
        key=SCOPED_KEY)
    assert status == 202, body
    assert (await watcher.recv())["data"] == {"n": 4}


@pytest.mark.gen_test(timeout=30)
async def test_a_scoped_hmac_secret_is_held_to_its_customers(make_server, tmp_path) -> None:
    import hashlib
    import hmac
    import json
    import time

    server = await make_server(base_config(tmp_path, **tables()))

    async def signed(body: Any) -> tuple[int, Any]:
        raw = json.dumps(body).encode()
        stamp = str(int(time.time()))
        sig = hmac.new(SCOPED_SECRET.encode(), stamp.encode() + b"." + raw,
                       hashlib.sha256).hexdigest()
        return await server.post(raw, key=None, headers={
            "X-Wsgate-Timestamp": stamp, "X-Wsgate-Signature": f"v1={sig}"})

    status, body = await signed(event(customer_id=OTHER_CUSTOMER))
    assert status == 403 and body["error"]["code"] == "forbidden", body
    status, body = await signed(event())
    assert status == 202, body


@pytest.mark.gen_test(timeout=30)
async def test_the_access_line_names_the_key_id_and_scope_never_the_key(
        make_server, caplog, tmp_path) -> None:
    server = await make_server(base_config(tmp_path, **tables()))
    caplog.set_level(logging.INFO, logger="wsgate.access")
    assert (await server.post(event(), key=SCOPED_KEY))[0] == 202
    assert (await server.post(event(customer_id=OTHER_CUSTOMER), key=SCOPED_KEY))[0] == 403
    assert (await server.post(event()))[0] == 202
    lines = [r for r in caplog.records if r.name == "wsgate.access"]
    assert [(r.status, r.key_scope) for r in lines] == [  # type: ignore[attr-defined]
        (202, CUSTOMER), (403, CUSTOMER), (202, "all")]
    assert all(r.key_id.startswith("key:") for r in lines)  # type: ignore[attr-defined]
    for r in lines:
        assert SCOPED_KEY not in repr(vars(r)) and INGEST_KEY not in repr(vars(r))


def test_scoped_keys_parse_and_name_the_place_of_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BILLING_KEY", "from-env")
    cfg = base_config(tmp_path, ingest={"keys": [
        "k", {"key": {"env": "BILLING_KEY"}, "customers": [CUSTOMER, OTHER_CUSTOMER]}]},
        audit={"api_keys": [{"key": "r", "customers": [CUSTOMER]}]})
    plain, scoped = cfg.ingest.keys
    assert isinstance(scoped, ScopedSecret) and scoped == "from-env"
    assert plain.customers is None and scoped.customers == {CUSTOMER, OTHER_CUSTOMER}
    assert cfg.audit.api_keys[0].customers == {CUSTOMER}
    assert "from-env" not in repr(cfg)
    for entry, where in [({"key": "x", "customers": []}, "keys[0].customers"),
                         ({"key": "x", "customers": ["ACME"]}, "keys[0].customers[0]"),
                         ({"key": "x", "customers": [CUSTOMER.upper()]}, "keys[0].customers[0]"),
                         ({"key": "x"}, "keys[0]"),
                         ({"key": "x", "customers": [CUSTOMER], "extra": 1}, "keys[0]")]:
        with pytest.raises(ConfigError, match=re.escape(f"<test>: [ingest] {where}")):
            base_config(tmp_path, ingest={"keys": [entry]})
    with pytest.raises(ConfigError, match=r"\[ingest\] hmac_secrets\[0\]\.customers"):
        base_config(tmp_path, ingest={"hmac_secrets": [{"key": "s", "customers": "x"}]})


def test_old_redis_messages_without_an_audience_still_decode() -> None:
    wire = {"type": "call_created", "data": "{}", "topics": [f"customer_id:{CUSTOMER}"],
            "event_id": str(uuid.uuid4()), "published_at": "2026-12-07T00:00:00.000Z"}
    assert Event.from_wire(wire).audience is None
    restricted = Event.from_wire({**wire, "audience": CUSTOMER})
    assert restricted.audience == CUSTOMER and restricted.to_wire()["audience"] == CUSTOMER


@pytest.mark.gen_test(timeout=30)
async def test_a_resume_replay_skips_a_scoped_keys_event_for_another_customer(
        make_server, broker_url, tmp_path) -> None:
    server = await make_server(base_config(tmp_path, **tables(broker_url)))
    victim = await server.connect("victim-token")
    mine = f"agent_id:{VICTIM_AGENT}"
    assert (await victim.subscribe(mine))["topics"] == [mine]
    status, body = await server.post(event(customer_id=OTHER_CUSTOMER, agent_id=VICTIM_AGENT,
                                           data={"n": 0}))
    assert status == 202, body
    first = (await victim.recv())["event_id"]
    victim.close()
    status, body = await server.post(event(agent_id=VICTIM_AGENT, data={"n": 1}), key=SCOPED_KEY)
    assert status == 202, body
    status, body = await server.post(event(customer_id=OTHER_CUSTOMER, agent_id=VICTIM_AGENT,
                                           data={"n": 2}))
    assert status == 202, body
    again = await server.connect("victim-token")
    reply = await again.subscribe(mine, since=first)
    assert reply["recovered"] is True, reply
    assert (await again.recv())["data"] == {"n": 2}
    await again.no_frame(0.3)
