"""Scoped review keys (SPEC §6): GET /v1.0/audit, its CSV export and verify, on
SQLite and PostgreSQL, with rows of two customers."""

from __future__ import annotations

import csv
import io
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
from tests.audit_helpers import KEY1, Backend, awrite_log, conn_info, rec, topic
from tests.conftest import CUSTOMER, OTHER_CUSTOMER
from wsgate.adapters.audit_api import audit_routes
from wsgate.adapters.review import review_routes
from wsgate.audit.query import FIELDS, AuditReader
from wsgate.config import ScopedSecret

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

FULL_KEY = "audit-all"
ACME_KEY = "audit-acme"
OTHER_KEY = "audit-other"
SECRET_TOPIC = f"customer_id:{OTHER_CUSTOMER}:call:secret-call"


def scoped(key: str, *customers: str) -> ScopedSecret:
    secret = ScopedSecret(key)
    secret.customers = frozenset(customers)
    return secret


class API:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.client = tornado.httpclient.AsyncHTTPClient()

    async def get(self, path: str, key: str, **params: Any) -> tuple[int, bytes]:
        url = f"{self.base}{path}" + (f"?{urlencode(params)}" if params else "")
        resp = await self.client.fetch(url, headers={"Authorization": f"Bearer {key}"},
                                       raise_error=False)
        return resp.code, resp.body


@pytest.fixture
def api(io_loop: Any, backend: Backend) -> Iterator[API]:
    keys = (ScopedSecret(FULL_KEY), scoped(ACME_KEY, CUSTOMER), scoped(OTHER_KEY, OTHER_CUSTOMER))
    reader = AuditReader(backend.engine(), backend.key.public_key(), ())
    app = tornado.web.Application([*audit_routes(reader, keys), *review_routes(reader, keys)])
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    yield API(port)
    server.stop()
    io_loop.run_sync(server.close_all_connections)


async def two_customers(backend: Backend) -> None:
    """5 rows of CUSTOMER (alice) and 3 of OTHER_CUSTOMER (an access key), interleaved."""
    other = conn_info("c2", KEY1)
    await awrite_log(backend, [("sub", [
        rec(topic("call", "a1")), rec(SECRET_TOPIC, conn=other), rec(topic("call", "a2")),
        rec(topic("call", "a3")), rec(topic("call", "b", customer=OTHER_CUSTOMER), conn=other),
        rec(topic("call", "a4")), rec(topic("q", customer=OTHER_CUSTOMER), conn=other),
        rec(topic("call", "a5"))])])


async def all_rows(api: API, key: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
        status, body = await api.get("/v1.0/audit", key, **extra)
        assert status == 200, body
        page = json.loads(body)
        rows += page["rows"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


@pytest.mark.gen_test(timeout=60)
async def test_a_scoped_key_pages_only_its_customers_rows(backend: Backend, api: API) -> None:
    await two_customers(backend)
    assert len(await all_rows(api, FULL_KEY)) == 8
    acme = await all_rows(api, ACME_KEY)
    assert len(acme) == 5 and {r["customer_id"] for r in acme} == {CUSTOMER}
    other = await all_rows(api, OTHER_KEY)
    assert len(other) == 3 and {r["customer_id"] for r in other} == {OTHER_CUSTOMER}
    # Its own customer as a filter is fine; with other filters too.
    assert len(await all_rows(api, ACME_KEY, customer=CUSTOMER)) == 5
    assert await all_rows(api, ACME_KEY, topic_prefix=f"customer_id:{OTHER_CUSTOMER}") == []
    assert await all_rows(api, ACME_KEY, subject="key-1") == []


@pytest.mark.gen_test(timeout=60)
async def test_another_customers_filter_and_verify_are_403_without_row_content(
        backend: Backend, api: API) -> None:
    await two_customers(backend)
    for path in ("/v1.0/audit", "/v1.0/audit/export.csv"):
        status, body = await api.get(path, ACME_KEY, customer=OTHER_CUSTOMER)
        assert status == 403, body
        assert json.loads(body)["error"]["code"] == "forbidden"
        assert b"secret-call" not in body and b"key-1" not in body
    status, body = await api.get("/v1.0/audit/verify", ACME_KEY)
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden", body
    assert b"secret-call" not in body
    status, body = await api.get("/v1.0/audit/verify", FULL_KEY)
    assert status == 200 and json.loads(body)["ok"] is True, body


@pytest.mark.gen_test(timeout=60)
async def test_a_scoped_keys_csv_export_holds_only_its_customers_rows(
        backend: Backend, api: API) -> None:
    await two_customers(backend)
    status, body = await api.get("/v1.0/audit/export.csv", ACME_KEY)
    assert status == 200
    exported = list(csv.reader(io.StringIO(body.decode())))
    assert tuple(exported[0]) == FIELDS
    rows = [dict(zip(FIELDS, r, strict=True)) for r in exported[1:]]
    assert len(rows) == 5 and {r["customer_id"] for r in rows} == {CUSTOMER}
    assert b"secret-call" not in body and OTHER_CUSTOMER.encode() not in body
    status, body = await api.get("/v1.0/audit/export.csv", FULL_KEY)
    assert status == 200 and len(body.decode().strip().split("\n")) == 9
