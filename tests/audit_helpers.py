"""Shared fixtures of the audit tests: a store on SQLite and on PostgreSQL, outages.

Every audit test that takes ``backend`` runs twice: against a SQLite file in
tmp_path, and against the PostgreSQL named by ``WSGATE_TEST_PG_URL`` in a
fresh schema dropped afterwards. Without that variable the PostgreSQL runs
skip, except under CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from wsgate.audit import chain, store
from wsgate.audit.records import ACCEPTED, SUBSCRIBE, UNSUBSCRIBE, AuditRecord, ConnectionInfo
from wsgate.config import AuditConfig
from wsgate.plugins import Principal

PG_ENV = "WSGATE_TEST_PG_URL"
CUSTOMER = "5013bc52-da9a-11ee-844f-2fa34248de28"
OTHER_CUSTOMER = "6a1f4c2e-da9a-11ee-8d7e-0b6f3c2d1e4f"
AGENT = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

ALICE = Principal(kind="agent", subject="alice", customer_id=CUSTOMER, agent_id=AGENT,
                  permissions=frozenset({"customer_admin"}))
KEY1 = Principal(kind="accesskey", subject="key-1", customer_id=OTHER_CUSTOMER)


def conn_info(connection_id: str = "c1", principal: Principal = ALICE,
              remote_addr: str = "10.0.0.1") -> ConnectionInfo:
    return ConnectionInfo(connection_id, principal, "static", remote_addr,
                          "https://app.example.com", "pytest/1.0")


def rec(topic: str, *, action: str = SUBSCRIBE, outcome: str = ACCEPTED, code: str = "",
        at: datetime | None = None, conn: ConnectionInfo | None = None) -> AuditRecord:
    return AuditRecord(at or datetime.now(UTC), conn or conn_info(), action, topic, outcome,
                       code)


def end(topic: str, code: str = "client", **kw: Any) -> AuditRecord:
    return rec(topic, action=UNSUBSCRIBE, code=code, **kw)


def topic(*rest: str, customer: str = CUSTOMER) -> str:
    return ":".join(("customer_id", customer) + rest)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


class TCPProxy:
    """A TCP relay to a server that a test can cut and restore (a store outage)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.closed = False
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        self.up = False
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.closed = True
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)
        self.listener.close()
        with self.lock:
            for s in self.socks:
                s.close()


@dataclass
class Backend:
    """One audit store for one test: its URL, a signing key, engines to dispose."""

    name: str
    url: str
    tmp: Path
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    engines: list[Engine] = field(default_factory=list)
    proxy: TCPProxy | None = None
    _lock_conn: sqlite3.Connection | None = None

    def config(self, *, url: str | None = None, signed: bool = True, **kw: Any) -> AuditConfig:
        """An AuditConfig on this store (journal in tmp, small group window)."""
        values: dict[str, Any] = {
            "url": url or self.url, "journal_path": str(self.tmp / "audit.journal"),
            "group_commit_ms": 1.0, "checkpoint_every": 5,
        }
        if signed:
            values["signing_key"] = chain.private_pem(self.key)
        values.update(kw)
        return AuditConfig(**values)

    def engine(self) -> Engine:
        """A read/write engine for the test's own checks and tampering (disposed after)."""
        e = store.make_engine(self.url)
        self.engines.append(e)
        return e

    def execute(self, sql: str, **params: Any) -> Any:
        """Run one statement directly in the store (the tamperer's view)."""
        with self.engine().begin() as conn:
            return conn.execute(text(sql), params)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine().connect() as conn:
            return conn.execute(text(sql), params).scalar()

    # --- outages ---------------------------------------------------------------------

    def outage_url(self) -> str:
        """A URL that the outage() switch can cut (PostgreSQL: through a TCP proxy)."""
        if self.name == "sqlite":
            return self.url
        u = make_url(self.url)
        if self.proxy is None:
            self.proxy = TCPProxy(u.host or "127.0.0.1", u.port or 5432)
        return u.set(host="127.0.0.1", port=self.proxy.port).render_as_string(
            hide_password=False)

    def cut(self) -> None:
        """Make the store unwritable: SQLite: another process holds the write lock;
        PostgreSQL: the network to the server is gone."""
        if self.name == "sqlite":
            path = make_url(self.url).database
            assert path
            self._lock_conn = sqlite3.connect(path, isolation_level=None)
            self._lock_conn.execute("BEGIN EXCLUSIVE")
        else:
            assert self.proxy is not None, "use outage_url() for the writer"
            self.proxy.cut()

    def restore(self) -> None:
        if self._lock_conn is not None:
            self._lock_conn.execute("ROLLBACK")
            self._lock_conn.close()
            self._lock_conn = None
        if self.proxy is not None:
            self.proxy.restore()

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.cut()
        try:
            yield
        finally:
            self.restore()

    def close(self) -> None:
        self.restore()
        for e in self.engines:
            e.dispose()
        if self.proxy is not None:
            self.proxy.close()


def _need_pg() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_ENV} must be set under CI: the audit tests run on PostgreSQL too")
        pytest.skip(f"{PG_ENV} is not set; the PostgreSQL runs of the audit tests are skipped")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: Any, tmp_path: Path) -> Iterator[Backend]:
    """The audit store of one test, on each backend."""
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path}/audit.db", tmp_path)
        try:
            yield b
        finally:
            b.close()
        return
    base = _need_pg()
    schema = f"audit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # an unreachable server: skip or fail like any missing service
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ENV} is not usable: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ENV} is not usable: {exc}")
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    b = Backend("postgres", url.render_as_string(hide_password=False), tmp_path)
    try:
        yield b
    finally:
        b.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


async def awrite_log(b: Backend, steps: list[tuple[str, list[Any]]], node_id: str = "node-a",
                     **config: Any) -> None:
    """Write a log through a real AuditWriter.

    steps: ("sub", [AuditRecord...]), ("end", [...]) or ("event", [EventRecord...]).
    """
    from wsgate.audit.writer import AuditWriter

    w = AuditWriter(b.config(**config), node_id)
    await w.start()
    try:
        for kind, items in steps:
            if kind == "sub":
                await w.write_subscribes(items)
            elif kind == "end":
                await w.write_ends(items)
            else:
                await w.write_events(items)
    finally:
        await w.close()


def write_log(b: Backend, steps: list[tuple[str, list[Any]]], node_id: str = "node-a",
              **config: Any) -> None:
    """awrite_log, from a test that has no running event loop."""
    import asyncio

    # Not asyncio.run: it resets the current event loop to None, which leaves a
    # loop that tornado's IOLoop.make_current created (in an earlier gen_test)
    # unreferenced and unclosed, and its ResourceWarning fails a later test.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(awrite_log(b, steps, node_id, **config))
    finally:
        loop.close()
