"""Tokens never reach a log line, decoded or not, whoever writes the line (SPEC §2).

Tornado reads the query parameter ``token`` after percent-decoding its name,
so ``?%74oken=<token>`` authenticates like ``?token=<token>``; every log
line the process writes (wsgate's access line, Tornado's own warnings and
"Uncaught exception" lines, tracebacks) must show ``***`` instead of it.
"""

from __future__ import annotations

import logging

import pytest
import tornado.httpclient

from tests.conftest import CUSTOMER, base_config
from wsgate import logs
from wsgate.logs import JSONFormatter, TextFormatter

TOKEN = "tok-Qa8Zr4-decoded-name"
SECRETS = {
    "decoded name": ("%74oken", TOKEN),
    "decoded name, another byte": ("t%6Fken", "tok-Wd3Lp0-second-byte"),
    "plain": ("token", "tok-Ny5Cv7-plain"),
    "refused": ("%74oken", "tok-Ke2Hs9-refused"),
    "upper-case escape": ("%74%6F%6B%65%6E", "tok-Bf6Tg1-all-escaped"),
}
UNICODE_PATH = "tok-Ym4Xu8-bad-unicode-path"
UNCAUGHT = "tok-Jp1Rd5-uncaught"
UNCAUGHT_ESCAPED = "tok-Gh7Vn3-uncaught-escaped"
ALL = [s for _, s in SECRETS.values()] + [UNICODE_PATH, UNCAUGHT, UNCAUGHT_ESCAPED]

PRINCIPAL = {"kind": "agent", "subject": "alice", "customer_id": CUSTOMER,
             "agent_id": "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e",
             "permissions": ["customer_admin"]}


def rendered(record: logging.LogRecord) -> str:
    """Everything of a record a handler could write, in both of wsgate's formats."""
    return "\n".join([TextFormatter("%(name)s: %(message)s").format(record),
                      JSONFormatter().format(record), str(vars(record))])


@pytest.mark.gen_test(timeout=30)
async def test_a_session_with_errors_logs_no_token(make_server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    tokens = {secret: PRINCIPAL for _, secret in SECRETS.values() if "refused" not in secret}
    server = await make_server(base_config(
        tmp_path, auth={"plugin": "static", "options": {"tokens": tokens}},
        audit={"api_keys": ["audit-key"]}))
    for name, (param, secret) in SECRETS.items():
        if name == "refused":
            url = f"{server.ws_url}?{param}={secret}"
            with pytest.raises(tornado.httpclient.HTTPClientError) as info:
                await tornado.websocket.websocket_connect(url)
            assert info.value.code == 401
        else:
            # Each spelling of the name authenticates: it is a credential.
            await server.connect(None, query=f"{param}={secret}")
    http = tornado.httpclient.AsyncHTTPClient()
    # Tornado's own warning for a path that is not UTF-8 quotes the request URI.
    response = await http.fetch(f"{server.base}/audit/%ff?token={UNICODE_PATH}",
                                raise_error=False)
    assert response.code == 400

    def broken() -> bool:
        raise RuntimeError("the store exploded")

    monkeypatch.setattr(server.gateway.audit, "healthy", broken)
    # Tornado's "Uncaught exception" line quotes the URI, and the request's repr.
    for query in (f"token={UNCAUGHT}", f"%74oken={UNCAUGHT_ESCAPED}"):
        response = await http.fetch(f"{server.base}/readyz?{query}", raise_error=False)
        assert response.code == 500

    records = caplog.records
    text = "\n".join(rendered(r) for r in records)
    for secret in ALL:
        assert secret not in text, f"{secret} was logged"
    # The lines are there, masked: the test sees what it checks.
    messages = "\n".join(r.getMessage() for r in records)
    assert "%74oken=***" in messages and "t%6Fken=***" in messages
    assert "Invalid unicode" in messages and "token=***" in messages
    assert "Uncaught exception GET /readyz?token=*** " in messages
    assert "Uncaught exception GET /readyz?%74oken=*** " in messages
    assert any(r.exc_info for r in records if "Uncaught exception" in r.getMessage())


@pytest.mark.parametrize("text, expected", [
    ("GET /v1.0/ws?token=abc", "GET /v1.0/ws?token=***"),
    ("GET /v1.0/ws?%74oken=abc&x=1", "GET /v1.0/ws?%74oken=***&x=1"),
    ("GET /v1.0/ws?x=1&%54OKEN=abc", "GET /v1.0/ws?x=1&%54OKEN=***"),
    ("/v1.0/ws?to%6ben=abc#frag", "/v1.0/ws?to%6ben=***#frag"),
    ("/v1.0/ws?access_token=abc", "/v1.0/ws?access_token=***"),
    ("/v1.0/ws?tok+en=abc", "/v1.0/ws?tok+en=abc"),
    ("/v1.0/ws?token%3Dabc", "/v1.0/ws?***"),
    ("/v1.0/ws?token", "/v1.0/ws?token"),
    ("/v1.0/ws?token=", "/v1.0/ws?token=***"),
    ("uri='/readyz?token=abc', version='HTTP/1.1'", "uri='/readyz?token=***', version='HTTP/1.1'"),
    ("GET /readyz?token=abc (127.0.0.1)", "GET /readyz?token=*** (127.0.0.1)"),
    ("/a?token=it's-mine&b=2", "/a?token=***&b=2"),
    ("no query here: a=b", "no query here: a=b"),
])
def test_scrub_masks_every_spelling_of_the_token_parameter(text, expected):
    assert logs.scrub(text) == expected
