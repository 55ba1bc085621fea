"""Several gateway nodes sharing one Redis (and one audit database): what a
client connected to any node sees when a backend posts to any node, and what
happens when Redis goes away. Real servers, real Redis, real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import tornado.httpclient
import tornado.testing
import tornado.websocket

from tests import audit_helpers, test_broker_redis
from tests.audit_helpers import Backend
from tests.conftest import (
    AGENT,
    CUSTOMER,
    INGEST_KEY,
    OTHER_CUSTOMER,
    Client,
    Server,
    base_config,
    event,
    service_missing,
    wait_for,
)
from tests.fakes import TCPProxy
from wsgate.config import Config

# Shared with the broker tests: a Redis check and a per-test key prefix.
admin = test_broker_redis.admin
redis_url = test_broker_redis.redis_url
numsub = test_broker_redis.numsub
kill_named = test_broker_redis._kill_named
closed_port_url = test_broker_redis.closed_port_url
backend = audit_helpers.backend  # the audit store fixture: SQLite, and PostgreSQL

PG_URL = os.environ.get("WSGATE_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
C = f"customer_id:{CUSTOMER}"
A = f"agent_id:{AGENT}"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.redis


def node_config(tmp_path: Path, url: str, name: str, **tables: dict[str, Any]) -> Config:
    """A node of the test cluster: its own node id and journal, the shared broker."""
    audit = {"journal_path": f"{tmp_path}/{name}.journal", **tables.pop("audit", {})}
    return base_config(tmp_path, broker={"url": url}, server={"node_id": name}, audit=audit,
                       **tables)


@pytest.fixture
def cluster(io_loop: Any, tmp_path: Path) -> Iterator[Any]:
    """An async factory of started nodes: ``await cluster(url, "node-a", ...)``."""
    servers: list[Server] = []

    async def factory(url: str, *names: str, **tables: dict[str, Any]) -> list[Server]:
        made = []
        for name in names:
            server = Server(node_config(tmp_path, url, name, **tables))
            servers.append(server)
            made.append(await server.start())
        return made

    yield factory
    for server in servers:
        io_loop.run_sync(server.stop, timeout=15)


async def subscribed(server: Server, client: Client, *topics: str) -> None:
    """Subscribe, and wait until the node's Redis subscription is in effect, so an
    event posted to another node right after cannot miss it."""
    reply = await client.subscribe(*topics)
    assert reply["type"] == "subscribed" and reply["rejected"] == [], reply
    broker = server.gateway.broker
    await wait_for(lambda: all(broker.subscribed(":".join(t.split(":")[:2])) for t in topics))


async def post_ids(server: Server, *bodies: dict[str, Any]) -> list[str]:
    status, body = await server.post({"events": list(bodies)})
    assert status == 202, body
    return list(body["event_ids"])


@pytest.mark.gen_test(timeout=30)
async def test_event_posted_to_one_node_reaches_each_subscriber_on_every_node_once(
        redis_url, cluster) -> None:
    a, b, c = await cluster(redis_url, "node-a", "node-b", "node-c")
    on_a, on_b, on_c = await a.connect(), await b.connect(), await c.connect()
    await subscribed(a, on_a, C)
    # Both of the event's scopes on one connection: still one frame per event.
    await subscribed(b, on_b, C, A)
    await subscribed(c, on_c, f"{C}:call")
    ids = await post_ids(a, event(agent_id=AGENT, data={"n": 1}),
                         event(agent_id=AGENT, data={"n": 2}), event(data={"n": 3}))
    for client in (on_a, on_b, on_c):
        frames = [await client.recv() for _ in ids]
        assert [f["event_id"] for f in frames] == ids
        assert [f["data"]["n"] for f in frames] == [1, 2, 3]
        await client.no_frame()
    await post_ids(c, event(customer_id=None, agent_id=AGENT))
    frame = await on_b.recv()
    assert frame["topic"].startswith(A)
    await on_a.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_only_nodes_with_subscribers_hold_a_scope_channel(redis_url, cluster,
                                                               admin) -> None:
    a, b, c = await cluster(redis_url, "node-a", "node-b", "node-c")
    broker = a.gateway.broker
    first, second, there = await b.connect(), await b.connect(), await c.connect()
    await subscribed(b, first, C)
    await subscribed(b, second, f"{C}:call")
    await subscribed(c, there, C)
    assert numsub(admin, broker, C) == 2  # b and c, once each; a has no subscriber
    assert numsub(admin, broker, f"customer_id:{OTHER_CUSTOMER}") == 0
    # Not b's last subscriber in the scope: the channel stays.
    assert (await first.unsubscribe(C))["topics"] == [C]
    assert numsub(admin, broker, C) == 2
    (await second.unsubscribe(f"{C}:call"))
    await wait_for(lambda: numsub(admin, broker, C) == 1)
    assert not b.gateway.broker.subscribed(C)
    ids = await post_ids(a, event())
    assert (await there.recv())["event_id"] == ids[0]
    await first.no_frame()
    await second.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_delivery_resumes_after_redis_kills_the_node_connections(
        redis_url, cluster, admin) -> None:
    a, b = await cluster(redis_url, "node-a", "node-b")
    client = await b.connect()
    await subscribed(b, client, C)
    assert kill_named(admin, f"{b.gateway.broker.name}:sub") == 1
    kill_named(admin, f"{a.gateway.broker.name}:pub")
    await wait_for(lambda: b.gateway.broker.connect_failures == 1)  # b noticed
    await wait_for(lambda: b.gateway.broker.healthy() and b.gateway.broker.subscribed(C),
                   timeout=10)
    ids = await post_ids(a, event())
    assert (await client.recv())["event_id"] == ids[0]
    await client.no_frame()


async def ready(server: Server) -> tuple[int, Any]:
    response = await server.http.fetch(server.base + "/readyz", raise_error=False)
    return response.code, json.loads(response.body)


@pytest.mark.gen_test(timeout=40)
async def test_redis_outage_keeps_websockets_refuses_ingest_and_recovers(
        redis_url, cluster, io_loop) -> None:
    cut = TCPProxy(redis_url)
    port = await cut.start()
    try:
        parts = urlsplit(redis_url)
        via_proxy = parts._replace(netloc=f"127.0.0.1:{port}").geturl()
        (a,) = await cluster(via_proxy, "node-a")
        (b,) = await cluster(redis_url, "node-b")
        client = await a.connect()
        await subscribed(a, client, C)
        cut.cut()
        await wait_for(lambda: not a.gateway.broker.healthy())
        code, body = await ready(a)
        assert code == 503 and body["checks"]["broker"] is False
        status, answer = await a.post(event())
        assert status == 503 and answer["error"]["code"] == "broker_unavailable", answer
        assert a.gateway.broker.publish_failures == 1
        scraped = a.gateway.metrics.render(None)[0].decode()
        assert "wsgate_broker_publish_failures_total 1.0" in scraped
        assert "wsgate_broker_up 0.0" in scraped
        # The WebSocket stays open and answers while Redis is gone.
        assert (await client.request({"type": "ping", "id": 1})) == {"type": "pong", "id": 1}
        cut.down = False
        await wait_for(lambda: a.gateway.broker.healthy() and a.gateway.broker.subscribed(C),
                       timeout=15)
        assert (await ready(a))[0] == 200
        ids = await post_ids(b, event())
        assert (await client.recv())["event_id"] == ids[0]
        ids = await post_ids(a, event())
        assert (await client.recv())["event_id"] == ids[0]
    finally:
        await cut.close()


@pytest.mark.gen_test(timeout=30)
async def test_ingest_answers_503_and_not_ready_when_redis_is_unreachable(cluster) -> None:
    (a,) = await cluster(closed_port_url(), "node-a")
    status, body = await a.post(event())
    assert status == 503, body
    assert body["error"]["code"] == "broker_unavailable"
    code, readiness = await ready(a)
    assert code == 503 and readiness["checks"] == {
        "audit": True, "broker": False, "accepting": True}
    # Clients can still connect and subscribe (the audit store is up).
    client = await a.connect()
    assert (await client.subscribe(C))["topics"] == [C]


@pytest.mark.gen_test(timeout=30)
async def test_resume_on_another_node_replays_what_was_published_through_a_third(
        redis_url, cluster) -> None:
    a, b, c = await cluster(redis_url, "node-a", "node-b", "node-c")
    first = await b.connect()
    await subscribed(b, first, C)
    seen = (await post_ids(a, event(data={"n": 0})))[0]
    assert (await first.recv())["event_id"] == seen
    first.close()
    missed = await post_ids(a, *[event(data={"n": n}) for n in (1, 2, 3)])
    again = await c.connect()
    reply = await again.subscribe(C, since=seen)
    assert reply["recovered"] is True, reply
    assert [(await again.recv())["event_id"] for _ in missed] == missed
    await wait_for(lambda: c.gateway.broker.subscribed(C))
    live = await post_ids(a, event(data={"n": 4}))
    assert (await again.recv())["event_id"] == live[0]
    await again.no_frame()
    unknown = await c.connect()
    assert (await unknown.subscribe(C, since=str(uuid.uuid4())))["recovered"] is False


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (the log must hold only its chains)."""
    try:
        import psycopg
    except ImportError:
        service_missing("psycopg (PostgreSQL driver)")
    base = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"wsgate_cluster_{uuid.uuid4().hex[:8]}"
    try:
        conn = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        service_missing(f"PostgreSQL at {PG_URL}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_URL)
    yield parts._replace(path=f"/{name}").geturl()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
@pytest.mark.gen_test(timeout=40)
async def test_nodes_share_a_postgresql_audit_log_each_with_its_own_chain(
        redis_url, pg_database, tmp_path) -> None:
    from wsgate.audit.store import make_engine, verify

    servers = [Server(node_config(tmp_path, redis_url, name, audit={"url": pg_database}))
               for name in ("node-a", "node-b")]
    try:
        a, b = [await s.start() for s in servers]
        on_a, on_b = await a.connect(), await b.connect()
        await subscribed(a, on_a, C)
        await subscribed(b, on_b, C, A)
        assert (await on_b.unsubscribe(A))["topics"] == [A]
        assert (await on_a.subscribe(f"customer_id:{OTHER_CUSTOMER}"))["rejected"]
        ids = await post_ids(a, event())
        assert (await on_b.recv())["event_id"] == ids[0]
    finally:
        for server in servers:
            await server.stop()
    engine = make_engine(pg_database)
    try:
        result = verify(engine, None)
        with engine.connect() as conn:
            from sqlalchemy import text
            rows = conn.execute(text(
                "SELECT node_id, action, outcome, code FROM audit_rows ORDER BY node_id, seq"
            )).all()
    finally:
        engine.dispose()
    assert result.ok, result.to_dict()
    assert result.nodes == ["node-a", "node-b"]
    assert ("node-b", "unsubscribe", "accepted", "client") in rows
    assert ("node-a", "subscribe", "rejected", "forbidden") in rows
    # Every accepted subscription has an end: disconnect rows were written at shutdown.
    assert sum(r[1] == "subscribe" and r[2] == "accepted" for r in rows) == \
        sum(r[1] == "unsubscribe" and r[2] == "accepted" for r in rows) == 3


# -- serve --workers ---------------------------------------------------------------


def write_config(tmp_path: Path, port: int, broker_url: str, audit_url: str = "") -> Path:
    token = ('"admin-token" = { kind = "agent", subject = "alice", '
             f'customer_id = "{CUSTOMER}", agent_id = "{AGENT}", '
             'permissions = ["customer_admin"] }')
    path = tmp_path / "wsgate.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
node_id = "wk"
shutdown_timeout = 5.0

[auth]
plugin = "static"
[auth.options]
tokens = {{ {token} }}

[ingest]
keys = ["{INGEST_KEY}"]

[audit]
url = "{audit_url or f'sqlite:///{tmp_path}/audit.db'}"
journal_path = "{tmp_path}/audit.journal"

[broker]
url = "{broker_url}"
""")
    return path


def start_workers(config: Path, log: Path, workers: int = 2) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Its own process group: a failed test kills the workers with it (stop_workers).
        return subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(config),
             "--workers", str(workers)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_workers(process: subprocess.Popen[Any]) -> None:
    """Kill what start_workers started, workers included, unless it already exited."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_workers_refuse_the_memory_broker(tmp_path) -> None:
    config = write_config(tmp_path, 8080, "memory://")
    done = subprocess.run([sys.executable, "-m", "wsgate", "serve", "--config", str(config),
                           "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "needs a shared broker" in done.stderr and "memory://" in done.stderr


@pytest.mark.gen_test(timeout=60)
async def test_two_workers_share_the_port_and_events_reach_clients_of_both(
        redis_url, tmp_path) -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    config = write_config(tmp_path, port, redis_url)
    log = tmp_path / "serve.log"
    process = start_workers(config, log)
    clients: list[Client] = []
    try:
        await wait_for(lambda: log.read_text().count("wsgate serving on") == 2
                       or process.poll() is not None, timeout=30, interval=0.1)
        assert process.poll() is None, log.read_text()
        base = f"http://127.0.0.1:{port}"
        node_of: dict[str, str] = {}
        db = sqlite3.connect(f"{tmp_path}/audit.db")
        # The kernel spreads connections over the workers' sockets; open clients
        # until both workers hold some (the audit rows tell which node has which).
        for _ in range(40):
            ws = await tornado.websocket.websocket_connect(
                f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token")
            client = Client(ws)
            clients.append(client)
            hello = await client.recv()
            reply = await client.subscribe(C)
            assert reply["topics"] == [C], reply
            node_of[hello["connection_id"]] = db.execute(
                "SELECT node_id FROM audit_rows WHERE connection_id = ?",
                (hello["connection_id"],)).fetchone()[0]
            if len(set(node_of.values())) == 2 and len(clients) >= 4:
                break
        db.close()
        assert set(node_of.values()) == {"wk-w1", "wk-w2"}, log.read_text()
        # Each worker is its own Redis subscriber of the scope.
        admin_client = redis.Redis.from_url(test_broker_redis.REDIS_URL)
        prefix = redis_url.split("prefix=")[1]
        channel = f"{prefix}scope:{C}"
        await wait_for(lambda: dict(admin_client.pubsub_numsub(channel))[channel.encode()] == 2)
        admin_client.close()
        http = tornado.httpclient.AsyncHTTPClient()
        response = await http.fetch(
            base + "/v1.0/events", method="POST", body=json.dumps(event()),
            headers={"Authorization": f"Bearer {INGEST_KEY}",
                     "Content-Type": "application/json"})
        event_id = json.loads(response.body)["event_ids"][0]
        for client in clients:
            assert (await client.recv())["event_id"] == event_id
        for client in clients:
            await client.no_frame(wait=0.05)
        process.send_signal(signal.SIGTERM)
        for client in clients:
            assert await client.closed() == 1001
        assert await asyncio.get_running_loop().run_in_executor(
            None, lambda: process.wait(timeout=20)) == 0, log.read_text()
    finally:
        for client in clients:
            client.close()
        stop_workers(process)


def audit_rows(url: str) -> list[tuple[Any, ...]]:
    from tests.test_hardening import db_rows

    return [(r["node_id"], r["seq"], r["action"], r["topic"], r["code"], r["row_hash"])
            for r in db_rows(url)]


@pytest.mark.gen_test(timeout=120)
async def test_a_second_serve_workers_of_the_same_config_exits_1_and_writes_nothing(
        redis_url, backend: Backend, tmp_path) -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    config = write_config(tmp_path, port, redis_url, backend.url)
    log = tmp_path / "serve.log"
    process = start_workers(config, log)
    client = None
    try:
        await wait_for(lambda: log.read_text().count("wsgate serving on") == 2
                       or process.poll() is not None, timeout=30, interval=0.1)
        assert process.poll() is None, log.read_text()
        ws = await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token")
        client = Client(ws)
        assert (await client.recv())["type"] == "connected"
        assert (await client.subscribe(C))["topics"] == [C]
        before = audit_rows(backend.url)
        # SO_REUSEPORT would let it bind the port too: the probe (a bind without
        # SO_REUSEPORT) turns it away before it takes or writes anything.
        second = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(config), "--workers", "2"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            _, stderr = await asyncio.get_running_loop().run_in_executor(
                None, lambda: second.communicate(timeout=60))
        finally:
            if second.poll() is None:  # its workers too: they are its process group
                os.killpg(second.pid, signal.SIGKILL)
                second.communicate()
        assert second.returncode == 1, stderr
        assert stderr == (f"wsgate: cannot listen on 127.0.0.1:{port}: Address already in "
                          "use (another process listens there: is this config served "
                          "already?)\n"), stderr
        assert audit_rows(backend.url) == before
        assert not list(tmp_path.glob("audit.journal*"))
        assert (await client.subscribe(f"{C}:after"))["topics"] == [f"{C}:after"]
        after = audit_rows(backend.url)
        assert after[:-1] == before and after[-1][2:4] == ("subscribe", f"{C}:after")
        assert not [r for r in after if r[4] == "unclean_shutdown"]
        client.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(
            None, lambda: process.wait(timeout=20)) == 0, log.read_text()
    finally:
        if client is not None:
            client.close()
        stop_workers(process)
    verify = subprocess.run([sys.executable, "-m", "wsgate", "audit", "verify", "--config",
                             str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.gen_test(timeout=120)
async def test_a_second_serve_workers_of_another_config_on_a_served_port_exits_1(
        redis_url, tmp_path) -> None:
    """SO_REUSEPORT would let an independent instance (another config, so another
    node id and another node lock) join the port and take part of its traffic:
    it is refused at start, naming the port, and writes nothing."""
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    config = write_config(tmp_path, port, redis_url)
    log = tmp_path / "serve.log"
    process = start_workers(config, log)
    other = tmp_path / "other"
    other.mkdir()
    other_config = other / "wsgate.toml"
    other_config.write_text(
        config.read_text().replace('node_id = "wk"', 'node_id = "intruder"')
        .replace(f"{tmp_path}/audit", f"{other}/audit")
        .replace(f'keys = ["{INGEST_KEY}"]', 'keys = ["only-the-intruder-key"]'))
    try:
        await wait_for(lambda: log.read_text().count("wsgate serving on") == 2
                       or process.poll() is not None, timeout=30, interval=0.1)
        assert process.poll() is None, log.read_text()
        second = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(other_config),
             "--workers", "2"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            _, stderr = await asyncio.get_running_loop().run_in_executor(
                None, lambda: second.communicate(timeout=30))
        except subprocess.TimeoutExpired:
            stderr = "(still running after 30 s: it joined the port)"
        finally:
            if second.poll() is None:  # its workers too: they are its process group
                os.killpg(second.pid, signal.SIGKILL)
                second.communicate()
        assert second.returncode == 1, stderr
        assert stderr.startswith(f"wsgate: cannot listen on 127.0.0.1:{port}: "), stderr
        assert "Address already in use" in stderr, stderr
        assert not list(other.glob("audit*")), list(other.iterdir())  # wrote nothing
        # Every POST is answered by the first instance: the intruder's key never works.
        http = tornado.httpclient.AsyncHTTPClient()
        for _ in range(20):
            response = await http.fetch(
                f"http://127.0.0.1:{port}/v1.0/events", method="POST",
                body=json.dumps(event()), raise_error=False,
                headers={"Authorization": "Bearer only-the-intruder-key",
                         "Content-Type": "application/json"})
            assert response.code == 401, response.body
        process.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(
            None, lambda: process.wait(timeout=20)) == 0, log.read_text()
    finally:
        stop_workers(process)


@pytest.mark.gen_test(timeout=60)
async def test_serve_workers_probes_and_binds_under_the_port_startup_lock(
        redis_url, tmp_path) -> None:
    """Two servers starting in the same instant must not both pass their probes
    before either binds: a server waits for the port's startup lock, and probes
    only once the one holding it is done (here: has bound the port)."""
    import fcntl
    import socket

    from wsgate.__main__ import port_startup_lock_path

    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    config = write_config(tmp_path, port, redis_url)
    fd = os.open(port_startup_lock_path("127.0.0.1", port), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another server is starting on this port"
    log = tmp_path / "serve.log"
    process = start_workers(config, log)
    holder = None
    try:
        await asyncio.sleep(2.0)  # long enough to have bound, had it not waited
        assert process.poll() is None, log.read_text()
        holder = socket.create_server(("127.0.0.1", port))  # the other one binds first
        fcntl.flock(fd, fcntl.LOCK_UN)
        code = await asyncio.get_running_loop().run_in_executor(
            None, lambda: process.wait(timeout=30))
        assert code == 1, log.read_text()
        assert f"wsgate: cannot listen on 127.0.0.1:{port}: Address already in use" \
            in log.read_text()
        assert not list(tmp_path.glob("audit*"))
    finally:
        os.close(fd)
        if holder is not None:
            holder.close()
        stop_workers(process)
