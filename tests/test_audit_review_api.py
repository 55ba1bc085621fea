"""The review page's API (issue 19): recipients, connection timeline and overview
summary, on a real Tornado server, on SQLite and on PostgreSQL.

``GET /v1.0/audit/recipients/<event_id>``, ``GET /v1.0/audit/connections/<id>``
and ``GET /v1.0/audit/summary?<filters>``: the same keys as ``GET /v1.0/audit``,
and a scoped review key sees nothing of another customer here either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from tests import audit_helpers
from tests.audit_helpers import (
    ALICE,
    CUSTOMER,
    KEY1,
    OTHER_CUSTOMER,
    Backend,
    awrite_log,
    conn_info,
    end,
    minutes,
    rec,
    topic,
)
from tests.test_audit_api import API, audit_api_servers
from tests.test_scoped_review_keys import scoped
from wsgate.audit.records import REJECTED, RENEW, EventRecord
from wsgate.plugins import Principal

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

API_KEY = "audit-key-1"
ACME_KEY = "acme-review-key"
EVENT = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"
FOREIGN_EVENT = "1d5c5d03-da9b-11ee-b3a6-5f2b4c1d2e3f"
BOB = Principal(kind="agent", subject="bob", customer_id=CUSTOMER)


@pytest.fixture
def serve(io_loop: Any, backend: Backend) -> Iterator[Any]:
    """start() -> API: the audit API with API_KEY and ACME_KEY (scoped to CUSTOMER)."""
    yield from audit_api_servers(io_loop, backend, (API_KEY, scoped(ACME_KEY, CUSTOMER)))


async def all_rows(api: API, key: str = API_KEY, **flt: Any) -> list[dict[str, Any]]:
    status, body = await api.get("/v1.0/audit", key=key, limit=1000, **flt)
    assert status == 200, body
    assert body["next_cursor"] is None
    rows: list[dict[str, Any]] = body["rows"]
    return rows


# --- summary ------------------------------------------------------------------------

async def overview_log(backend: Backend) -> None:
    """Hours 12, 13 (nothing) and 14 of 2024-05-01: alice, bob and key-1 (another
    customer) subscribe and are refused."""
    alice, bob, key1 = conn_info("c-alice"), conn_info("c-bob", BOB), conn_info("c-key1", KEY1)
    await awrite_log(backend, [("sub", [
        rec(topic("a"), at=minutes(0), conn=alice),
        rec(topic("b"), at=minutes(1), conn=alice),
        rec(topic("x"), outcome=REJECTED, code="forbidden", at=minutes(2), conn=alice),
        rec(topic("y"), outcome=REJECTED, code="forbidden", at=minutes(40), conn=bob),
        rec(topic("z"), outcome=REJECTED, code="invalid_topic", at=minutes(41), conn=bob),
        rec(topic("w"), outcome=REJECTED, code="forbidden", at=minutes(125), conn=bob),
        rec(topic("c"), at=minutes(126), conn=bob),
        rec(topic("q", customer=OTHER_CUSTOMER), outcome=REJECTED, code="forbidden",
            at=minutes(127), conn=key1),
        rec(topic("q", customer=OTHER_CUSTOMER), outcome=REJECTED, code="forbidden",
            at=minutes(128), conn=key1),
        rec(topic("q", customer=OTHER_CUSTOMER), outcome=REJECTED, code="limit_exceeded",
            at=minutes(129), conn=key1),
        rec(topic("r", customer=OTHER_CUSTOMER), at=minutes(130), conn=key1),
    ]), ("end", [end(topic("a"), at=minutes(3), conn=alice),
                 # Not a refused subscribe: counted in no chart.
                 end(topic("v"), outcome=REJECTED, code="not_subscribed", at=minutes(4),
                     conn=alice)])], signed=False)


@pytest.mark.gen_test(timeout=30)
async def test_summary_counts_hours_principals_and_codes(backend: Backend, serve: Any) -> None:
    await overview_log(backend)
    api = serve()
    status, body = await api.get("/v1.0/audit/summary")
    assert status == 200, body
    assert (body["rows"], body["subscribes"], body["refusals"]) == (13, 4, 7)
    assert [(h["hour"], h["subscribes"], h["refusals"]) for h in body["hours"]] == [
        ("2024-05-01T12:00:00Z", 2, 3), ("2024-05-01T13:00:00Z", 0, 0),
        ("2024-05-01T14:00:00Z", 2, 4)]
    assert body["hours_truncated"] is False
    # Most refusals first; a tie in subject order.
    assert body["top_refused"] == [
        {"subject": "bob", "customer_id": CUSTOMER, "refusals": 3},
        {"subject": "key-1", "customer_id": OTHER_CUSTOMER, "refusals": 3},
        {"subject": "alice", "customer_id": CUSTOMER, "refusals": 1}]
    assert body["refusals_by_code"] == [
        {"code": "forbidden", "refusals": 5}, {"code": "invalid_topic", "refusals": 1},
        {"code": "limit_exceeded", "refusals": 1}]

    # Every number is the count of the rows its link selects (the page's bars).
    for h in body["hours"]:
        hour = {"since": h["since"], "until": h["until"]}
        assert len(await all_rows(api, action="subscribe", outcome="accepted", **hour)) \
            == h["subscribes"], h
        assert len(await all_rows(api, action="subscribe", outcome="rejected", **hour)) \
            == h["refusals"], h
    for p in body["top_refused"]:
        assert len(await all_rows(api, action="subscribe", outcome="rejected",
                                  subject=p["subject"], customer=p["customer_id"])) \
            == p["refusals"], p
    for c in body["refusals_by_code"]:
        assert len(await all_rows(api, action="subscribe", outcome="rejected",
                                  code=c["code"])) == c["refusals"], c


@pytest.mark.gen_test(timeout=30)
async def test_summary_takes_the_filters_and_clips_hours_to_them(backend: Backend,
                                                                 serve: Any) -> None:
    await overview_log(backend)
    api = serve()
    since = (minutes(30)).isoformat()
    until = (minutes(127) + timedelta(seconds=30)).isoformat()
    status, body = await api.get("/v1.0/audit/summary", since=since, until=until)
    assert status == 200, body
    assert [(h["hour"], h["since"], h["until"], h["subscribes"], h["refusals"])
            for h in body["hours"]] == [
        ("2024-05-01T12:00:00Z", "2024-05-01T12:30:00.123456Z", "2024-05-01T13:00:00.000000Z",
         0, 2),
        ("2024-05-01T13:00:00Z", "2024-05-01T13:00:00.000000Z", "2024-05-01T14:00:00.000000Z",
         0, 0),
        ("2024-05-01T14:00:00Z", "2024-05-01T14:00:00.000000Z", "2024-05-01T14:07:30.123456Z",
         1, 2)]
    status, body = await api.get("/v1.0/audit/summary", subject="bob")
    assert body["refusals_by_code"] == [{"code": "forbidden", "refusals": 2},
                                        {"code": "invalid_topic", "refusals": 1}]
    status, body = await api.get("/v1.0/audit/summary", since="2030-01-01")
    assert status == 200 and body["hours"] == [] and body["rows"] == 0
    assert body["top_refused"] == [] and body["refusals_by_code"] == []
    for params, name in [({"outcome": "maybe"}, "outcome"), ({"action": "delete"}, "action"),
                         ({"since": "noon"}, "since"), ({"code": "x" * 601}, "code"),
                         ({"code": "a\x00b"}, "code")]:
        status, body = await api.get("/v1.0/audit/summary", **params)
        assert status == 400, params
        assert body["error"]["code"] == "bad_request"
        assert body["error"]["message"].startswith(name), body


@pytest.mark.gen_test(timeout=30)
async def test_a_scoped_key_summary_counts_only_its_customers(backend: Backend,
                                                              serve: Any) -> None:
    await overview_log(backend)
    api = serve()
    status, body = await api.get("/v1.0/audit/summary", key=ACME_KEY)
    assert status == 200, body
    assert (body["rows"], body["subscribes"], body["refusals"]) == (9, 3, 4)
    assert [p["subject"] for p in body["top_refused"]] == ["bob", "alice"]
    assert body["refusals_by_code"] == [{"code": "forbidden", "refusals": 3},
                                        {"code": "invalid_topic", "refusals": 1}]
    assert OTHER_CUSTOMER not in json.dumps(body) and "limit_exceeded" not in json.dumps(body)
    status, body = await api.get("/v1.0/audit/summary", key=ACME_KEY, customer=OTHER_CUSTOMER)
    assert status == 403 and body["error"]["code"] == "forbidden"


# --- connection timeline ------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_timeline_of_a_connection(backend: Backend, serve: Any) -> None:
    alice, key1 = conn_info("c-alice"), conn_info("c-key1", KEY1)
    await awrite_log(backend, [
        ("sub", [rec(topic("a"), at=minutes(0), conn=alice),
                 rec(topic("b"), at=minutes(0), conn=alice),
                 rec(topic("x"), outcome=REJECTED, code="forbidden", at=minutes(1), conn=alice),
                 rec(topic("q", customer=OTHER_CUSTOMER), at=minutes(1), conn=key1)]),
        ("end", [end(topic("a"), at=minutes(2), conn=alice),
                 end(topic("b"), code="disconnect", at=minutes(3), conn=alice)]),
    ])
    api = serve()
    status, body = await api.get("/v1.0/audit/connections/c-alice")
    assert status == 200, body
    assert body["connection_id"] == "c-alice" and body["nodes"] == ["node-a"]
    assert body["principal"] == {"kind": "agent", "subject": "alice", "customer_id": CUSTOMER,
                                 "agent_id": ALICE.agent_id, "authenticator": "static"}
    assert (body["remote_addr"], body["origin"], body["user_agent"]) == (
        "10.0.0.1", "https://app.example.com", "pytest/1.0")
    assert [(r["action"], r["topic"], r["outcome"], r["code"]) for r in body["rows"]] == [
        ("subscribe", topic("a"), "accepted", None), ("subscribe", topic("b"), "accepted", None),
        ("subscribe", topic("x"), "rejected", "forbidden"),
        ("unsubscribe", topic("a"), "accepted", "client"),
        ("unsubscribe", topic("b"), "accepted", "disconnect")]
    assert body["rows"] == await all_rows(api, connection="c-alice")
    assert body["end"] == {"at": body["last_at"], "code": "disconnect"}
    assert body["first_at"] == body["rows"][0]["occurred_at"]
    assert body["counts"] == [
        {"action": "subscribe", "outcome": "accepted", "rows": 2},
        {"action": "subscribe", "outcome": "rejected", "rows": 1},
        {"action": "unsubscribe", "outcome": "accepted", "rows": 2}]
    # Still open (its last row a subscribe): no end.
    status, body = await api.get("/v1.0/audit/connections/c-key1")
    assert status == 200 and body["end"] is None
    # Paged like the rows.
    status, body = await api.get("/v1.0/audit/connections/c-alice", limit=2)
    assert len(body["rows"]) == 2 and body["next_cursor"]
    status, body = await api.get("/v1.0/audit/connections/c-alice", limit=2,
                                 cursor=body["next_cursor"])
    assert [r["topic"] for r in body["rows"]] == [topic("x"), topic("a")]


@pytest.mark.gen_test(timeout=30)
async def test_a_revoked_renew_ends_a_timeline(backend: Backend, serve: Any) -> None:
    alice = conn_info("c-alice")
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0), conn=alice)]),
                               ("end", [end(topic("a"), code="revoked", at=minutes(1), conn=alice),
                                        rec("", action=RENEW, outcome=REJECTED, code="revoked",
                                            at=minutes(1), conn=alice)])])
    api = serve()
    status, body = await api.get("/v1.0/audit/connections/c-alice")
    assert status == 200 and body["end"]["code"] == "revoked"
    assert body["rows"][-1]["action"] == "renew"


@pytest.mark.gen_test(timeout=30)
async def test_timeline_scoping_and_bad_ids(backend: Backend, serve: Any) -> None:
    await awrite_log(backend, [("sub", [
        rec(topic("a"), at=minutes(0), conn=conn_info("c-alice")),
        rec(topic("q", customer=OTHER_CUSTOMER), at=minutes(1), conn=conn_info("c-key1", KEY1))])])
    api = serve()
    status, body = await api.get("/v1.0/audit/connections/c-alice", key=ACME_KEY)
    assert status == 200 and body["principal"]["subject"] == "alice"
    # Another customer's connection is answered exactly like one that does not exist.
    status, foreign = await api.get("/v1.0/audit/connections/c-key1", key=ACME_KEY)
    status2, unknown = await api.get("/v1.0/audit/connections/c-nobody", key=ACME_KEY)
    assert status == status2 == 404 and foreign == unknown
    assert foreign["error"]["code"] == "not_found" and "key-1" not in json.dumps(foreign)
    status, body = await api.get("/v1.0/audit/connections/c-key1")
    assert status == 200 and body["principal"]["subject"] == "key-1"
    client = tornado.httpclient.AsyncHTTPClient()
    for raw, message in [("", "connection id: missing"), ("%20", "connection id: missing"),
                         ("a%00b", "connection id: must not contain NUL"),
                         ("%FF%FE", "connection id: not valid UTF-8"),
                         ("x" * 601, "connection id: at most 600")]:
        resp = await client.fetch(f"{api.base}/v1.0/audit/connections/{raw}",
                                  headers={"Authorization": f"Bearer {API_KEY}"},
                                  raise_error=False)
        err = json.loads(resp.body)["error"]
        assert resp.code == 400 and err["code"] == "bad_request", raw
        assert err["message"].startswith(message), (raw, err)
    status, body = await api.get("/v1.0/audit/connections/c-alice", limit="0")
    assert status == 400 and body["error"]["message"].startswith("limit")
    status, body = await api.get("/v1.0/audit/connections/c-alice", key="wrong")
    assert status == 401


# --- recipients ---------------------------------------------------------------------

async def recipients_log(backend: Backend) -> None:
    """EVENT is published on CUSTOMER's call x (and on OTHER_CUSTOMER's call, as an
    unscoped ingest key may); FOREIGN_EVENT on OTHER_CUSTOMER's topics only."""
    await awrite_log(backend, [
        ("sub", [rec(topic("call"), at=minutes(0), conn=conn_info("c-alice")),
                 rec(topic("call", "x"), at=minutes(0), conn=conn_info("c-bob", BOB)),
                 rec(topic("queue"), at=minutes(0), conn=conn_info("c-queue")),
                 rec(topic("call"), at=minutes(0), conn=conn_info("c-gone")),
                 rec(topic("call", customer=OTHER_CUSTOMER), at=minutes(0),
                     conn=conn_info("c-key1", KEY1))]),
        ("end", [end(topic("call"), at=minutes(1), conn=conn_info("c-gone"))]),
        ("event", [EventRecord(EVENT, "call_created",
                               (topic("call", "x"), topic("call", customer=OTHER_CUSTOMER)),
                               "bearer:k", "ab" * 32, minutes(5)),
                   EventRecord(FOREIGN_EVENT, "call_created",
                               (topic("call", "y", customer=OTHER_CUSTOMER),),
                               "bearer:k", "cd" * 32, minutes(6))]),
        ("sub", [rec(topic("call"), at=minutes(7), conn=conn_info("c-late"))]),
    ])


@pytest.mark.gen_test(timeout=30)
async def test_recipients_of_an_event(backend: Backend, serve: Any) -> None:
    await recipients_log(backend)
    api = serve()
    status, body = await api.get(f"/v1.0/audit/recipients/{EVENT}")
    assert status == 200, body
    assert body["event"] == {
        "event_id": EVENT, "type": "call_created",
        "topics": [topic("call", "x"), topic("call", customer=OTHER_CUSTOMER)],
        "published_at": "2024-05-01T12:05:00.123456Z", "node_id": "node-a",
        "payload_sha256": "ab" * 32}
    got = sorted((r["connection_id"], r["subject"], r["subscription"], r["event_topic"])
                 for r in body["recipients"])
    assert got == [("c-alice", "alice", topic("call"), topic("call", "x")),
                   ("c-bob", "bob", topic("call", "x"), topic("call", "x")),
                   ("c-key1", "key-1", topic("call", customer=OTHER_CUSTOMER),
                    topic("call", customer=OTHER_CUSTOMER))]
    # Upper case and spaces are forgiven; anything else that is not a UUID is a 400.
    status, again = await api.get(f"/v1.0/audit/recipients/%20{EVENT.upper()}")
    assert status == 200 and again == body
    client = tornado.httpclient.AsyncHTTPClient()
    for raw in ("", "not-an-id", "a%00b", "%FF", EVENT + "0", "x" * 700):
        resp = await client.fetch(f"{api.base}/v1.0/audit/recipients/{raw}",
                                  headers={"Authorization": f"Bearer {API_KEY}"},
                                  raise_error=False)
        err = json.loads(resp.body)["error"]
        assert resp.code == 400 and err["code"] == "bad_request", raw
        assert err["message"].startswith("event id: must be the UUID"), raw
    status, body = await api.get("/v1.0/audit/recipients/2e6d6e14-da9b-11ee-b3a6-5f2b4c1d2e3f")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.gen_test(timeout=30)
async def test_a_scoped_key_sees_only_its_customers_recipients(backend: Backend,
                                                               serve: Any) -> None:
    await recipients_log(backend)
    api = serve()
    status, body = await api.get(f"/v1.0/audit/recipients/{EVENT}", key=ACME_KEY)
    assert status == 200, body
    # The other customer's topic and its subscriber are left out.
    assert body["event"]["topics"] == [topic("call", "x")]
    assert sorted(r["connection_id"] for r in body["recipients"]) == ["c-alice", "c-bob"]
    assert OTHER_CUSTOMER not in json.dumps(body)
    # An event of another customer only: the same answer as an unknown one.
    status, foreign = await api.get(f"/v1.0/audit/recipients/{FOREIGN_EVENT}", key=ACME_KEY)
    status2, unknown = await api.get(
        "/v1.0/audit/recipients/2e6d6e14-da9b-11ee-b3a6-5f2b4c1d2e3f", key=ACME_KEY)
    assert status == status2 == 404 and foreign == unknown
    status, body = await api.get(f"/v1.0/audit/recipients/{FOREIGN_EVENT}")
    assert status == 200 and [r["connection_id"] for r in body["recipients"]] == ["c-key1"]


# --- the rows' new filters ----------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_rows_filter_by_action_and_code(backend: Backend, serve: Any) -> None:
    await overview_log(backend)
    api = serve()
    rows = await all_rows(api, action="unsubscribe")
    assert [(r["action"], r["code"]) for r in rows] == [("unsubscribe", "client"),
                                                        ("unsubscribe", "not_subscribed")]
    rows = await all_rows(api, code="invalid_topic")
    assert [r["subject"] for r in rows] == ["bob"]
    status, body = await api.get("/v1.0/audit", action="delete")
    assert status == 400 and body["error"]["message"].startswith("action: must be one of")
