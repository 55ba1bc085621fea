"""Hostile input to the audit API (issue 16, item 8): every bad parameter is a 400
naming it, never a 500 or a false 503, on SQLite and on PostgreSQL.

Routes: ``GET /v1.0/audit``, ``/v1.0/audit/verify`` and ``/v1.0/audit/export.csv``;
the same time parser serves ``wsgate audit`` (``--since``, ``--until``,
``--before``, and a bundle export's window).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from tests import audit_helpers
from tests.audit_helpers import Backend, awrite_log, minutes, rec, topic, write_log
from tests.test_audit_query import run_cli, write_config
from wsgate.adapters.audit_api import audit_routes
from wsgate.adapters.review import review_routes
from wsgate.audit import query, store
from wsgate.audit.query import AuditReader

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

API_KEY = "audit-key-1"
ROWS = "/v1.0/audit"
VERIFY = "/v1.0/audit/verify"
EXPORT = "/v1.0/audit/export.csv"
#: Times that parse but are out of datetime's range once converted to UTC.
OVERFLOW_TIMES = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59",
                  "9999-12-31T23:59:59.999999-00:01"]


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.client = tornado.httpclient.AsyncHTTPClient()

    async def get(self, path: str, raw_query: str = "",
                  **params: str) -> tuple[int, bytes]:
        """GET with a query string built as given (raw_query is sent as it is)."""
        parts = [raw_query] if raw_query else []
        parts += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items()]
        url = f"{self.base}{path}" + ("?" + "&".join(parts) if parts else "")
        resp = await self.client.fetch(url, headers={"Authorization": f"Bearer {API_KEY}"},
                                       raise_error=False)
        return resp.code, resp.body

    async def error(self, path: str, raw_query: str = "", **params: str) -> tuple[int, str, str]:
        """(status, error code, message) of an answer expected to be an error."""
        status, body = await self.get(path, raw_query, **params)
        err = json.loads(body)["error"]
        return status, err["code"], err["message"]


@pytest.fixture
def serve(io_loop: Any, backend: Backend) -> Iterator[Any]:
    servers: list[tornado.httpserver.HTTPServer] = []

    def start(reader: AuditReader | None = None) -> Client:
        reader = reader or AuditReader(backend.engine(), backend.key.public_key())
        app = tornado.web.Application(audit_routes(reader, (API_KEY,))
                                      + review_routes(reader, (API_KEY,)))
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        servers.append(server)
        return Client(port)

    yield start
    for s in servers:
        s.stop()
        io_loop.run_sync(s.close_all_connections)


def cursor_of(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def no_tracebacks(caplog: Any) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in caplog.text


# --- times ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", OVERFLOW_TIMES)
def test_parse_time_out_of_range_is_a_filter_error(value: str) -> None:
    with pytest.raises(query.FilterError, match="since: .* is out of range"):
        query.parse_time(value, "since")
    with pytest.raises(query.FilterError, match="until: "):
        query.AuditFilter.parse(until=value)


@pytest.mark.gen_test(timeout=30)
async def test_a_time_out_of_range_is_400_naming_it(backend: Backend, serve: Any,
                                                    caplog: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0))])])
    api = serve()
    for path in (ROWS, EXPORT):
        for name in ("since", "until"):
            for value in OVERFLOW_TIMES:
                status, code, message = await api.error(path, **{name: value})
                assert (status, code) == (400, "bad_request"), (path, name, value)
                assert message.startswith(f"{name}: "), message
    no_tracebacks(caplog)


def test_cli_times_out_of_range_exit_2(backend: Backend, capsys: Any, tmp_path: Path) -> None:
    write_log(backend, [("sub", [rec(topic("a"), at=minutes(0))])])
    cfg = write_config(backend)
    late = OVERFLOW_TIMES[0]
    for argv, name in [(("query", "--since", late), "since"),
                       (("query", "--until", late), "until"),
                       (("export", "--since", late), "since"),
                       (("export", "--bundle", str(tmp_path / "b.jsonl"), "--until", late),
                        "until"),
                       (("prune", "--before", late), "--before")]:
        assert run_cli("audit", *argv, "--config", cfg) == 2, argv
        err = capsys.readouterr().err
        assert f"wsgate audit: {name}: " in err and "out of range" in err, (argv, err)


# --- cursors -------------------------------------------------------------------------

BIG = 2 ** 63


@pytest.mark.gen_test(timeout=30)
async def test_a_cursor_out_of_the_columns_range_is_400(backend: Backend, serve: Any,
                                                        caplog: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0))])])
    api = serve()
    at = "2024-05-01T12:00:00.123456Z"
    for bad in ([at, 10 ** 30], [at, BIG], [at, -BIG - 1], [at, True], [at, 1.5],
                ["2024-13-01T00:00:00.000000Z", 1], ["2024-5-1T1:2:3.5Z", 1],
                ["2024-05-01T12:00:00.123456Z\x00", 1], [at, 1, 2], [at], {"a": 1},
                "[" * 3000, [at, int("9" * 400)]):
        cursor = cursor_of(bad) if not isinstance(bad, str) else \
            base64.urlsafe_b64encode(bad.encode()).decode()
        status, code, message = await api.error(ROWS, cursor=cursor)
        assert (status, code) == (400, "bad_request"), (bad, status, message)
        assert message == "cursor: not a cursor this API returned", message
    # The ends of the 64-bit range are cursors: they just find nothing after them.
    for row_id in (BIG - 1, -BIG):
        status, body = await api.get(ROWS, cursor=cursor_of([at, row_id]))
        assert status == 200, body
        assert len(json.loads(body)["rows"]) == (0 if row_id > 0 else 1)
    no_tracebacks(caplog)


def test_cursor_decode_checks_range_and_time() -> None:
    at = "2024-05-01T12:00:00.123456Z"
    assert query._cursor_decode(cursor_of([at, BIG - 1])) == (at, BIG - 1)
    for bad in ([at, 10 ** 30], [at, BIG], [at, -BIG - 1], [at, False],
                ["9999-99-99T00:00:00.000000Z", 1]):
        with pytest.raises(query.FilterError, match="not a cursor this API returned"):
            query._cursor_decode(cursor_of(bad))


@pytest.mark.gen_test(timeout=60)
async def test_a_store_that_is_down_is_still_503(backend: Backend, serve: Any,
                                                 tmp_path: Path) -> None:
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0))])])
    if backend.name == "sqlite":
        # A SQLite store whose file cannot be opened (its directory is gone).
        url = f"sqlite:///{tmp_path / 'gone' / 'audit.db'}"
    else:
        url = backend.outage_url()
    engine = store.make_engine(url)
    backend.engines.append(engine)
    api = serve(AuditReader(engine, backend.key.public_key()))
    if backend.name != "sqlite":
        status, _ = await api.get(ROWS)
        assert status == 200
        backend.cut()
    try:
        for path in (ROWS, VERIFY, EXPORT):
            status, code, _ = await api.error(path)
            assert (status, code) == (503, "audit_unavailable"), path
        # A good cursor with a store that is down is a 503, not a 400.
        status, code, _ = await api.error(ROWS, cursor=cursor_of(
            ["2024-05-01T12:00:00.123456Z", 5]))
        assert (status, code) == (503, "audit_unavailable")
    finally:
        backend.restore()


# --- numbers -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_limit_is_ascii_digits_from_1_to_1000(backend: Backend, serve: Any,
                                                    caplog: Any) -> None:
    await awrite_log(backend, [("sub", [rec(topic(str(i)), at=minutes(i)) for i in range(6)])])
    api = serve()
    for bad in ("\u0665", "\uff15", "\u00b2", "+5", "5_0", " 5", "5.0", "1e2", "-1", "0",
                "1001", "0x10", "00005", "9" * 5000, "", "5\x00"):
        status, code, message = await api.error(ROWS, limit=bad)
        assert (status, code) == (400, "bad_request"), (bad, status)
        assert message == "limit: must be a whole number from 1 to 1000 in ASCII digits", message
    for good, rows in (("5", 5), ("0005", 5), ("1000", 6), ("1", 1)):
        status, body = await api.get(ROWS, limit=good)
        assert status == 200 and len(json.loads(body)["rows"]) == rows, good
    no_tracebacks(caplog)


# --- every parameter, hostile values -------------------------------------------------

HOSTILE = ["\x00", "a\x00b", "x" * 5000, "\u00e9\u00e8\u4e2d\U0001f600", "\u202e\u0665",
           "-1", "-9223372036854775809", "1.5", "1e309", "NaN", "inf", "'; DROP TABLE x; --",
           "%", "_", "\\", "2024-05-01T12:00:00\x00Z", "2024-05-01T12:00:00.5Z",
           "99999-01-01", "2024-05-01T25:00", "\u0662\u0660\u0662\u0664-05-01",
           "customer_id:", ":::", "null", "[]", " ", OVERFLOW_TIMES[0],
           # The values of the findings above, at every parameter.
           cursor_of(["2024-05-01T12:00:00.123456Z", 10 ** 30]),
           base64.urlsafe_b64encode(b"[" * 3000).decode(), "\u0665"]
#: Raw query strings: bytes that are not UTF-8, and each kind of repeated parameter.
RAW = ["{name}=%FF", "{name}=%ED%A0%80", "{name}=%C0%80", "{name}=a&{name}=b",
       "{name}=1&{name}=1", "{name}&{name}="]

ROW_PARAMS = ("customer", "agent", "subject", "topic_prefix", "connection", "outcome",
              "since", "until", "limit", "cursor")
ROUTES = {ROWS: ROW_PARAMS, EXPORT: ROW_PARAMS[:8], VERIFY: ()}


@pytest.mark.gen_test(timeout=240)
async def test_hostile_values_are_400_or_200_never_5xx(backend: Backend, serve: Any,
                                                       caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    await awrite_log(backend, [("sub", [rec(topic("a"), at=minutes(0))])])
    api = serve()
    seen: dict[int, int] = {}
    for path, names in ROUTES.items():
        # Parameters a route does not take are ignored; a hostile one is too.
        for name in names or ("limit", "cursor", "since"):
            for value in HOSTILE:
                status, body = await api.get(path, **{name: value})
                assert status in (200, 400), (path, name, value[:40], status, body[:300])
                if names and ("\x00" in value or len(value) > 600):
                    # Refused, not silently cut or dropped (Tornado drops NUL).
                    assert status == 400, (path, name, value[:40])
                if status == 400:
                    err = json.loads(body)["error"]
                    assert err["code"] == "bad_request" and err["message"], err
                    assert len(err["message"]) < 400, err
                seen[status] = seen.get(status, 0) + 1
            for raw in RAW:
                status, body = await api.get(path, raw.format(name=name))
                assert status in (200, 400), (path, raw, status, body[:300])
                if names and "&" in raw:
                    # A parameter given twice is refused, not one of them picked.
                    assert status == 400, (path, raw)
                    err = json.loads(body)["error"]
                    assert err["message"] == f"{name}: given more than once", err
    assert seen.get(400) and seen.get(200)
    no_tracebacks(caplog)


@pytest.mark.parametrize("name", ["customer", "agent", "subject", "topic_prefix",
                                  "connection"])
def test_text_filters_refuse_nul_and_overlong_values(name: str) -> None:
    with pytest.raises(query.FilterError, match=f"{name}: must not contain NUL"):
        query.AuditFilter.parse(**{name: "a\x00b"})
    with pytest.raises(query.FilterError, match=f"{name}: at most 600 characters"):
        query.AuditFilter.parse(**{name: "x" * 601})
    with pytest.raises(query.FilterError, match=f"{name}: not valid UTF-8"):
        query.AuditFilter.parse(**{name: "a\udcff"})
    assert getattr(query.AuditFilter.parse(**{name: "x" * 600}), name) == "x" * 600
