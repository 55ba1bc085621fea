"""AuditWriter: rows committed, group commit, fail closed, journal, exactly once, restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests import audit_helpers
from tests.audit_helpers import (
    ALICE,
    KEY1,
    T0,
    Backend,
    awrite_log,
    conn_info,
    end,
    rec,
    topic,
)
from tests.conftest import wait_for
from wsgate.audit import chain, store
from wsgate.audit.orm import EVENTS, ROWS
from wsgate.audit.records import (
    REJECTED,
    AuditRecord,
    AuditUnavailable,
    ConnectionInfo,
    EventRecord,
)
from wsgate.audit.writer import _EVENT_LIMITS, _ROW_LIMITS, AuditWriter
from wsgate.plugins import Principal

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


def rows(b: Backend, where: str = "1=1") -> list[dict[str, Any]]:
    with b.engine().connect() as conn:
        from sqlalchemy import text

        return [dict(r._mapping) for r in conn.execute(
            text(f"SELECT * FROM audit_rows WHERE {where} ORDER BY node_id, seq"))]


def journal_lines(b: Backend) -> list[str]:
    p = Path(b.tmp / "audit.journal")
    return p.read_text().splitlines() if p.exists() else []


@pytest.mark.gen_test(timeout=30)
async def test_rows_are_written_and_read_back_with_every_field(backend: Backend) -> None:
    w = AuditWriter(backend.config(), "node-a")
    await w.start()
    try:
        await w.write_subscribes([rec(topic("call"), at=T0),
                                  rec("bad topic\x00é", outcome=REJECTED, code="invalid_topic",
                                      at=T0)])
        await w.write_ends([end(topic("call"), at=T0)])
        assert w.healthy()
    finally:
        await w.close()
    got = rows(backend)
    assert [(r["seq"], r["action"], r["outcome"], r["code"]) for r in got] == [
        (1, "subscribe", "accepted", ""), (2, "subscribe", "rejected", "invalid_topic"),
        (3, "unsubscribe", "accepted", "client")]
    first = got[0]
    assert first["occurred_at"] == "2024-05-01T12:00:00.123456Z"
    assert (first["node_id"], first["connection_id"], first["topic"]) == (
        "node-a", "c1", topic("call"))
    assert (first["kind"], first["subject"], first["customer_id"], first["agent_id"]) == (
        "agent", "alice", ALICE.customer_id, ALICE.agent_id)
    assert (first["authenticator"], first["remote_addr"], first["origin"],
            first["user_agent"]) == ("static", "10.0.0.1", "https://app.example.com",
                                     "pytest/1.0")
    # A NUL from a client is stored (as U+FFFD) the same way on every backend.
    assert got[1]["topic"] == "bad topic\ufffdé"
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=30)
async def test_many_concurrent_subscribes_share_few_transactions(backend: Backend) -> None:
    w = AuditWriter(backend.config(group_commit_ms=20.0), "node-a")
    await w.start()
    try:
        await asyncio.gather(*(w.write_subscribes([rec(topic("call", str(i)))])
                               for i in range(300)))
        commits = w.commits
    finally:
        await w.close()
    assert len(rows(backend)) == 300
    # 300 callers, one window of 20 ms: a handful of transactions, not 300.
    assert 1 <= commits <= 10, commits
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=30)
async def test_group_never_exceeds_max_rows(backend: Backend) -> None:
    w = AuditWriter(backend.config(group_commit_ms=50.0, group_commit_max_rows=10,
                                   signing_key=None), "node-a")
    await w.start()
    try:
        await asyncio.gather(*(w.write_subscribes([rec(topic("call", str(i)))])
                               for i in range(35)))
        largest, commits = w.largest_group, w.commits
    finally:
        await w.close()
    assert len(rows(backend)) == 35
    assert largest == 10 and commits >= 4


@pytest.mark.gen_test(timeout=60)
async def test_store_down_refuses_subscribes_journals_ends_then_recovers_once(
        backend: Backend) -> None:
    w = AuditWriter(backend.config(url=backend.outage_url()), "node-a",
                    retry_interval=0.05, busy_timeout_ms=50)
    await w.start()
    try:
        await w.write_subscribes([rec(topic("a")), rec(topic("b"))])
        with backend.outage():
            with pytest.raises(AuditUnavailable):
                await w.write_subscribes([rec(topic("c"))])
            assert not w.healthy()
            await w.write_ends([end(topic("a"), "disconnect")])
            await w.write_events([EventRecord("e-1", "call_created", (topic("call", "x"),),
                                              "bearer:abc", "0" * 64, T0)])
            with pytest.raises(AuditUnavailable):
                await w.write_subscribes([rec(topic("d"))])
            await w.write_ends([end(topic("b"), "disconnect")])
            assert len(journal_lines(backend)) == 3
        await wait_for(lambda: w.healthy() and not journal_lines(backend), timeout=10)
        await w.write_subscribes([rec(topic("e"))])
    finally:
        await w.close()
    got = rows(backend)
    assert [(r["seq"], r["action"], r["topic"].rsplit(":", 1)[1]) for r in got] == [
        (1, "subscribe", "a"), (2, "subscribe", "b"), (3, "unsubscribe", "a"),
        (4, "unsubscribe", "b"), (5, "subscribe", "e")]
    assert backend.scalar("SELECT count(*) FROM audit_events") == 1
    result = store.verify(backend.engine(), backend.key.public_key())
    assert result.ok, result.problems


@pytest.mark.gen_test(timeout=60)
async def test_journal_replayed_twice_after_a_crash_stores_each_row_once(
        backend: Backend) -> None:
    cfg = backend.config(url=backend.outage_url())
    w = AuditWriter(cfg, "node-a", retry_interval=0.05, busy_timeout_ms=50)
    await w.start()
    try:
        with backend.outage():
            await w.write_ends([end(topic("a")), end(topic("b"))])
        saved = Path(cfg.journal_path).read_text()
        await wait_for(lambda: not journal_lines(backend), timeout=10)
    finally:
        await w.close()
    # The process died after the commit but before the journal was emptied.
    Path(cfg.journal_path).write_text(saved)
    w2 = AuditWriter(cfg, "node-a")
    await w2.start()
    try:
        await w2.write_ends([end(topic("c"))])
    finally:
        await w2.close()
    got = rows(backend, "action = 'unsubscribe'")
    assert [r["seq"] for r in got] == [1, 2, 3]
    assert not journal_lines(backend)
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=60)
async def test_journal_left_by_a_crash_is_written_at_start(backend: Backend) -> None:
    cfg = backend.config(url=backend.outage_url())
    w = AuditWriter(cfg, "node-a", retry_interval=60, busy_timeout_ms=50)
    await w.start()
    await w.write_subscribes([rec(topic("a"))])
    backend.cut()
    await w.write_ends([end(topic("a"), "disconnect")])
    entries = [json.loads(line) for line in journal_lines(backend)]
    assert [e["row"]["seq"] for e in entries] == [2]
    await w.close()  # the store is still down: the row stays in the journal
    assert journal_lines(backend)
    backend.restore()
    w2 = AuditWriter(cfg, "node-a")
    await w2.start()
    await w2.close()
    assert [(r["seq"], r["action"]) for r in rows(backend)] == [
        (1, "subscribe"), (2, "unsubscribe")]
    assert not journal_lines(backend)


@pytest.mark.gen_test(timeout=30)
async def test_start_closes_subscriptions_left_open_by_a_crash(backend: Backend) -> None:
    cfg = backend.config()
    other = AuditWriter(cfg, "node-b")
    await other.start()
    await other.write_subscribes([rec(topic("x"), conn=conn_info("cb"))])
    await other.close()
    w = AuditWriter(cfg, "node-a")
    await w.start()
    c2 = conn_info("c2", KEY1, "10.0.0.2")
    await w.write_subscribes([rec(topic("a")), rec(topic("b")), rec(topic("b")),
                              rec(topic("z"), outcome=REJECTED, code="forbidden"),
                              rec(topic("k", customer=KEY1.customer_id or ""), conn=c2)])
    await w.write_ends([end(topic("a"))])
    await w.close()  # no disconnect rows: as if the process had died
    again = AuditWriter(cfg, "node-a")
    await again.start()
    await again.close()
    closed = rows(backend, "code = 'unclean_shutdown'")
    assert sorted((r["node_id"], r["connection_id"], r["topic"].rsplit(":", 1)[1])
                  for r in closed) == [("node-a", "c1", "b"), ("node-a", "c2", "k")]
    k = next(r for r in closed if r["connection_id"] == "c2")
    assert (k["action"], k["outcome"], k["kind"], k["subject"], k["remote_addr"]) == (
        "unsubscribe", "accepted", "accesskey", "key-1", "10.0.0.2")
    # Nothing left open: a second restart adds nothing.
    third = AuditWriter(cfg, "node-a")
    await third.start()
    await third.close()
    assert len(rows(backend, "code = 'unclean_shutdown'")) == 2
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=30)
async def test_start_fails_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    from wsgate.config import AuditConfig

    cfg = AuditConfig(url=f"sqlite:///{tmp_path}/missing/dir/audit.db",
                      journal_path=str(tmp_path / "j"))
    w = AuditWriter(cfg, "node-a")
    with pytest.raises(AuditUnavailable, match="cannot be opened"):
        await w.start()
    with pytest.raises(AuditUnavailable):
        await w.write_subscribes([rec(topic("a"))])
    await w.close()


@pytest.mark.gen_test(timeout=30)
async def test_checkpoints_are_signed_every_n_rows_and_at_close(backend: Backend) -> None:
    w = AuditWriter(backend.config(checkpoint_every=5, group_commit_ms=0), "node-a")
    await w.start()
    try:
        for i in range(12):
            await w.write_subscribes([rec(topic("call", str(i)))])
    finally:
        await w.close()
    with backend.engine().connect() as conn:
        from sqlalchemy import text

        cps = [tuple(r) for r in conn.execute(text(
            "SELECT chain, seq, kind FROM audit_checkpoints ORDER BY id"))]
    assert cps == [("rows", 0, "start"), ("events", 0, "start"), ("rows", 5, "periodic"),
                   ("rows", 10, "periodic"), ("rows", 12, "close"), ("events", 0, "close")]
    assert store.verify(backend.engine(), backend.key.public_key()).checkpoints_checked == 6


@pytest.mark.gen_test(timeout=60)
async def test_one_big_group_commit_is_signed_at_the_exact_rows(backend: Backend) -> None:
    """A checkpoint lands on every 5th row even when 12 rows share one transaction,
    so checkpoints are never further apart than the signed policy says."""
    w = AuditWriter(backend.config(checkpoint_every=5, group_commit_ms=0), "node-a")
    await w.start()
    try:
        await w.write_subscribes([rec(topic("call", str(i))) for i in range(12)])
        with backend.engine().connect() as conn:
            from sqlalchemy import text

            cps = [tuple(r) for r in conn.execute(text(
                "SELECT chain, seq, kind, policy FROM audit_checkpoints "
                "WHERE kind = 'periodic' ORDER BY id"))]
    finally:
        await w.close()
    policy = '{"checkpoint_every":5,"checkpoint_interval":60.0,"slack":0}'
    assert cps == [("rows", 5, "periodic", policy), ("rows", 10, "periodic", policy)]


@pytest.mark.gen_test(timeout=60)
async def test_rows_left_unsealed_are_signed_after_checkpoint_interval(backend: Backend) -> None:
    w = AuditWriter(backend.config(checkpoint_every=1000, checkpoint_interval=0.2,
                                   group_commit_ms=0), "node-a")
    await w.start()
    try:
        await w.write_subscribes([rec(topic("call", str(i))) for i in range(3)])

        def kinds() -> list[tuple[str, int, str]]:
            with backend.engine().connect() as conn:
                from sqlalchemy import text

                return [tuple(r) for r in conn.execute(text(
                    "SELECT chain, seq, kind FROM audit_checkpoints ORDER BY id"))]

        await wait_for(lambda: ("rows", 3, "interval") in kinds(), timeout=10)
        # Nothing new to seal: no further interval checkpoint, and the events chain
        # (no events) was never sealed by one.
        await asyncio.sleep(0.5)
        assert [k for k in kinds() if k[2] == "interval"] == [("rows", 3, "interval")]
    finally:
        await w.close()
    result = store.verify(backend.engine(), backend.key.public_key())
    assert result.ok and not result.unsealed


@pytest.mark.gen_test(timeout=60)
async def test_submitted_subscribes_are_answered_by_callback_once_each(
        backend: Backend) -> None:
    w = AuditWriter(backend.config(url=backend.outage_url()), "node-a",
                    retry_interval=0.05, busy_timeout_ms=50)
    await w.start()
    answers: dict[str, list[Exception | None]] = {}
    settled = asyncio.Event()

    def submit(name: str) -> None:
        def done(error: Exception | None) -> None:
            answers.setdefault(name, []).append(error)
            settled.set()
        w.submit_subscribes([rec(topic(name))], done)
        assert name not in answers  # never answered before submit returns

    async def answered(*names: str) -> None:
        while not all(n in answers for n in names):
            settled.clear()
            await asyncio.wait_for(settled.wait(), 20)

    try:
        for name in ("a", "b", "c"):  # one group commit, three callbacks
            submit(name)
        await answered("a", "b", "c")
        with backend.outage():
            submit("d")  # its commit fails: only d is refused
            await answered("d")
        await wait_for(w.healthy, timeout=10)
        submit("e")
        await answered("e")
    finally:
        await w.close()
    assert answers["a"] == answers["b"] == answers["c"] == answers["e"] == [None]
    assert len(answers["d"]) == 1 and isinstance(answers["d"][0], AuditUnavailable)
    assert [r["topic"].rsplit(":", 1)[1] for r in rows(backend)] == ["a", "b", "c", "e"]
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=10)
async def test_submit_to_a_closed_writer_is_refused_by_callback(backend: Backend) -> None:
    w = AuditWriter(backend.config(), "node-a")
    await w.start()
    await w.close()
    answer: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    w.submit_subscribes([rec(topic("a"))], answer.set_result)
    assert not answer.done()
    assert isinstance(await answer, AuditUnavailable)


def test_sqlite_writer_keeps_wal_and_full_sync(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path}/audit.db", writer=True)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == \
                store.WAL_CHECKPOINT_PAGES
    finally:
        engine.dispose()


@pytest.mark.gen_test(timeout=60)
async def test_a_write_the_store_refuses_keeps_readyz_false_while_subscribes_fail(
        backend: Backend, make_server: Any, caplog: Any) -> None:
    # Not an outage: the store answers, but refuses the node's next row (another
    # process wrote as this node and took its next seq). SELECT 1 still works.
    server = await make_server(audit={"url": backend.url, "retry_interval": 0.05})
    client = await server.connect()
    assert (await client.subscribe(topic("a")))["topics"] == [topic("a")]
    backend.execute(
        "INSERT INTO audit_rows (node_id, seq, occurred_at, connection_id, action, topic, "
        "outcome, code, kind, subject, customer_id, agent_id, authenticator, remote_addr, "
        "origin, user_agent, prev_hash, row_hash) SELECT node_id, seq + 1, occurred_at, "
        "'intruder', action, topic, outcome, code, kind, subject, customer_id, agent_id, "
        "authenticator, remote_addr, origin, user_agent, row_hash, row_hash "
        "FROM audit_rows WHERE seq = 1")
    reply = await client.subscribe(topic("b"))
    assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"]
    writer: Any = server.gateway.audit
    # The idle probe runs every 0.05 s: it either declares the store healthy or
    # reports why it cannot.
    await wait_for(lambda: writer.healthy() or "another process" in caplog.text, timeout=10)
    response = await server.http.fetch(server.base + "/readyz", raise_error=False)
    assert response.code == 503 and json.loads(response.body)["checks"]["audit"] is False
    reply = await client.subscribe(topic("c"))
    assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"]
    assert not writer.healthy()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"
              and "another process" in r.getMessage()]
    assert len(errors) == 1, errors
    assert "'test-node'" in errors[0] and "seq 2" in errors[0] and "seq 1" in errors[0]


@pytest.mark.gen_test(timeout=60)
async def test_journaled_rows_that_clash_with_stored_ones_are_kept_not_dropped(
        backend: Backend, caplog: Any) -> None:
    """A journal entry whose seq another process already filled (with another row)
    cannot be stored: it is copied aside and named in a CRITICAL line, never lost."""
    from wsgate.audit import chain
    from wsgate.audit.journal import Journal
    from wsgate.audit.writer import _RowMaker

    config = backend.config()
    await awrite_log(backend, [("sub", [rec(topic("call", str(i)))]) for i in range(3)])
    head = backend.scalar("SELECT row_hash FROM audit_rows WHERE seq = 3")

    def chained(topic_text: str, prev: str) -> dict[str, Any]:
        row = _RowMaker()(end(topic_text))
        row.update(node_id="node-a", seq=4, prev_hash=prev)
        row["row_hash"] = chain.row_hash(chain.CHAIN_ROWS, row)
        return row

    ours, theirs = chained(topic("call", "0"), head), chained(topic("call", "1"), head)
    Journal(config.journal_path).append([("rows", ours)])
    backend.execute("INSERT INTO audit_rows (" + ", ".join(theirs) + ") VALUES (" +
                    ", ".join(":" + k for k in theirs) + ")", **theirs)
    w = AuditWriter(config, "node-a")
    await w.start()
    await w.close()
    kept = sorted(Path(config.journal_path).parent.glob("audit.journal.conflict-*"))
    assert len(kept) == 1
    assert json.loads(kept[0].read_text())["row"]["row_hash"] == ours["row_hash"]
    assert any(r.levelname == "CRITICAL" and "clash" in r.getMessage() for r in caplog.records)


def test_each_text_limit_is_its_columns_width() -> None:
    # Every text column a client or a principal fills is cut, to the width orm.py
    # gives it; the topic shorter, at chain.MAX_TEXT (it is indexed).
    assert set(_ROW_LIMITS) == {c.name for c in ROWS.c} - {
        "id", "node_id", "seq", "occurred_at", "prev_hash", "row_hash"}
    for name, limit in _ROW_LIMITS.items():
        width = ROWS.c[name].type.length
        assert limit == (chain.MAX_TEXT if name == "topic" else width), name
        assert limit <= width, name
    assert set(_EVENT_LIMITS) == {"event_id", "type", "ingest_key_id", "payload_sha256"}
    for name, limit in _EVENT_LIMITS.items():
        assert limit == EVENTS.c[name].type.length, name


@pytest.mark.gen_test(timeout=30)
async def test_text_longer_than_its_column_is_cut_and_still_committed(backend: Backend) -> None:
    # PostgreSQL refuses a value longer than its column: each such value would fail
    # the whole group commit. Each is cut to exactly its limit, ending in "...".
    def over(name: str, limits: dict[str, int] = _ROW_LIMITS) -> str:
        return name[0] * (limits[name] + 10)

    principal = Principal(kind="agent", subject=over("subject"),
                          customer_id=over("customer_id"), agent_id=over("agent_id"))
    conn = ConnectionInfo(over("connection_id"), principal, over("authenticator"),
                          over("remote_addr"), over("origin"), over("user_agent"))
    long_row = AuditRecord(T0, conn, over("action"), over("topic"), over("outcome"),
                           over("code"))
    long_event = EventRecord(*(over(n, _EVENT_LIMITS) for n in (
        "event_id", "type")), (topic("call"),), over("ingest_key_id", _EVENT_LIMITS),
        over("payload_sha256", _EVENT_LIMITS), T0)
    w = AuditWriter(backend.config(), "node-a")
    await w.start()
    try:
        await w.write_subscribes([long_row])
        await w.write_events([long_event])
    finally:
        await w.close()
    [row] = rows(backend)
    assert row["kind"] == "agent"  # a Principal takes no other kind than its three
    for name, limit in _ROW_LIMITS.items():
        if name != "kind":
            assert row[name] == name[0] * (limit - 3) + "...", name
    with backend.engine().connect() as c:
        from sqlalchemy import text

        [stored] = [dict(r._mapping) for r in c.execute(text("SELECT * FROM audit_events"))]
    for name, limit in _EVENT_LIMITS.items():
        assert stored[name] == name[0] * (limit - 3) + "...", name
    assert store.verify(backend.engine(), backend.key.public_key()).ok


@pytest.mark.gen_test(timeout=60)
async def test_a_lone_write_does_not_wait_out_the_group_window(backend: Backend) -> None:
    # Window 8 s, so a quiet slice is 2 s: the lone row is committed after one
    # quiet slice, not after the window (the old writer waited the whole 8 s).
    w = AuditWriter(backend.config(group_commit_ms=8000.0, signing_key=None), "node-a")
    await w.start()
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await w.write_subscribes([rec(topic("call"))])
        took = loop.time() - began
    finally:
        await w.close()
    assert len(rows(backend)) == 1
    assert 1.9 <= took < 6.0, took


@pytest.mark.gen_test(timeout=60)
async def test_rows_that_keep_arriving_share_one_commit(backend: Backend) -> None:
    # Window 8 s, quiet slice 2 s; six writes 0.2 s apart keep the group open,
    # so they share one commit however early the first one came.
    w = AuditWriter(backend.config(group_commit_ms=8000.0, signing_key=None), "node-a")
    await w.start()
    try:
        pending = []
        for i in range(6):
            pending.append(asyncio.ensure_future(
                w.write_subscribes([rec(topic("call", str(i)))])))
            await asyncio.sleep(0.2)
        await asyncio.gather(*pending)
        commits = w.commits
    finally:
        await w.close()
    assert len(rows(backend)) == 6
    assert commits == 1, commits


@pytest.mark.gen_test(timeout=60)
async def test_callers_that_wait_for_their_answer_are_committed_once_all_are_in(
        backend: Backend) -> None:
    # Four callers each send, wait for the commit, send again (a backend with
    # four POSTs in flight). Window 8 s, quiet slice 2 s: the first group waits
    # a quiet slice; later groups are committed as soon as the four are queued
    # (the size of the last group), not a slice or a window later.
    w = AuditWriter(backend.config(group_commit_ms=8000.0, signing_key=None), "node-a")
    await w.start()
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def caller(i: int) -> None:
            for n in range(3):
                await w.write_subscribes([rec(topic("call", f"{i}-{n}"))])

        await asyncio.gather(*(caller(i) for i in range(4)))
        took = loop.time() - began
        commits, largest = w.commits, w.largest_group
    finally:
        await w.close()
    assert len(rows(backend)) == 12
    assert (commits, largest) == (3, 4)
    assert 1.9 <= took < 4.5, took


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)  # SQLite has no server to close a connection
@pytest.mark.gen_test(timeout=60)
async def test_a_connection_the_database_closed_while_idle_costs_no_refused_subscribe(
        backend: Backend) -> None:
    # PostgreSQL restarted or failed over: the writer's kept connection is dead,
    # and the next group comes sooner than the idle ping (1 s). Its first
    # statement fails; the group is written on a fresh connection instead of
    # refusing its subscribes.
    from sqlalchemy import text

    w = AuditWriter(backend.config(signing_key=None), "node-a")
    await w.start()
    try:
        await w.write_subscribes([rec(topic("a"))])
        kept = w._group._raw if w._group is not None else None  # the writer's own connection
        assert kept is not None
        pid = kept.dbapi_connection.info.backend_pid
        with backend.engine().connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        await w.write_subscribes([rec(topic("b"))])
        assert w.healthy()
    finally:
        await w.close()
    assert [r["topic"] for r in rows(backend)] == [topic("a"), topic("b")]
