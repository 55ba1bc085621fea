"""One process per node (SPEC §5): the node lock, the SQLite migration lock, and
what a second ``wsgate serve`` of a node that is already served does (exit 1,
write nothing), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tornado.websocket
from sqlalchemy.engine import URL

from tests import audit_helpers, test_crash
from tests.audit_helpers import Backend
from tests.conftest import CUSTOMER, TOKENS, Client, wait_for_blocking
from tests.test_crash import REPO, ServeProcess, audit_cli, toml_value, unused_port
from tests.test_hardening import db_rows
from wsgate.audit import nodelock, store
from wsgate.audit.nodelock import NodeBusy, NodeLockError

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured
pg_schema_url = test_crash.pg_schema_url  # a fresh schema on the test PostgreSQL

C = f"customer_id:{CUSTOMER}"


# -- the lock ----------------------------------------------------------------------------


def test_a_node_id_is_locked_once_until_released(backend: Backend) -> None:
    first = nodelock.acquire(backend.url, "node-a", "pid 1 on host-1, port 8080")
    try:
        with pytest.raises(NodeBusy) as refused:
            nodelock.acquire(backend.url, "node-a")
        assert refused.value.node_id == "node-a"
        assert "pid 1 on host-1, port 8080" in refused.value.holder
        assert str(refused.value).startswith(
            "node id 'node-a' is already served by another process: ")
        assert refused.value.where in str(refused.value)
        with nodelock.acquire(backend.url, "node-b"):  # another node id: its own lock
            pass
    finally:
        first.release()
    first.release()  # idempotent
    with nodelock.acquire(backend.url, "node-a") as again:
        assert again.where == first.where
    # Nothing was written to the store: it has no tables yet.
    with pytest.raises(store.AuditStoreError, match="no audit tables"):
        store.require_schema(backend.engine())


def test_the_lock_of_a_killed_process_is_free_again(backend: Backend) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\n"
         "from wsgate.audit import nodelock\n"
         f"nodelock.acquire({backend.url!r}, 'node-a')\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(NodeBusy):
            nodelock.acquire(backend.url, "node-a")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    # PostgreSQL ends the dead client's session (and its lock) as soon as it
    # notices the closed socket: a moment after the kill, not at once.
    lock = _acquire_within(backend.url, "node-a", timeout=10)
    lock.release()


def _acquire_within(url: str, node_id: str, timeout: float) -> nodelock.NodeLock:
    def attempt() -> nodelock.NodeLock | None:
        try:
            return nodelock.acquire(url, node_id)
        except NodeBusy:
            return None

    return wait_for_blocking(attempt, timeout, interval=0.05,
                             message=f"{node_id} was still locked after {timeout} s")


def test_sqlite_lock_file_sits_beside_the_database_named_by_the_node_id(
        tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    url = f"sqlite:///{tmp_path}/link/audit.db"
    with nodelock.acquire(url, "host:8080/a b", "pid 7 on h") as lock:
        path = tmp_path / "data" / "audit.db.node-host%3A8080%2Fa%20b.lock"
        assert lock.where == f"the lock file {path}"
        assert path.read_text() == "pid 7 on h\n"
        # The same file, however the database is named: relative, through a link.
        monkeypatch.chdir(tmp_path / "data")
        with pytest.raises(NodeBusy):
            nodelock.acquire("sqlite:///audit.db", "host:8080/a b")
    assert path.exists()  # left in place: the lock, not the file, means taken
    long_id = "n" * 300
    name = Path(nodelock.lock_file(str(tmp_path / "audit.db"), long_id)).name
    assert len(name) < 255 and name.startswith("audit.db.node-nnnn")
    assert name != Path(nodelock.lock_file(str(tmp_path / "audit.db"), long_id + "x")).name


def test_sqlite_lock_file_that_cannot_be_made_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(NodeLockError, match=f"cannot open the lock file {tmp_path}/no/"):
        nodelock.acquire(f"sqlite:///{tmp_path}/no/audit.db", "node-a")


def test_in_memory_sqlite_needs_no_lock(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # where a lock file of a relative name would appear
    for url in ("sqlite://", "sqlite:///:memory:",
                "sqlite:///file:mem?mode=memory&cache=shared&uri=true"):
        with nodelock.acquire(url, "node-a") as a, nodelock.acquire(url, "node-a") as b:
            assert a.where == b.where == ""
    assert list(tmp_path.iterdir()) == []


def test_other_stores_are_not_locked_and_say_so(caplog: Any) -> None:
    with nodelock.acquire("mysql+pymysql://u@127.0.0.1/audit", "node-a") as lock:
        assert lock.where == ""
    assert "no node lock on a mysql store" in caplog.text and "'node-a'" in caplog.text


@pytest.mark.postgres
def test_postgres_lock_is_per_schema_and_names_its_holder(pg_schema_url: URL) -> None:
    url = pg_schema_url.render_as_string(hide_password=False)
    public = pg_schema_url.difference_update_query(["options"])  # same database
    with nodelock.acquire(url, "node-a", "pid 1 on host-1, port 8080") as lock:
        schema = pg_schema_url.query["options"].split("=")[1]
        key = nodelock.advisory_key(schema, "node-a")
        assert lock.where == f"the PostgreSQL advisory lock {key} (schema {schema!r})"
        with nodelock.acquire(public.render_as_string(hide_password=False), "node-a"):
            pass  # another store's node of that name
        with pytest.raises(NodeBusy) as refused:
            nodelock.acquire(url, "node-a")
        assert refused.value.holder.startswith("'wsgate pid 1 on host-1, port 8080' from ")
        # The lock's session is not left in a transaction for the life of the process.
        engine = sa.create_engine(pg_schema_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'wsgate pid 1 on host-1, port 8080' AND state = 'idle'")).scalar() == 1
        finally:
            engine.dispose()


@pytest.mark.postgres
def test_postgres_lock_outlives_an_idle_session_timeout(pg_schema_url: URL) -> None:
    import time

    # As if the DBA ended idle sessions after 100 ms: the lock's session is exempt.
    options = pg_schema_url.query["options"] + " -cidle_session_timeout=100"
    idle_limited = pg_schema_url.update_query_dict({"options": options})
    with nodelock.acquire(idle_limited.render_as_string(hide_password=False), "node-a"):
        time.sleep(0.5)  # five timeouts: a session subject to it would be gone
        with pytest.raises(NodeBusy):
            nodelock.acquire(pg_schema_url.render_as_string(hide_password=False), "node-a")


def test_postgres_unreachable_is_an_error_not_a_refusal() -> None:
    with pytest.raises(NodeLockError, match="cannot be opened to take the node lock") as info:
        nodelock.acquire("postgresql+psycopg://postgres@127.0.0.1:1/none", "node-a")
    assert not isinstance(info.value, NodeBusy)


# -- the SQLite migration lock -------------------------------------------------------------


def test_sqlite_migrations_of_one_new_file_take_turns(tmp_path: Path) -> None:
    # Another process is migrating the new file: it holds the migration lock and
    # a write transaction. SQLite would refuse to switch the file to WAL at once
    # ("database is locked", without waiting for its busy timeout).
    path = tmp_path / "audit.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_migration (x)")
    lock_fd = os.open(f"{path}.migrate.lock", os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    engine = store.make_engine(f"sqlite:///{path}", writer=True)
    failed: list[BaseException] = []

    def migrate() -> None:
        try:
            store.migrate(engine)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=migrate)
    try:
        thread.start()
        thread.join(0.5)
        assert not failed, failed
        assert thread.is_alive()  # waiting for its turn
        other.execute("COMMIT")
        os.close(lock_fd)
        lock_fd = -1
        thread.join(30)
        assert not thread.is_alive() and not failed, failed
        store.require_schema(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        other.close()
        thread.join(30)
        engine.dispose()


# -- a second `wsgate serve` -------------------------------------------------------------------


def serve_config(tmp_path: Path, name: str, port: int, audit_url: str, **server: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "node_id": "lock-node",
                   "shutdown_timeout": 5.0, **server},
        "auth": {"plugin": "static"},
        "auth.options": {"tokens": TOKENS},
        "permissions": {"plugin": "voipbin"},
        "ingest": {"keys": ["test-ingest-key"]},
        "audit": {"url": audit_url, "journal_path": f"{tmp_path}/audit.journal"},
        "broker": {"url": "memory://"},
    }
    text = "".join(f"[{t}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                   for t, values in tables.items())
    path = tmp_path / name
    path.write_text(text)
    return path


async def run_serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``wsgate serve`` run to its end (off the event loop, which keeps serving clients)."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
        [sys.executable, "-m", "wsgate", "serve", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(REPO)}))


async def connect(port: int) -> Client:
    ws = await tornado.websocket.websocket_connect(
        f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token")
    client = Client(ws)
    assert (await client.recv())["type"] == "connected"
    return client


def chain(url: str) -> list[tuple[Any, ...]]:
    return [(r["node_id"], r["seq"], r["action"], r["topic"], r["code"], r["row_hash"])
            for r in db_rows(url)]


async def second_serve_changes_nothing(backend: Backend, tmp_path: Path, port: int,
                                       second: Path, *args: str) -> str:
    """Serve node lock-node on port with a subscription open, run ``serve`` with
    ``second``; check it exited 1 and changed nothing; return its stderr."""
    config = serve_config(tmp_path, "wsgate.toml", port, backend.url)
    first = ServeProcess(tmp_path, port, config, "first")
    client = None
    try:
        await first.ready()
        client = await connect(port)
        assert (await client.subscribe(f"{C}:held"))["topics"] == [f"{C}:held"]
        before = chain(backend.url)
        done = await run_serve(second, *args)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        # Nothing written: no unclean_shutdown, no journal, the chain as it was.
        assert chain(backend.url) == before
        assert not (tmp_path / "audit.journal").exists()
        # The first server is unharmed: it goes on numbering its rows.
        assert (await client.subscribe(f"{C}:after"))["topics"] == [f"{C}:after"]
        after = chain(backend.url)
        assert after[:-1] == before
        assert after[-1][:4] == ("lock-node", before[-1][1] + 1, "subscribe", f"{C}:after")
        assert not [r for r in after if r[4] == "unclean_shutdown"]
        response = await first_http(port, "/readyz")
        assert response == 200
        verify = audit_cli(config, "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        client.close()
        first.proc.send_signal(signal.SIGTERM)
        assert await first.wait(15) == 0, first.output()
    finally:
        if client is not None:
            client.close()
        first.close()
    return done.stderr


async def first_http(port: int, path: str) -> int:
    import tornado.httpclient

    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", raise_error=False)
    return response.code


@pytest.mark.gen_test(timeout=120)
async def test_a_second_serve_of_the_same_config_exits_1_naming_the_port_and_writes_nothing(
        backend: Backend, tmp_path: Path) -> None:
    port = unused_port()
    stderr = await second_serve_changes_nothing(backend, tmp_path, port,
                                                tmp_path / "wsgate.toml")
    assert stderr.strip() == (
        f"wsgate: cannot listen on 127.0.0.1:{port}: Address already in use (another "
        "process listens there: is this config served already?)"), stderr


@pytest.mark.gen_test(timeout=120)
async def test_a_second_serve_of_the_node_id_on_another_port_exits_1_and_writes_nothing(
        backend: Backend, tmp_path: Path) -> None:
    other_port = unused_port()
    other = serve_config(tmp_path, "other.toml", other_port, backend.url)
    stderr = await second_serve_changes_nothing(backend, tmp_path, unused_port(), other)
    assert stderr.startswith(
        f"wsgate: node id 'lock-node' is already served by another process (port "
        f"{other_port}): "), stderr
    assert "is held by" in stderr and ", port " in stderr  # the holder, and its port
    # Nothing listens on the refused port.
    with pytest.raises(OSError):
        await first_http(other_port, "/healthz")
