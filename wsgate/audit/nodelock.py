"""One process per node (SPEC §5): an exclusive lock on a node id, and the
SQLite migration lock.

A node id names one audit chain. Two live processes writing one chain would
fork it (both chain from the same head: the second insert breaks ``UNIQUE
(node_id, seq)``), and each would close the other's open subscriptions as
``unclean_shutdown`` at its start. So ``wsgate serve`` takes the node lock
before it touches the store, and holds it until it exits:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a
  dedicated connection, keyed by the schema the audit tables live in and the
  node id (:func:`advisory_key`). The connection's ``application_name`` says
  who holds it; the server drops it (and the lock) about 25 seconds after this
  host stops answering, never for being idle.
- SQLite file: an OS lock (``flock``) on ``<database file>.node-<node id,
  percent-encoded>.lock`` beside the database. The file holds a line saying
  who holds it. It is left in place at exit: only the lock, never the file,
  means "taken", and the kernel drops the lock when the process dies.
- SQLite in memory: nothing to lock (no other process can see the store).
- Any other backend: no lock; :func:`acquire` logs a warning and returns a
  lock that holds nothing.

A process that dies, however it dies, releases its lock (the kernel closes the
file; PostgreSQL ends the session). Forked children inherit a held lock (the
file descriptor or the connection's socket) and keep it held while they live.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from types import TracebackType
from urllib.parse import quote

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger("wsgate.audit")

#: PostgreSQL's application_name is cut at 63 bytes.
_PG_NAME_MAX = 63
#: The longest percent-encoded node id used as is in a lock file name.
_FILE_PART_MAX = 120


class NodeLockError(Exception):
    """The node lock cannot be taken (the store or the lock file is unusable);
    the message says why."""


class NodeBusy(NodeLockError):
    """Another live process holds the node id's lock.

    Attributes:
        node_id: the node id asked for.
        where: the lock (a lock file's path, or a PostgreSQL advisory lock).
        holder: who holds it, as that process described itself ("" when unknown).
        detail: where and holder in words ("the lock file F is held by pid 7 on h").
    """

    def __init__(self, node_id: str, where: str, holder: str) -> None:
        self.node_id = node_id
        self.where = where
        self.holder = holder
        self.detail = f"{where} is held by {holder or 'another process'}"
        super().__init__(f"node id {node_id!r} is already served by another process: "
                         f"{self.detail}")


class NodeLock:
    """A node id's lock, held until :meth:`release` (or the process ends).

    Attributes:
        node_id: the node id it locks.
        where: what is held, for logs ("" when nothing is: an in-memory or
            unsupported store).
    """

    def __init__(self, node_id: str, where: str, release: Callable[[], None] | None) -> None:
        self.node_id = node_id
        self.where = where
        self._release = release

    def release(self) -> None:
        """Give the lock back. Idempotent. Not to be called in a forked child
        of the process that took it: that would release the parent's lock too."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> NodeLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def acquire(url: str, node_id: str, owner: str | None = None) -> NodeLock:
    """Take the exclusive lock on ``node_id`` for the audit store at ``url``,
    without waiting. Nothing is written to the store.

    Args:
        url: the ``[audit] url``.
        node_id: the node id to lock.
        owner: who is taking it, shown to a process refused later (default:
            ``pid <pid> on <host name>``).

    Returns:
        The held lock; release it last, after the audit writer is closed.

    Raises:
        NodeBusy: another live process holds it.
        NodeLockError: the store cannot be reached, or the lock file cannot be
            opened; the message names which.
    """
    if not node_id:
        raise ValueError("the node lock needs a node id")
    owner = owner or f"pid {os.getpid()} on {socket.gethostname()}"
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "postgresql":
        return _postgres_lock(u, node_id, owner)
    if backend == "sqlite":
        path = sqlite_file(u)
        if path is None:
            return NodeLock(node_id, "", None)
        return _file_lock(lock_file(path, node_id), node_id, owner)
    log.warning("audit: no node lock on a %s store: nothing stops a second process from "
                "serving node %r (the lock exists for SQLite and PostgreSQL)", backend, node_id)
    return NodeLock(node_id, "", None)


# --- SQLite: a file lock beside the database ----------------------------------------------

def sqlite_file(url: str | URL) -> str | None:
    """The database file of a SQLite URL, or None when it is in memory (or not SQLite)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if str(u.query.get("uri", "")).lower() in ("true", "1"):
        if u.query.get("mode") == "memory":
            return None
        db = db.removeprefix("file:").split("?", 1)[0]
    if db in ("", ":memory:"):
        return None
    return db


def lock_file(db_path: str, node_id: str) -> str:
    """The node lock file of ``node_id`` beside the SQLite database ``db_path``:
    ``<db_path, symlinks resolved>.node-<node id, percent-encoded>.lock``."""
    part = quote(node_id, safe="")
    if len(part) > _FILE_PART_MAX:  # a file name has at most 255 bytes
        part = part[:80] + "-" + hashlib.sha256(node_id.encode()).hexdigest()[:32]
    return f"{os.path.realpath(db_path)}.node-{part}.lock"


@contextlib.contextmanager
def sqlite_migration_lock(url: str | URL) -> Iterator[None]:
    """Hold ``<database file>.migrate.lock`` (waiting for it) while a SQLite
    database is opened and migrated; a no-op for other stores.

    SQLite does not wait for its busy timeout when a connection switches a new
    file to WAL mode while another connection writes it: it fails at once with
    "database is locked". Processes that start together on one new file (the
    workers of ``serve --workers``) take turns here instead.

    Raises:
        NodeLockError: the lock file cannot be opened.
    """
    path = sqlite_file(url)
    if path is None:
        yield
        return
    fd = _open_lock_file(f"{os.path.realpath(path)}.migrate.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor drops the lock


def _open_lock_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise NodeLockError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None


def _file_lock(path: str, node_id: str, owner: str) -> NodeLock:
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise NodeBusy(node_id, f"the lock file {path}", holder) from None
        raise NodeLockError(f"cannot lock {path}: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}\n".encode(), 0)
    except OSError:
        pass  # only a courtesy to the operator: the lock is what counts

    def release() -> None:
        os.close(fd)

    return NodeLock(node_id, f"the lock file {path}", release)


# --- PostgreSQL: a session-level advisory lock ---------------------------------------------

def advisory_key(schema: str, node_id: str) -> int:
    """The advisory lock key of ``node_id``'s chains in ``schema``: the first 8
    bytes of SHA-256 of ``wsgate-node:<schema>:<node id>``, as a signed 64-bit
    integer (PostgreSQL's ``bigint``).

    The schema is part of the key because the audit store is a schema: two
    stores in one database (say, a test's and production's) may each have a
    node of the same name; advisory locks are already per database.
    """
    digest = hashlib.sha256(f"wsgate-node:{schema}:{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _postgres_lock(u: URL, node_id: str, owner: str) -> NodeLock:
    engine = create_engine(u, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        # AUTOCOMMIT: the session holds the lock, not an open transaction (which
        # would sit "idle in transaction" for the life of the process).
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = getattr(exc, "orig", None) or exc
        raise NodeLockError(f"the audit store cannot be opened to take the node lock: "
                            f"{str(reason).strip()}") from None
    try:
        schema = str(conn.execute(text("SELECT current_schema()")).scalar() or "")
        key = advisory_key(schema, node_id)
        where = f"the PostgreSQL advisory lock {key} (schema {schema!r})"
        for name, value in _pg_session_settings(conn, owner).items():
            conn.execute(text("SELECT set_config(:name, :value, false)"),
                         {"name": name, "value": value})
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            raise NodeBusy(node_id, where, _pg_holder(conn, key))
    except NodeBusy:
        conn.close()
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        conn.close()
        engine.dispose()
        reason = getattr(exc, "orig", None) or exc
        raise NodeLockError(f"the node lock cannot be taken: {str(reason).strip()}") from None

    def release() -> None:
        # Ending the session releases its advisory locks.
        try:
            conn.close()
        finally:
            engine.dispose()

    return NodeLock(node_id, where, release)


def _pg_session_settings(conn: Connection, owner: str) -> dict[str, str]:
    """Settings of the lock's session: who holds it, and how long it lasts.

    The lock lasts as long as the session. The server must not end it for
    idling (``idle_session_timeout``, PostgreSQL 14+), and must notice soon
    when this host is gone: otherwise a dead host's lock would outlive it by
    the system's TCP keepalive time (two hours on Linux), and refuse its
    replacement as long. With these, about 25 seconds.
    """
    settings = {"application_name": f"wsgate {owner}"[:_PG_NAME_MAX],
                "tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                "tcp_keepalives_count": "3"}
    if int(conn.execute(text("SHOW server_version_num")).scalar() or 0) >= 140000:
        settings["idle_session_timeout"] = "0"
    return settings


def _pg_holder(conn: Connection, key: int) -> str:
    """Who holds advisory lock ``key``: its session's application_name and
    address, as far as this role may see them ("" when it may not)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    try:
        row = conn.execute(text(
            "SELECT a.application_name, host(a.client_addr) FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = :hi AND l.objid::bigint = :lo"),
            {"hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}).first()
    except SQLAlchemyError:
        return ""
    if row is None or not row[0]:
        return ""
    return f"{row[0]!r}" + (f" from {row[1]}" if row[1] else "")
