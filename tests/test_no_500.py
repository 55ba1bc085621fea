"""No request from outside, however malformed, makes the server answer 5xx or log a traceback.

SPEC §3, Framing: "No request from outside, however malformed, produces a 500."
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import pytest
import tornado.testing

from tests.conftest import INGEST_KEY, base_config, event
from wsgate.adapters.server import serve_metrics

AUDIT_KEY = "audit-key-no-500"
METRICS_KEY = "metrics-key-no-500"
HMAC_SECRET = "hmac-secret-no-500"


async def answer_to(port: int, data: bytes, head_only: bool, timeout: float = 5.0) -> int | None:
    """Send one request and read its whole answer; its status, or None when the
    server closed without one.

    The connection stays open until the answer is read, as a client's would
    (a peer that leaves in the middle of an answer is another story).

    Raises:
        TimeoutError: the server neither answered nor closed in time.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionResetError):
                    return None
                status = int(head[9:12])
                if status not in (100, 102, 103):
                    break  # an interim answer (100 Continue...): the answer follows
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
            if head_only or status in (101, 204, 304):
                return status
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(int(fields.get(b"content-length", b"0")))
            return status
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("path", ["/audit/review.js%00", "/audit/%00", "/audit/x%00y.css",
                                  "/audit/review.js%00?token=abc"])
async def test_a_nul_in_a_review_page_path_is_not_a_500(make_server, tmp_path, caplog, path):
    caplog.set_level(logging.DEBUG)
    server = await make_server(base_config(tmp_path, audit={"api_keys": [AUDIT_KEY]}))
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    assert await answer_to(server.port, request, False) == 404
    assert not no_server_errors(caplog)


# -- the corpus -------------------------------------------------------------------

#: Every route a client can reach, with the method and credentials that get past
#: its first check (so the malformed parts reach the code behind it).
ROUTES: dict[str, tuple[str, dict[str, str]]] = {
    "/v1.0/ws": ("GET", {"Upgrade": "websocket", "Connection": "Upgrade",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                         "Sec-WebSocket-Version": "13",
                         "Authorization": "Bearer admin-token"}),
    "/v1.0/events": ("POST", {"Content-Type": "application/json",
                              "Authorization": f"Bearer {INGEST_KEY}"}),
    "/healthz": ("GET", {}),
    "/readyz": ("GET", {}),
    "/metrics": ("GET", {"Authorization": f"Bearer {METRICS_KEY}"}),
    "/v1.0/audit": ("GET", {"Authorization": f"Bearer {AUDIT_KEY}"}),
    "/v1.0/audit/verify": ("GET", {"Authorization": f"Bearer {AUDIT_KEY}"}),
    "/v1.0/audit/export.csv": ("GET", {"Authorization": f"Bearer {AUDIT_KEY}"}),
    "/audit": ("GET", {}),
    "/audit/": ("GET", {}),
    "/audit/review.html": ("GET", {}),
    "/audit/review.js": ("GET", {}),
    "/audit/review.css": ("GET", {}),
    "/v2/unknown": ("GET", {}),
}

Request = tuple[str, str, list[tuple[bytes, bytes]], bytes]  # method, target, headers, body
Mutation = Callable[[Request], Request]


def header(name: str | bytes, value: str | bytes) -> Callable[[Request], Request]:
    """Add (or, given twice, repeat) a header, as bytes: any byte a client can send."""
    raw_name = name.encode("latin-1") if isinstance(name, str) else name
    raw_value = value.encode("latin-1") if isinstance(value, str) else value

    def mutate(req: Request) -> Request:
        method, target, headers, body = req
        kept = [(n, v) for n, v in headers if n.lower() != raw_name.lower()]
        return method, target, [*kept, (raw_name, raw_value)], body
    return mutate


def query(text: str) -> Mutation:
    return lambda req: (req[0], req[1] + ("&" if "?" in req[1] else "?") + text, req[2], req[3])


def path(suffix: str) -> Mutation:
    return lambda req: (req[0], req[1] + suffix, req[2], req[3])


def method(name: str) -> Mutation:
    return lambda req: (name, req[1], req[2], req[3])


def body(data: bytes) -> Mutation:
    return lambda req: (req[0], req[1], req[2], data)


def without(name: str) -> Mutation:
    raw = name.lower().encode()
    return lambda req: (req[0], req[1], [h for h in req[2] if h[0].lower() != raw], req[3])


SIGNED = [without("Authorization"), header("X-Wsgate-Signature", "v1=" + "0" * 64)]

MUTATIONS: dict[str, list[Mutation]] = {
    "as is": [],
    **{f"method {m!r}": [method(m)] for m in
       ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "get", "FOO",
        "G\x00T", "CONNECT"]},
    "%00 in path": [path("%00")], "NUL in path": [path("\x00")],
    "%ff in path": [path("%ff")], "%c0%ae in path": [path("%c0%ae%c0%ae/")],
    "dot segments": [path("/../../../etc/passwd")], "%2e%2e": [path("/%2e%2e/%2e%2e/x")],
    "long path": [path("/" + "a" * 9000)], "backslash": [path("\\..\\x")],
    "query %": [query("%")], "query %zz": [query("%zz=1")], "query %ff": [query("a=%ff")],
    "query token %ff": [query("token=%ff")], "query empty": [query("&&=&=x&")],
    "query limit -1": [query("limit=-1")], "query limit huge": [query("limit=" + "9" * 5000)],
    "query limit \u00b2": [query("limit=%C2%B2")], "query limit 1e309": [query("limit=1e309")],
    "query since garbage": [query("since=yesterday&until=%00")],
    "query cursor": [query("cursor=%00%ff")], "query cursor long": [query("cursor=" + "A" * 5000)],
    "query customer": [query("customer=%00&agent=" + "x" * 3000 + "&outcome=maybe")],
    "query long": [query("x=" + "y" * 12000)],
    "huge header": [header("X-Huge", "h" * 15000)],
    "too big a head": [header("X-Huge", "h" * 40000)],
    "many headers": [header(f"X-H{i}", "v") for i in range(300)],
    "NUL in header": [header("X-Nul", b"a\x00b")],
    "non-ASCII header": [header("X-Latin", b"caf\xe9\xff")],
    "Content-Length \u00b2": [header("Content-Length", b"\xb2")],
    "Content-Length 1\u00b2": [header("Content-Length", b"1\xb2")],
    "Content-Length -1": [header("Content-Length", "-1")],
    "Content-Length 4301 digits": [header("Content-Length", "1" * 4301)],
    "Content-Length list": [header("Content-Length", "0, 1")],
    "Transfer-Encoding gzip": [header("Transfer-Encoding", "gzip")],
    "chunked, bad chunk": [header("Transfer-Encoding", "chunked"), body(b"zz\r\n\r\n")],
    "chunked, huge chunk size": [header("Transfer-Encoding", "chunked"),
                                 body(b"9" * 100 + b"\r\nx\r\n0\r\n\r\n")],
    "Expect": [header("Expect", "100-continue")], "Expect junk": [header("Expect", "\xb2")],
    "no Host": [without("Host")],
    "two Hosts": [lambda req: (req[0], req[1], [*req[2], (b"Host", b"other")], req[3])],
    "Host junk": [header("Host", b"\xff\x00")],
    "timestamp \u00b2": [*SIGNED, header("X-Wsgate-Timestamp", "\u00b2")],
    "timestamp \u00b9\u00b2\u00b3": [*SIGNED, header("X-Wsgate-Timestamp", "\u00b9\u00b2\u00b3")],
    "timestamp long": [*SIGNED, header("X-Wsgate-Timestamp", "1" * 5000)],
    "signature junk": [header("Authorization", b"Basic \xff"),
                       header("X-Wsgate-Timestamp", "1"), header("X-Wsgate-Signature", b"v1=\xff")],
    "Authorization junk": [header("Authorization", b"Bearer \xff\xfe")],
    "Authorization empty": [header("Authorization", "Bearer")],
    "Authorization long": [header("Authorization", "Bearer " + "k" * 12000)],
    "Cookie junk": [header("Cookie", b"token=%ff; \xff=\xfe; ===")],
    "Origin junk": [header("Origin", b"\xff://\x00")],
    "WebSocket key \u00b2": [header("Sec-WebSocket-Key", b"\xb2\xb2")],
    "WebSocket version \u00b2": [header("Sec-WebSocket-Version", b"\xb2")],
    "WebSocket version huge": [header("Sec-WebSocket-Version", "9" * 5000)],
    "Idempotency-Key junk": [header("Idempotency-Key", b"\xb2" * 300)],
    "Accept junk": [header("Accept", b"\xff/\x00;q=\xb2")],
    "Accept-Encoding junk": [header("Accept-Encoding", "gzip;q=\u00b2, *;q=-1")],
    "If-Modified-Since junk": [header("If-Modified-Since", "\xb2 garbage 99999")],
    "If-None-Match junk": [header("If-None-Match", b"\xff\"")],
    "Range junk": [header("Range", "bytes=\xb2-")],
    "Range huge": [header("Range", "bytes=" + "9" * 40 + "-")],
    "Range reversed": [header("Range", "bytes=9-1")],
    "Content-Type junk": [header("Content-Type", b"application/json; charset=\xff")],
    "body not JSON": [body(b"{not json")], "body NaN": [body(b'{"type": NaN}')],
    "body deep": [body(b"[" * 100_000)], "body huge number": [body(b"1e99999999")],
    "body big int": [body(b"9" * 5000)],
    "body lone surrogate": [body(b'{"type": "\\ud800", "data": {}}')],
    "body not UTF-8": [body(b'{"type": "\xff\xfe"}')],
    "body events not a list": [body(b'{"events": {"a": 1}}')],
    "body event junk": [body(json.dumps({"events": [event(data=[]), 1, None, "x",
                                                    event(customer_id="\u0665" * 36)]}
                                        ).encode())],
    "body event topics junk": [body(json.dumps(event(topics=["\x00", "a" * 600, 5])).encode())],
}


#: What each route answers to its request as is: the corpus gets past its first checks.
AS_IS = {"/v1.0/ws": 101, "/v1.0/events": 202, "/audit": 301, "/v2/unknown": 404}


def build(route: str, mutations: list[Mutation]) -> bytes:
    verb, base = ROUTES[route]
    data = json.dumps(event()).encode() if route == "/v1.0/events" else b""
    req: Request = (verb, route, [(b"Host", b"example.org")] +
                    [(n.encode(), v.encode()) for n, v in base.items()], data)
    for mutate in mutations:
        req = mutate(req)
    verb, target, headers, data = req
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in headers)
    if data and not chunked and not any(n.lower() == b"content-length" for n, _ in headers):
        headers = [*headers, (b"Content-Length", str(len(data)).encode())]
    head = f"{verb} {target} HTTP/1.1\r\n".encode("latin-1", "replace")
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + data


def no_server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log lines that tell of a failure of the server itself, not of a request."""
    return [f"{r.name} {r.levelname}: {r.getMessage()[:300]}" for r in caplog.records
            if r.exc_info or r.exc_text or "Traceback" in r.getMessage()
            or r.name in ("tornado.application", "asyncio") and r.levelno >= logging.ERROR]


@pytest.mark.gen_test(timeout=120)
async def test_no_malformed_request_gets_a_5xx_or_logs_a_traceback(make_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = await make_server(base_config(
        tmp_path, audit={"api_keys": [AUDIT_KEY]}, metrics={"keys": [METRICS_KEY]},
        ingest={"keys": [INGEST_KEY], "hmac_secrets": [HMAC_SECRET]},
        server={"idle_connection_timeout": 3.0, "body_timeout": 3.0}))
    sock, metrics_port = tornado.testing.bind_unused_port()
    metrics_server = serve_metrics(server.gateway, server.gateway.metrics, [sock])
    assert metrics_server is not None
    ports = {"main": server.port, "metrics listener": metrics_port}
    cases = [(where, route, name) for where in ports for route in ROUTES
             for name in MUTATIONS
             if where == "main" or route in ("/metrics", "/v2/unknown")]
    limit = asyncio.Semaphore(16)

    async def one(where: str, route: str, name: str) -> tuple[str, int | str | None]:
        data = build(route, MUTATIONS[name])
        async with limit:
            try:
                status: int | str | None = await answer_to(ports[where], data,
                                                           data.startswith(b"HEAD "))
            except TimeoutError:
                status = "neither answered nor closed"
        return f"{where} {route} {name}", status

    try:
        results = await asyncio.gather(*(one(*case) for case in cases))
    finally:
        metrics_server.stop()
    failed = [(case, status) for case, status in results
              if isinstance(status, str) or status and status >= 500]
    assert not failed, failed
    assert not no_server_errors(caplog)
    # The corpus reaches the code behind each route: each answers its request as is.
    for route in ROUTES:
        assert dict(results)[f"main {route} as is"] == AS_IS.get(route, 200), route
