"""SIGHUP reloads the config file of a running ``wsgate serve`` (SPEC §6 "Live
change"): real processes, real signals, real WebSockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from tests import test_broker_redis
from tests.conftest import (
    AGENT,
    CUSTOMER,
    INGEST_KEY,
    TOKENS,
    Client,
    base_config,
    event,
    wait_for,
)
from tests.test_cluster import REPO, start_workers, stop_workers
from tests.test_crash import ServeProcess, unused_port
from wsgate.app import build_plugins, config_changes, needs_restart

admin = test_broker_redis.admin
redis_url = test_broker_redis.redis_url

C = f"customer_id:{CUSTOMER}"
OLD_KEY = "old-ingest-key-5f1c"
NEW_KEY = "new-ingest-key-9d2e"
NEW_ORIGIN = "https://new.example.com"


def token(name: str, subject: str) -> str:
    return (f'"{name}" = {{ kind = "agent", subject = "{subject}", customer_id = "{CUSTOMER}", '
            f'agent_id = "{AGENT}", permissions = ["customer_admin"] }}')


def write(path: Path, port: int, tokens: dict[str, str], keys: list[str],
          origins: list[str], broker: str = "memory://", extra_server: str = "",
          extra_audit: str = "", extra: str = "") -> Path:
    body = ", ".join(token(name, subject) for name, subject in tokens.items())
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
node_id = "reload"
shutdown_timeout = 5.0
allowed_origins = {json.dumps(origins)}
{extra_server}

[auth]
plugin = "static"
[auth.options]
tokens = {{ {body} }}

[ingest]
keys = {json.dumps(keys)}

[audit]
url = "sqlite:///{path.parent}/audit.db"
journal_path = "{path.parent}/audit.journal"
{extra_audit}

[broker]
url = "{broker}"
{extra}
""")
    return path


async def connect(port: int, tok: str, origin: str | None = None) -> Client:
    headers = {"Origin": origin} if origin else {}
    ws = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{port}/v1.0/ws?token={tok}", headers=headers))
    client = Client(ws)
    assert (await client.recv())["type"] == "connected"
    return client


async def post(port: int, key: str) -> tornado.httpclient.HTTPResponse:
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/v1.0/events", method="POST", body=json.dumps(event()),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        raise_error=False)


async def reloaded(server: ServeProcess, text: str, count: int = 1) -> str:
    await wait_for(lambda: server.output().count(text) >= count, timeout=20, interval=0.02,
                   message=lambda: f"no {text!r} in the log:\n" + server.output())
    return next(line for line in server.output().splitlines() if text in line)


@pytest.fixture
def served(tmp_path: Path) -> Any:
    started: list[ServeProcess] = []

    def start(config: Path, port: int) -> ServeProcess:
        server = ServeProcess(tmp_path, port, config, "serve")
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.mark.gen_test(timeout=90)
async def test_sighup_adds_a_token_a_key_and_an_origin_and_keeps_the_connection(
        tmp_path, served) -> None:
    port = unused_port()
    config = write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY],
                   ["https://app.example.com"])
    server = served(config, port)
    await server.ready()
    alice = await connect(port, "alice-token")
    assert (await alice.subscribe(C))["topics"] == [C]
    assert (await post(port, NEW_KEY)).code == 401
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(port, "alice-token", NEW_ORIGIN)
    assert refused.value.code == 403

    write(config, port, {"alice-token": "alice", "bob-token-7c3a": "bob"}, [OLD_KEY, NEW_KEY],
          ["https://app.example.com", NEW_ORIGIN])
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "config reloaded")
    # One line names what changed, never a value.
    for key in ("server.allowed_origins", "auth.options.tokens", "ingest.keys"):
        assert key in line, line
    for secret in (NEW_KEY, OLD_KEY, "bob-token-7c3a", "alice-token"):
        assert secret not in server.output()

    bob = await connect(port, "bob-token-7c3a", NEW_ORIGIN)
    assert (await bob.subscribe(C))["topics"] == [C]
    answer = await post(port, NEW_KEY)
    assert answer.code == 202, answer.body
    event_id = json.loads(answer.body)["event_ids"][0]
    assert (await alice.recv())["event_id"] == event_id  # the old connection stayed open
    assert (await bob.recv())["event_id"] == event_id
    assert (await post(port, OLD_KEY)).code == 202
    assert server.proc.poll() is None
    alice.close()
    bob.close()


@pytest.mark.gen_test(timeout=90)
async def test_sighup_that_removes_a_token_closes_its_connections_with_4003(
        tmp_path, served) -> None:
    port = unused_port()
    tokens = {"alice-token": "alice", "bob-token": "bob"}
    config = write(tmp_path / "wsgate.toml", port, tokens, [OLD_KEY], [])
    server = served(config, port)
    await server.ready()
    alice = await connect(port, "alice-token")
    bob = await connect(port, "bob-token")
    assert (await bob.subscribe(C))["topics"] == [C]

    write(config, port, {"alice-token": "alice"}, [OLD_KEY], [])
    server.proc.send_signal(signal.SIGHUP)
    assert await bob.closed() == 4003
    bob.close()
    await reloaded(server, "config reloaded")
    assert (await alice.request({"type": "ping", "id": 1}))["type"] == "pong"
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(port, "bob-token")
    assert refused.value.code == 401
    alice.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_file_that_does_not_validate_changes_nothing_and_logs_check_config(
        tmp_path, served) -> None:
    port = unused_port()
    config = write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY], [])
    server = served(config, port)
    await server.ready()
    alice = await connect(port, "alice-token")

    write(config, port, {"alice-token": "alice", "bob-token": "bob"}, [OLD_KEY, NEW_KEY], [],
          extra_server="max_subscriptons = 5")  # the typo
    check = subprocess.run([sys.executable, "-m", "wsgate", "check-config", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert check.returncode != 0
    message = check.stderr.strip()
    assert "max_subscriptons" in message
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "reload refused")
    assert message in line, (message, line)

    assert (await post(port, NEW_KEY)).code == 401
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(port, "bob-token")
    assert (await alice.request({"type": "ping", "id": 1}))["type"] == "pong"
    alice.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_port_change_is_refused_and_the_old_config_stays(tmp_path, served) -> None:
    port = unused_port()
    config = write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY], [])
    server = served(config, port)
    await server.ready()
    alice = await connect(port, "alice-token")
    assert (await alice.subscribe(C))["topics"] == [C]

    write(config, unused_port(), {"alice-token": "alice"}, [OLD_KEY, NEW_KEY], [])
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "reload refused")
    assert "server.port" in line and "restart" in line, line
    assert NEW_KEY not in server.output()
    # Nothing of that file applies, not even the key it adds.
    assert (await post(port, NEW_KEY)).code == 401
    answer = await post(port, OLD_KEY)
    assert answer.code == 202
    assert (await alice.recv())["event_id"] == json.loads(answer.body)["event_ids"][0]
    assert server.proc.poll() is None
    alice.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_lower_limit_applies_to_an_open_connection_after_sighup(
        tmp_path, served) -> None:
    port = unused_port()
    config = write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY], [])
    server = served(config, port)
    await server.ready()
    alice = await connect(port, "alice-token")
    assert (await alice.subscribe(C))["topics"] == [C]

    write(config, port, {"alice-token": "alice"}, [OLD_KEY], [],
          extra_server="max_subscriptions = 1")
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "config reloaded")
    assert line.endswith("changed server.max_subscriptions"), line
    reply = await alice.subscribe(f"agent_id:{AGENT}")
    assert [r["code"] for r in reply["rejected"]] == ["limit_exceeded"], reply
    alice.close()


@pytest.mark.redis
@pytest.mark.gen_test(timeout=120)
async def test_serve_workers_passes_sighup_to_every_worker(redis_url, tmp_path) -> None:
    port = unused_port()
    config = write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY], [],
                   broker=redis_url)
    log = tmp_path / "serve.log"
    process = start_workers(config, log)
    try:
        await wait_for(lambda: log.read_text().count("wsgate serving on") == 2
                       or process.poll() is not None, timeout=30, interval=0.05)
        assert process.poll() is None, log.read_text()
        write(config, port, {"alice-token": "alice", "bob-token": "bob"}, [OLD_KEY], [],
              broker=redis_url)
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: log.read_text().count("config reloaded") == 2
                       or process.poll() is not None, timeout=30, interval=0.05,
                       message=lambda: log.read_text())
        assert process.poll() is None, log.read_text()
        # Whichever worker the kernel picks, the new token works.
        clients = [await connect(port, "bob-token") for _ in range(8)]
        for client in clients:
            client.close()
    finally:
        stop_workers(process)


# -- the seam, without a process -------------------------------------------------

def test_config_changes_names_table_keys_and_plugin_options_never_values(tmp_path) -> None:
    old = base_config(tmp_path)
    new = base_config(tmp_path, server={"port": 9090, "max_subscriptions": 5},
                      auth={"options": {"tokens": {**TOKENS, "sekrit-token": TOKENS[
                          "admin-token"]}}}, ingest={"keys": [INGEST_KEY, "sekrit-key"]})
    changed = config_changes(old, new)
    assert changed == ["server.port", "server.max_subscriptions", "auth.options.tokens",
                       "ingest.keys"]
    assert [k for k in changed if needs_restart(k)] == ["server.port"]
    assert config_changes(old, base_config(tmp_path)) == []
    for key in ("server.host", "server.node_id", "audit.url", "broker.url", "metrics.port"):
        assert needs_restart(key), key
    for key in ("server.allowed_origins", "ingest.hmac_secrets", "permissions.options.x",
                "auth.plugin", "audit.record_events"):
        assert not needs_restart(key), key


@pytest.mark.gen_test
async def test_reconfigure_swaps_the_plugins_and_limits_in_every_room(make_node) -> None:
    node = await make_node()
    gateway = node.gateway
    new = base_config(Path(gateway.config.audit.journal_path).parent, server={
        "refresh_interval": 0, "max_subscriptions": 7, "max_messages_per_second": 3.0,
        "max_bad_messages_per_minute": 4, "max_rejected_topics_per_minute": 5,
        "max_output_buffer": 4096, "max_connections_per_ip": 2,
        "allowed_origins": [NEW_ORIGIN]})
    authenticator, authorizer = build_plugins(new)
    gateway.reconfigure(new, authenticator, authorizer)
    assert gateway.config is new
    assert gateway.authenticator is authenticator is gateway.admission.authenticator
    assert gateway.authorizer is authorizer is gateway.subscriptions.authorizer
    assert gateway.admission.server is new.server
    assert gateway.subscriptions.max_subscriptions == 7
    assert (gateway.limits.rate, gateway.limits.max_bad, gateway.limits.max_rejected) == \
        (3.0, 4, 5)
    assert gateway.delivery.max_output_buffer == 4096


@pytest.mark.gen_test(timeout=90)
async def test_sighup_changes_the_audit_and_metrics_keys_live(tmp_path, served) -> None:
    """Review and scrape keys are keys too (SPEC §6): new ones work at once, old
    ones stop; turning the audit API off is refused (its routes are mounted at start)."""
    port = unused_port()

    def keys(review: list[str], scrape: list[str]) -> Path:
        return write(tmp_path / "wsgate.toml", port, {"alice-token": "alice"}, [OLD_KEY], [],
                     extra_audit=f"api_keys = {json.dumps(review)}",
                     extra=f"[metrics]\nkeys = {json.dumps(scrape)}")

    async def status(path: str, key: str) -> int:
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}{path}", raise_error=False,
            headers={"Authorization": f"Bearer {key}"})
        return response.code

    server = served(keys(["review-a"], ["scrape-a"]), port)
    await server.ready()
    assert (await status("/v1.0/audit", "review-a"), await status("/metrics", "scrape-a")) == (
        200, 200)
    keys(["review-b"], ["scrape-b"])
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "config reloaded")
    assert "audit.api_keys" in line and "metrics.keys" in line, line
    assert [await status("/v1.0/audit", k) for k in ("review-a", "review-b")] == [401, 200]
    assert [await status("/metrics", k) for k in ("scrape-a", "scrape-b")] == [401, 200]
    assert "review-b" not in server.output() and "scrape-b" not in server.output()
    keys([], ["scrape-b"])
    server.proc.send_signal(signal.SIGHUP)
    line = await reloaded(server, "reload refused")
    assert "turning the audit API on or off" in line, line
    assert await status("/v1.0/audit", "review-b") == 200
