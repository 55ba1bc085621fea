"""What a newcomer meets following the docs: the worked examples run as written,
and the answers that must tell them (or their operator) what to do next."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.websocket

from tests.conftest import AGENT, CUSTOMER, TOKENS
from tests.test_crash import ServeProcess, unused_port
from wsgate.logs import JSONFormatter, TextFormatter
from wsgate_example_plugin.signed import sign

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a-shared-secret-of-at-least-32-characters"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block in a Markdown text, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)


def plugin_walkthrough() -> tuple[str, str]:
    """docs/plugins.md, step 6 of the worked example: its config table and its commands."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    step = text[text.index("**6. Use it**"):]
    blocks = fenced_blocks(step)
    toml = next(body for lang, body in blocks if lang == "toml")
    shell = next(body for lang, body in blocks if lang == "sh")
    return toml, shell


@pytest.mark.gen_test(timeout=90)
async def test_the_worked_plugin_example_admits_the_token_it_minted(tmp_path, monkeypatch):
    # As the page says: a copy of the example config with its [auth] table replaced.
    auth, shell = plugin_walkthrough()
    port = unused_port()
    config = (ROOT / "config.example.toml").read_text()
    start, end = config.index("\n[auth]\n"), config.index("\n[permissions]\n")
    config = config[:start + 1] + auth + config[end:]
    config = config.replace("port = 8080", f"port = {port}", 1)
    (tmp_path / "wsgate.toml").write_text(config)
    # The commands up to `serve`, as written, with this checkout's wsgate first on PATH.
    before_serve, serve_line, listen_line = re.split(r"^(wsgate serve .*)$\n", shell,
                                                     flags=re.M)
    assert serve_line == "wsgate serve --config wsgate.toml &", serve_line
    script = before_serve + 'printf "%s\\n%s\\n" "$EXAMPLE_SIGNED_SECRET" "$TOKEN"\n'
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = await asyncio.to_thread(subprocess.run, ["bash", "-e", "-c", script], cwd=tmp_path,
                                   capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stderr
    *shown, secret, token = done.stdout.splitlines()
    assert shown == ["wsgate.toml: OK (auth example_signed, permissions voipbin, broker memory://)"]
    monkeypatch.setenv("EXAMPLE_SIGNED_SECRET", secret)
    server = ServeProcess(tmp_path, port, tmp_path / "wsgate.toml", "serve")
    try:
        await server.ready()
        # What the page's `wsgate listen --token "$TOKEN" <topic>` does.
        topic = listen_line.split()[-1]
        assert listen_line.startswith('wsgate listen --token "$TOKEN" ') and topic == (
            f"agent_id:{AGENT}")
        ws = await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{port}/v1.0/ws?token={token}")
        try:
            connected = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert connected["type"] == "connected", connected
            await ws.write_message(json.dumps({"type": "subscribe", "topics": [topic]}))
            subscribed = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert (subscribed["topics"], subscribed["rejected"]) == ([topic], [])
        finally:
            ws.close()
    except tornado.httpclient.HTTPClientError as exc:
        raise AssertionError(f"{exc}\n{server.output()}") from None
    finally:
        server.close()


def test_the_worked_plugin_example_finds_a_missing_revocation_list_before_serving(tmp_path):
    auth, _ = plugin_walkthrough()
    (tmp_path / "wsgate.toml").write_text(auth)
    result = subprocess.run([sys.executable, "-m", "wsgate", "check-config", "wsgate.toml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "EXAMPLE_SIGNED_SECRET": SECRET})
    assert result.returncode != 0
    assert result.stderr == (
        "wsgate: wsgate.toml: plugin 'example_signed': option 'revoked_file': cannot read "
        "'revoked.txt': No such file or directory; create it (an empty file revokes no one)\n")


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


# -- a client that is not a browser (docs/protocol.md) ------------------------------------


def non_browser_snippet() -> str:
    """docs/protocol.md's websocket-client example, as written."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("### Clients that are not browsers"):]
    return next(body for lang, body in fenced_blocks(section) if lang == "python")


@pytest.mark.gen_test(timeout=60)
async def test_websocket_client_as_the_protocol_page_shows_connects(make_server):
    import websocket  # websocket-client (the test extra): the library the page shows
    # The page's token and address, as `make run` serves them.
    server = await make_server(auth={"plugin": "static", "options": {
        "tokens": {"dev-admin-token": TOKENS["admin-token"]}}})
    url = f"{server.ws_url}?token=dev-admin-token"
    # The trouble the page explains: by default the library sends an Origin of
    # the gateway's own address, which no allowed_origins lists.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        await asyncio.to_thread(websocket.create_connection, url, timeout=10)
    assert refused.value.status_code == 403
    assert json.loads(refused.value.resp_body)["error"]["code"] == "origin_not_allowed"
    snippet = non_browser_snippet()
    assert "ws://127.0.0.1:8080/v1.0/ws?token=dev-admin-token" in snippet
    snippet = snippet.replace("ws://127.0.0.1:8080/v1.0/ws", server.ws_url)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", snippet],
                                   capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    connected, subscribed = (json.loads(line) for line in done.stdout.splitlines())
    assert connected["type"] == "connected"
    assert subscribed == {"type": "subscribed", "id": 1,
                          "topics": [f"customer_id:{CUSTOMER}"], "rejected": []}
