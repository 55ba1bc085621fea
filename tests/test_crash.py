"""The audit log under faults (SPEC §5): disk full, a stuck writer, PostgreSQL gone,
and ``kill -9`` of a real ``wsgate serve`` during a subscribe storm.

In every case: no subscribe is acknowledged without its committed row
(``audit_unavailable`` instead), the event loop keeps serving meanwhile, and
the service recovers without a restart; after a crash the log still verifies
and the next start closes what was left open with ``unclean_shutdown``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tornado.httpclient
import tornado.testing
import tornado.websocket
from sqlalchemy.engine import make_url

from tests.audit_helpers import PG_ENV, TCPProxy
from tests.conftest import CUSTOMER, TOKENS, event, service_missing, wait_for
from tests.test_hardening import SOAK, db_rows

C = CUSTOMER
ALL = f"customer_id:{C}"
REPO = Path(__file__).resolve().parent.parent


async def ping_time(client: Any) -> float:
    """Seconds for a ping/pong round trip on client."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert (await client.request({"type": "ping", "id": "rt"})) == {"type": "pong", "id": "rt"}
    return loop.time() - start


# -- disk full ---------------------------------------------------------------------------


class DiskLimit:
    """Caps the audit SQLite file at its current size on every connection the
    writer checks out (``PRAGMA max_page_count`` is per connection), so inserts
    fail with SQLITE_FULL exactly as on a full disk; ``lift()`` removes the cap."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.full = False
        sa.event.listen(engine, "checkout", self._checkout)

    def _checkout(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if self.full:
                pages = cur.execute("PRAGMA page_count").fetchone()[0]
                cur.execute(f"PRAGMA max_page_count = {pages}")
            else:
                cur.execute("PRAGMA max_page_count = 2147483646")
        finally:
            cur.close()

    def close(self) -> None:
        sa.event.remove(self.engine, "checkout", self._checkout)


@pytest.mark.gen_test(timeout=60)
async def test_disk_full_refuses_subscribes_journals_ends_and_recovers(make_server, caplog):
    server = await make_server()
    writer: Any = server.gateway.audit
    client = await server.connect()
    other = await server.connect()
    assert (await client.subscribe(f"{ALL}:held"))["topics"] == [f"{ALL}:held"]
    await other.subscribe(ALL)
    limit = DiskLimit(writer.engine)
    try:
        limit.full = True
        writer.recycle_connection()  # the writer keeps its connection: cap it too
        many = [f"{ALL}:full{i}:{'x' * 100}" for i in range(100)]  # needs new pages
        reply = await client.subscribe(*many)
        assert reply["topics"] == []
        assert {r["code"] for r in reply["rejected"]} == {"audit_unavailable"}
        assert "nothing was subscribed" in reply["rejected"][0]["message"]
        # Ends are not lost: the unsubscribe is answered and its row journaled.
        assert (await client.unsubscribe(f"{ALL}:held"))["topics"] == [f"{ALL}:held"]
        # Events and pings flow meanwhile; the refused topics receive nothing.
        assert await ping_time(other) < 1.0
        assert (await server.post(event()))[0] == 202
        assert (await other.recv())["type"] == "call_created"
        await client.no_frame()
        assert not writer.healthy()
        assert "database or disk is full" in caplog.text  # SQLITE_FULL, as on a full disk
        rows = db_rows(server.config.audit.url)
        assert not [r for r in rows if r["topic"].startswith(f"{ALL}:full")]
        limit.full = False
        # Recovers without a restart: after the back-off, subscribes commit again.
        await client.subscribe_until_accepted(f"{ALL}:after")
    finally:
        limit.close()
    rows = db_rows(server.config.audit.url)
    got = [(r["action"], r["topic"], r["code"]) for r in rows if r["outcome"] == "accepted"
           and r["connection_id"] == rows[0]["connection_id"]]
    assert got == [("subscribe", f"{ALL}:held", ""), ("unsubscribe", f"{ALL}:held", "client"),
                   ("subscribe", f"{ALL}:after", "")]
    assert writer.healthy()


# -- a stuck writer never blocks the event loop --------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_event_loop_serves_pings_and_events_while_the_writer_is_stuck(make_server):
    # Unlimited message rate: on a fast machine the ping loop below passes the
    # default 100/s, and the 1008 close is not what this test is about.
    server = await make_server(server={"max_messages_per_second": 0.0})
    stuck = await server.connect()
    watcher = await server.connect()
    pinger = await server.connect()
    await watcher.subscribe(ALL)
    # Another process holds SQLite's write lock: the writer waits in its busy
    # timeout (5 s) inside a blocking call.
    path = make_url(server.config.audit.url).database
    import sqlite3

    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        await stuck.send({"type": "subscribe", "topics": [f"{ALL}:stuck"], "id": "s"})
        loop = asyncio.get_running_loop()
        start = loop.time()
        rounds = []
        posts: list[asyncio.Future[Any]] = []
        while loop.time() - start < 1.5:
            rounds.append(await ping_time(pinger))
            if len(posts) < 5:  # fewer than the HTTP client's connections
                posts.append(asyncio.ensure_future(server.post(event())))
                # Delivered at once, though its 202 waits for the event's record.
                assert (await watcher.recv(timeout=1.0))["type"] == "call_created"
        assert max(rounds) < 0.5, rounds
        assert len(rounds) >= 5
        # The subscribe is still waiting for its commit: not acknowledged; nor are
        # the events, whose records wait behind it.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stuck.ws.read_message(), 0.05)
        assert len(posts) == 5 and not any(p.done() for p in posts)
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    # Released within the busy timeout: committed, then acknowledged.
    reply = await stuck.recv(timeout=10)
    assert reply["id"] == "s" and reply["topics"] == [f"{ALL}:stuck"]
    assert [status for status, _ in await asyncio.gather(*posts)] == [202] * 5
    assert [r["topic"] for r in db_rows(server.config.audit.url)] == [ALL, f"{ALL}:stuck"]
    engine = sa.create_engine(server.config.audit.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM audit_events")).scalar() == 5
    finally:
        engine.dispose()


# -- PostgreSQL unreachable ----------------------------------------------------------------


@pytest.fixture
def pg_schema_url():
    """A fresh schema on the test PostgreSQL, dropped afterwards."""
    base = os.environ.get(PG_ENV)
    if not base:
        service_missing(f"PostgreSQL ({PG_ENV})")
    admin = sa.create_engine(base)
    schema = f"crash_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception:
        admin.dispose()
        service_missing(f"PostgreSQL at {PG_ENV}")
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.gen_test(timeout=60)
async def test_postgres_unreachable_fails_closed_and_recovers(make_server, pg_schema_url, tmp_path):
    proxy = TCPProxy(pg_schema_url.host or "127.0.0.1", pg_schema_url.port or 5432)
    try:
        url = pg_schema_url.set(host="127.0.0.1", port=proxy.port)
        server = await make_server(audit={"url": url.render_as_string(hide_password=False)})
        client = await server.connect()
        other = await server.connect()
        await other.subscribe(ALL)
        assert (await client.subscribe(f"{ALL}:a"))["topics"] == [f"{ALL}:a"]
        proxy.cut()  # the network to the database is gone; new connections are refused
        reply = await client.subscribe(f"{ALL}:b")
        assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"]
        assert (await client.unsubscribe(f"{ALL}:a"))["topics"] == [f"{ALL}:a"]
        assert await ping_time(other) < 1.0
        assert (await server.post(event()))[0] == 202
        assert (await other.recv())["type"] == "call_created"
        await client.no_frame()
        proxy.restore()
        await client.subscribe_until_accepted(f"{ALL}:c")
        engine = sa.create_engine(pg_schema_url)
        try:
            with engine.connect() as db:
                got = db.execute(sa.text(
                    "SELECT action, topic, outcome, code FROM audit_rows "
                    "WHERE outcome = 'accepted' ORDER BY seq")).all()
        finally:
            engine.dispose()
        assert [tuple(r) for r in got] == [
            ("subscribe", ALL, "accepted", ""),
            ("subscribe", f"{ALL}:a", "accepted", ""),
            ("unsubscribe", f"{ALL}:a", "accepted", "client"),  # from the journal
            ("subscribe", f"{ALL}:c", "accepted", ""),
        ]
        await server.stop()
    finally:
        proxy.close()


# -- kill -9 of a real server --------------------------------------------------------------


def toml_value(value: Any) -> str:
    """Enough TOML for a test config: strings, numbers, booleans, lists, inline tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_config(tmp_path: Path, port: int, **server: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "node_id": "crash-node",
                   "ping_interval": 5.0, "ping_timeout": 5.0, "shutdown_timeout": 5.0,
                   **server},
        "auth": {"plugin": "static"},
        "auth.options": {"tokens": TOKENS},
        "permissions": {"plugin": "voipbin"},
        "ingest": {"keys": ["test-ingest-key"]},
        "audit": {"url": f"sqlite:///{tmp_path}/audit.db",
                  "journal_path": f"{tmp_path}/audit.journal"},
        "broker": {"url": "memory://"},
        "logging": {"level": "DEBUG"},
    }
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                   for name, values in tables.items())
    path = tmp_path / "wsgate.toml"
    path.write_text(text)
    return path


class ServeProcess:
    """``python -m wsgate serve --config FILE`` in a subprocess, output in a file."""

    def __init__(self, tmp_path: Path, port: int, config: Path, name: str) -> None:
        self.port = port
        self.log_path = tmp_path / f"{name}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(config)],
            cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    async def ready(self, timeout: float = 30.0) -> None:
        http = tornado.httpclient.AsyncHTTPClient()

        async def healthy() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                response = await http.fetch(f"http://127.0.0.1:{self.port}/healthz",
                                            raise_error=False, request_timeout=1)
            except OSError:
                return False
            return response.code == 200

        await wait_for(healthy, timeout, interval=0.05,
                       message=lambda: "wsgate serve did not start:\n" + self.output())

    async def wait(self, timeout: float) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout, interval=0.02,
                       message=lambda: "wsgate serve did not exit:\n" + self.output())
        return self.proc.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def unused_port() -> int:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    return port


def audit_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsgate", "audit", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


async def subscribe_storm(port: int, acked: set[tuple[str, str]], clients: int,
                          stop_after: int) -> list[Any]:
    """Clients subscribe one new topic per message, as fast as replies come back,
    until stop_after are acknowledged; every (connection_id, topic) acked is kept."""
    url = f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token"
    conns = [await tornado.websocket.websocket_connect(url) for _ in range(clients)]
    done = asyncio.Event()

    async def run(ws: Any, k: int) -> None:
        cid = json.loads(await ws.read_message())["connection_id"]
        n = 0
        while True:
            topic = f"{ALL}:storm{k}:t{n}"
            try:
                await ws.write_message(json.dumps({"type": "subscribe", "topics": [topic]}))
            except tornado.websocket.WebSocketClosedError:
                return
            frame = await ws.read_message()
            if frame is None:
                return
            reply = json.loads(frame)
            for accepted in reply["topics"]:
                acked.add((cid, accepted))
            if len(acked) >= stop_after:
                done.set()
            n += 1

    tasks = [asyncio.ensure_future(run(ws, k)) for k, ws in enumerate(conns)]
    await asyncio.wait_for(done.wait(), 600 if SOAK else 30)
    return [conns, tasks]


@pytest.mark.gen_test(timeout=900 if SOAK else 120)
async def test_kill_9_during_a_subscribe_storm_loses_no_acknowledged_row(tmp_path):
    port = unused_port()
    config = write_config(tmp_path, port)
    first = ServeProcess(tmp_path, port, config, "first")
    try:
        await first.ready()
        acked: set[tuple[str, str]] = set()
        conns, tasks = await subscribe_storm(port, acked, clients=40 if SOAK else 6,
                                             stop_after=20_000 if SOAK else 300)
        first.proc.send_signal(signal.SIGKILL)  # mid-storm: replies are still in flight
        assert await first.wait(10) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for ws in conns:
            ws.close()
    finally:
        first.close()
    url = f"sqlite:///{tmp_path}/audit.db"
    rows = db_rows(url)
    stored = {(r["connection_id"], r["topic"]) for r in rows
              if r["action"] == "subscribe" and r["outcome"] == "accepted"}
    assert len(acked) >= (20_000 if SOAK else 300)
    assert acked <= stored, f"{len(acked - stored)} acknowledged subscribes have no row"
    assert not [r for r in rows if r["action"] == "unsubscribe"]  # no clean end: it was killed
    verify = audit_cli(config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The next start ends every subscription the crash left open.
    second = ServeProcess(tmp_path, port, config, "second")
    try:
        await second.ready()
        rows = db_rows(url)
        ends = {(r["connection_id"], r["topic"]) for r in rows
                if r["action"] == "unsubscribe" and r["outcome"] == "accepted"}
        assert ends == stored
        assert {r["code"] for r in rows if r["action"] == "unsubscribe"} == {"unclean_shutdown"}
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait(15) == 0, second.output()
    finally:
        second.close()
    verify = audit_cli(config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
