"""One process per node (SPEC §5): the node lock and the SQLite migration lock,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests import audit_helpers
from tests.audit_helpers import PG_ENV, Backend
from tests.test_crash import REPO
from wsgate.audit import nodelock, store
from wsgate.audit.nodelock import NodeBusy, NodeLockError

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


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
         "import sys, time\n"
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
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return nodelock.acquire(url, node_id)
        except NodeBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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


def test_in_memory_sqlite_needs_no_lock(tmp_path: Path) -> None:
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
def test_postgres_lock_is_per_schema_and_names_its_holder(backend: Backend) -> None:
    if backend.name != "postgres":
        pytest.skip("PostgreSQL only")
    base = os.environ[PG_ENV]  # the same database, schema public
    with nodelock.acquire(backend.url, "node-a", "pid 1 on host-1, port 8080") as lock:
        schema = make_url(backend.url).query["options"].split("=")[1]
        key = nodelock.advisory_key(schema, "node-a")
        assert lock.where == f"the PostgreSQL advisory lock {key} (schema {schema!r})"
        with nodelock.acquire(base, "node-a"):  # another store's node of that name
            pass
        with pytest.raises(NodeBusy) as refused:
            nodelock.acquire(backend.url, "node-a")
        assert refused.value.holder.startswith("'wsgate pid 1 on host-1, port 8080' from ")
        # The lock's session is not left in a transaction for the life of the process.
        assert backend.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
            "'wsgate pid 1 on host-1, port 8080' AND state = 'idle'") == 1


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
