"""What a newcomer meets following the docs: the worked examples run as written,
and the answers that must tell them (or their operator) what to do next."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import AGENT, CUSTOMER
from wsgate.logs import JSONFormatter, TextFormatter
from wsgate_example_plugin.signed import sign

SECRET = "a-shared-secret-of-at-least-32-characters"


# -- refusals at the upgrade: the operator's log says why ---------------------------------


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wsgate.access"]


def shown(record: logging.LogRecord) -> list[str]:
    """The record as each log format writes it."""
    text = TextFormatter("%(levelname)s %(name)s: %(message)s")
    return [text.format(record), JSONFormatter().format(record)]


@pytest.mark.gen_test(timeout=30)
async def test_a_plugin_that_cannot_decide_logs_its_reason_with_the_503(make_server, tmp_path,
                                                                        caplog):
    caplog.set_level(logging.INFO, "wsgate.access")
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    server = await make_server(auth={"plugin": "example_signed", "options": {
        "secret": SECRET, "revoked_file": str(revoked)}})
    revoked.unlink()  # a storage hiccup while serving: the plugin cannot decide
    token = sign(SECRET, CUSTOMER, AGENT, 4_000_000_000)
    status, body = await server.refused(token)
    assert (status, body["error"]["code"]) == (503, "auth_unavailable")
    [line] = access_lines(caplog)
    assert (line.status, line.code, line.reason) == (503, "auth_unavailable",
                                                     body["error"]["message"])
    assert "the revocation list cannot be read: No such file or directory" in line.reason
    text, as_json = shown(line)
    assert text.startswith("ERROR wsgate.access: 503 GET /v1.0/ws?token=*** ")
    assert 'code=auth_unavailable reason="cannot check the credential now: the revocation ' \
           'list cannot be read' in text
    assert json.loads(as_json)["reason"] == body["error"]["message"]
    assert token not in text + as_json and token.split(".")[-1] not in text + as_json


@pytest.mark.gen_test(timeout=30)
async def test_every_refused_upgrade_logs_its_code_and_message(make_server, caplog):
    caplog.set_level(logging.INFO, "wsgate.access")
    server = await make_server()
    secret_token = "not-a-configured-token-0123456789"
    refusals = [await server.refused(secret_token), await server.refused(None),
                await server.refused("admin-token", headers={"Origin": "http://evil.example"})]
    lines = access_lines(caplog)
    assert [(r.status, r.code, r.reason) for r in lines] == [
        (status, body["error"]["code"], body["error"]["message"]) for status, body in refusals]
    assert [r.code for r in lines] == ["unauthenticated", "unauthenticated",
                                       "origin_not_allowed"]
    assert lines[0].reason == "credential refused: unknown token"
    assert all(secret_token not in "".join(shown(r)) for r in lines)
    # An upgrade that succeeds carries no refusal fields.
    caplog.clear()
    await server.connect()
    [ok] = access_lines(caplog)
    assert ok.status == 101 and not hasattr(ok, "code")
