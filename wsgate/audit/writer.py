"""AuditWriter: the audit sink the gateway writes through (SPEC §5).

All database work runs on one dedicated thread with a synchronous engine, so
the event loop never blocks on the store. The thread group-commits: it takes
the first queued write, waits up to ``group_commit_ms`` for more (at most
``group_commit_max_rows`` rows; it stops early once a quarter of that passes
with no new row, or once as many rows are queued as the last group took),
chains them in order, inserts them in one transaction, commits, then settles
every caller's future through ``loop.call_soon_threadsafe``.

Failure rules:

- subscribe rows are fail closed: if the transaction fails the callers get
  :class:`AuditUnavailable` and the chain head does not move;
- end rows and events are never dropped: they are chained and appended to
  the journal (fsynced), and replayed into the store, in order and exactly
  once, before anything else is written when the store is back.

After a failure the store is not tried again for ``retry_interval`` seconds:
subscribes are refused at once instead of each waiting on a dead server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, String, Table, and_, exists, insert, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import aliased

from wsgate.audit import chain, store
from wsgate.audit.journal import Journal
from wsgate.audit.orm import CHAIN_TABLES, CHECKPOINTS, EVENTS, ROWS, AuditRow
from wsgate.audit.records import (
    ACCEPTED,
    SUBSCRIBE,
    UNSUBSCRIBE,
    AuditRecord,
    AuditUnavailable,
    ConnectionInfo,
    EventRecord,
)
from wsgate.audit.witness import CLOSE_TIMEOUT, WitnessPublisher
from wsgate.config import AuditConfig
from wsgate.errors import END_UNCLEAN_SHUTDOWN

log = logging.getLogger("wsgate.audit")

#: A group stops gathering after ``group_commit_ms / QUIET_SLICES`` with no new row.
QUIET_SLICES = 4


def _width(table: Table, name: str) -> int:
    """The n of a String(n) column of the audit schema (orm.py is the one source)."""
    kind = table.c[name].type
    if not isinstance(kind, String) or kind.length is None:
        raise TypeError(f"{table.name}.{name} is not a String(n) column")
    return kind.length


# Text is cut to its column's width: PostgreSQL refuses a longer value, and one
# over-long client string must not fail a whole group commit. The topic is cut
# shorter, at chain.MAX_TEXT: it is indexed, and PostgreSQL's btree limits an
# entry's bytes.
_ROW_LIMITS = {
    name: chain.MAX_TEXT if name == "topic" else _width(ROWS, name)
    for name in ("connection_id", "action", "topic", "outcome", "code", "kind", "subject",
                 "customer_id", "agent_id", "authenticator", "remote_addr", "origin",
                 "user_agent")
}
_ACTION_WIDTH = _ROW_LIMITS["action"]
_OUTCOME_WIDTH = _ROW_LIMITS["outcome"]
_CODE_WIDTH = _ROW_LIMITS["code"]
_CONNECTION_FIELDS = ("connection_id", "kind", "subject", "customer_id", "agent_id",
                      "authenticator", "remote_addr", "origin", "user_agent")
# The fields of an audit_rows row that are the same for all rows of a connection
# on this node: the key of a chain.RowTemplate.
_FIXED_FIELDS = (*_CONNECTION_FIELDS, "node_id")
_fixed_of = operator.itemgetter(*_FIXED_FIELDS)
_EVENT_LIMITS = {name: _width(EVENTS, name)
                 for name in ("event_id", "type", "ingest_key_id", "payload_sha256")}

Entry = tuple[str, dict[str, Any]]  # (chain name, row without node_id/seq/hashes)
_Settlement = list[tuple["Done", "Exception | None"]]


def _connection_fields(c: ConnectionInfo) -> dict[str, Any]:
    """The stored fields a connection gives each of its rows, cleaned."""
    p = c.principal
    row: dict[str, Any] = {
        "connection_id": c.connection_id, "kind": p.kind, "subject": p.subject,
        "customer_id": p.customer_id, "agent_id": p.agent_id, "authenticator": c.authenticator,
        "remote_addr": c.remote_addr, "origin": c.origin, "user_agent": c.user_agent,
    }
    for name in _CONNECTION_FIELDS:
        row[name] = chain.clean_text(row[name], _ROW_LIMITS[name])
    return row


def _row_of(rec: AuditRecord, connection_fields: dict[str, Any]) -> dict[str, Any]:
    clean = chain.clean_text
    row = connection_fields.copy()
    row["occurred_at"] = chain.format_time(rec.occurred_at)
    row["action"] = clean(rec.action, _ACTION_WIDTH)
    row["topic"] = clean(rec.topic, chain.MAX_TEXT)
    row["outcome"] = clean(rec.outcome, _OUTCOME_WIDTH)
    row["code"] = clean(rec.code, _CODE_WIDTH)
    return row


class _RowMaker:
    """The stored fields of an AuditRecord (before chaining), made on the writer
    thread: each connection's fields are cleaned once.

    Keeps the ConnectionInfo it cached (so its id is not reused while cached);
    forgets everything past a few thousand connections. Calling it raises
    ValueError when the record's ``occurred_at`` is naive.
    """

    _LIMIT = 4096

    def __init__(self) -> None:
        self._fields: dict[int, tuple[ConnectionInfo, dict[str, Any]]] = {}

    def __call__(self, rec: AuditRecord) -> dict[str, Any]:
        c = rec.connection
        hit = self._fields.get(id(c))
        if hit is None or hit[0] is not c:
            if len(self._fields) >= self._LIMIT:
                self._fields.clear()
            hit = self._fields[id(c)] = (c, _connection_fields(c))
        return _row_of(rec, hit[1])


_EVENT_ID_WIDTH = _EVENT_LIMITS["event_id"]
_TYPE_WIDTH = _EVENT_LIMITS["type"]
_KEY_ID_WIDTH = _EVENT_LIMITS["ingest_key_id"]
_SHA_WIDTH = _EVENT_LIMITS["payload_sha256"]


def event_row(ev: EventRecord, published_at: str | None = None) -> dict[str, Any]:
    """The stored fields of an EventRecord (before chaining).

    ``published_at``: ``chain.format_time(ev.published_at)`` when the caller has it
    (the events of one ingest request share their time).

    Raises:
        ValueError: ``published_at`` is not given and ``ev.published_at`` is naive.
    """
    eid, kind, kid, sha = ev.event_id, ev.type, ev.ingest_key_id, ev.payload_sha256
    # clean_text leaves short plain ASCII text as it is: checked here for the four
    # fields at once (this runs for every event).
    try:
        joined = eid + kind + kid + sha
        plain = (len(eid) <= _EVENT_ID_WIDTH and len(kind) <= _TYPE_WIDTH
                 and len(kid) <= _KEY_ID_WIDTH and len(sha) <= _SHA_WIDTH
                 and joined.isascii() and "\x00" not in joined)
    except TypeError:  # a field that is not a str
        plain = False
    topics = chain.encode_topics([chain.clean_text(t) or "" for t in ev.topics])
    if published_at is None:
        published_at = chain.format_time(ev.published_at)
    if plain:
        return {"event_id": eid, "type": kind, "ingest_key_id": kid, "payload_sha256": sha,
                "topics": topics, "published_at": published_at}
    clean = chain.clean_text
    return {"event_id": clean(eid, _EVENT_ID_WIDTH), "type": clean(kind, _TYPE_WIDTH),
            "ingest_key_id": clean(kid, _KEY_ID_WIDTH),
            "payload_sha256": clean(sha, _SHA_WIDTH), "topics": topics,
            "published_at": published_at}


def _event_entries(events: Sequence[EventRecord]) -> list[Entry]:
    """The entries of events; each distinct time is formatted once."""
    out: list[Entry] = []
    last: datetime | None = None
    text = ""
    for ev in events:
        when = ev.published_at
        if when is not last:
            text = chain.format_time(when)
            last = when
        out.append((chain.CHAIN_EVENTS, event_row(ev, text)))
    return out


Done = Callable[["Exception | None"], None]


@dataclass(eq=False, slots=True)
class _Job:
    #: Stored rows, or the records they are made from (see entries()).
    items: Sequence[AuditRecord] | Sequence[EventRecord] | list[Entry]
    #: Fail closed (subscribes) rather than journal (ends, events).
    strict: bool
    #: Where done runs; None for jobs nobody waits for.
    loop: asyncio.AbstractEventLoop | None
    #: Called on loop with None once the rows are committed (or journaled, for
    #: jobs that are not strict), else with the AuditUnavailable error.
    done: Done | None
    #: How items become entries; None when items are entries already.
    kind: str | None = None

    def entries(self, make_row: Callable[[AuditRecord], dict[str, Any]]) -> list[Entry]:
        """The job's entries, converted on the writer thread (off the event loop).

        The records' times were checked by _enqueue, so converting cannot fail.
        """
        kind = self.kind
        if kind is None:
            return self.items  # type: ignore[return-value]
        if kind == chain.CHAIN_ROWS:
            out: list[Entry] = [(kind, make_row(item)) for item in self.items]  # type: ignore[arg-type]
        else:
            out = _event_entries(self.items)  # type: ignore[arg-type]
        self.items, self.kind = out, None
        return out


class AuditWriter:
    """The durable, chained, group-committing audit sink (implements AuditSink).

    Args:
        config: the ``[audit]`` table.
        node_id: this process's id; each node keeps its own chains. Two live
            processes must never share one (each would close the other's
            subscriptions as ``unclean_shutdown`` at start).
        retry_interval: seconds between attempts to reach a failed store.
        busy_timeout_ms: how long SQLite waits for another writer's lock.

    Raises:
        AuditStoreError: the configured signing key cannot be used.

    Call :meth:`start` before writing and :meth:`close` last, after the
    gateway has written its disconnect rows.
    """

    def __init__(self, config: AuditConfig, node_id: str, *, retry_interval: float = 1.0,
                 busy_timeout_ms: int = 5000) -> None:
        if not node_id:
            raise ValueError("the audit writer needs a node id")
        self.config = config
        self.node_id = node_id
        self.retry_interval = retry_interval
        self._busy_timeout_ms = busy_timeout_ms
        self._private = store.signing_key(config)
        self._journal = Journal(config.journal_path)
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        #: Rows the last group commit took (0 before the first).
        self._last_group = 0
        #: Queued rows at which _enqueue wakes the writer (see _gather).
        self._enough = config.group_commit_max_rows
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        #: The connection group commits go through (see GroupConnection).
        self._group: GroupConnection | None = None
        # Owned by the writer thread once started.
        self._heads: dict[str, tuple[int, str]] = {}
        #: Per chain: the seq the last chained checkpoint signed, and its hash.
        self._sealed: dict[str, tuple[int, str]] = {}
        #: Per chain: monotonic time since when committed rows are unsealed.
        self._unsealed_since: dict[str, float | None] = {name: None for name in CHAIN_TABLES}
        self._policy = chain.Policy(config.checkpoint_every, config.checkpoint_interval)
        self._make_row = _RowMaker()
        self._templates: dict[tuple[Any, ...], chain.RowTemplate] = {}
        self._event_template = chain.EventTemplate(node_id)
        self._journal_pending = False
        self._retry_at = 0.0
        self._healthy = False
        #: Copies of each signed checkpoint outside the store (``[audit] witness``), or None.
        self.witness = WitnessPublisher(config.witness) if config.witness else None
        # The store's chain head of this node is not the writer's (see _probe).
        self._head_moved = False

    @property
    def engine(self) -> Engine:
        """The writer's engine (for tests and tools; do not write through it)."""
        if self._engine is None:
            raise RuntimeError("the audit writer is not started")
        return self._engine

    # --- AuditSink ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, migrate, load the chain heads, replay the journal and
        close the subscriptions a crash of this node left open (``unclean_shutdown``).

        Raises:
            AuditUnavailable: the store cannot be opened; the message says why.
        """
        if self._thread is not None:
            raise RuntimeError("the audit writer is already started")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop, started),
                                        name=f"wsgate-audit-{self.node_id}", daemon=True)
        self._thread.start()
        await started
        if self.witness is not None:
            self.witness.start()

    async def write_subscribes(self, records: Sequence[AuditRecord]) -> None:
        """submit_subscribes, awaited (for tests and bench/audit_bench.py).

        Raises:
            AuditUnavailable: not committed (store down, or the writer closed).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit_subscribes(records, _resolver(future))
        await future

    def submit_subscribes(self, records: Sequence[AuditRecord], done: Done) -> None:
        """Commit subscribe rows and call ``done`` on this event loop afterwards;
        see AuditSink.submit_subscribes.

        Raises:
            ValueError: a record's time is naive (nothing was queued).
        """
        loop = asyncio.get_running_loop()
        if not self._running():
            loop.call_soon(done, AuditUnavailable("the audit writer is not running"))
            return
        if not records:
            loop.call_soon(done, None)
            return
        self._enqueue(_Job(records, True, loop, done, chain.CHAIN_ROWS))

    async def write_ends(self, records: Sequence[AuditRecord]) -> None:
        """Record unsubscribe/disconnect rows: in the store, else in the journal.

        Raises:
            RuntimeError: the writer is closed (close it last).
        """
        if records:
            await self._submit(records, strict=False, kind=chain.CHAIN_ROWS)

    async def write_events(self, events: Sequence[EventRecord]) -> None:
        """Record ingested events; same rule as write_ends.

        Whether events are recorded is the caller's to decide: ``[audit]
        record_events`` applies live (SIGHUP), and the gateway reads it from its
        current config, not from the one this writer was started with.
        """
        if events:
            await self._submit(events, strict=False, kind=chain.CHAIN_EVENTS)

    def healthy(self) -> bool:
        """True when the last attempt to write reached the store."""
        return self._healthy

    @property
    def commits(self) -> int:
        """Group commits so far (for tests and benchmarks)."""
        return self._group.commits if self._group is not None else 0

    @property
    def largest_group(self) -> int:
        """The most rows one group commit inserted (for tests and benchmarks)."""
        return self._group.largest if self._group is not None else 0

    def recycle_connection(self) -> None:
        """Make the next group commit take a fresh connection from the pool, so
        settings applied at checkout reach it (tests that cap a SQLite file)."""
        if self._group is not None:
            self._group.stale = True

    async def close(self) -> None:
        """Write everything queued (store or journal), sign a final checkpoint when a
        key is configured, and release the store; then give the witnesses up to
        CLOSE_TIMEOUT seconds to take what they still lack. Idempotent."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        if self.witness is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, self.witness.close, CLOSE_TIMEOUT)

    # --- caller side ------------------------------------------------------------------

    def _running(self) -> bool:
        return (not self._closed and self._thread is not None and self._thread.is_alive())

    async def _submit(self, items: Sequence[AuditRecord] | Sequence[EventRecord], strict: bool,
                      kind: str) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Job(items, strict, loop, _resolver(future), kind))
        await future

    def _enqueue(self, job: _Job) -> None:
        # The records go to the writer thread as they are: making rows of them
        # (time formatting, text cleaning) is done there, off the event loop.
        # Only what would make that fail is checked here, where the caller hears of it.
        items = cast(Sequence[AuditRecord] | Sequence[EventRecord], job.items)
        for item in items:
            when = item.occurred_at if isinstance(item, AuditRecord) else item.published_at
            if when.tzinfo is None:
                raise ValueError("audit times must be timezone-aware")
        if not self._running():
            raise RuntimeError("the audit writer is not running: start it first, close it last")
        with self._cond:
            was_idle = not self._queue
            self._queue.append(job)
            self._queued_rows += len(items)
            # Wake the writer only when it may be idle or the group it gathers is
            # ready; otherwise it wakes at its next slice anyway (fewer context switches).
            if was_idle or self._queued_rows >= self._enough:
                self._cond.notify()

    # --- writer thread ----------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]) -> None:
        try:
            self._open()
        except Exception as exc:  # anything: start() must report it, not hang
            log.error("audit store %s cannot be opened: %s", self._url_for_log(), exc)
            if self._engine is not None:
                self._engine.dispose()
            err = AuditUnavailable(f"the audit store cannot be opened: {exc}")
            self._closed = True
            failed: _Settlement = [(_resolver(started), err)]
            loop.call_soon_threadsafe(_settle, failed)
            return
        ok: _Settlement = [(_resolver(started), None)]
        loop.call_soon_threadsafe(_settle, ok)
        try:
            self._loop()
        finally:
            self._shutdown()

    def _url_for_log(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.config.url).render_as_string(hide_password=True)
        except Exception:
            return "<bad url>"

    def _open(self) -> None:
        self._engine = engine = store.make_engine(self.config.url, writer=True,
                                                  busy_timeout_ms=self._busy_timeout_ms)
        self._group = GroupConnection(engine)
        store.migrate(engine)
        with engine.connect() as conn:
            for name in CHAIN_TABLES:
                self._heads[name] = store.load_head(conn, name, self.node_id)
                self._sealed[name] = store.load_seal(conn, name, self.node_id)
        entries = self._journal.read()
        for name, row in entries:
            # A journal may run ahead of the store (rows journaled, never committed).
            if row.get("node_id") == self.node_id and row["seq"] > self._heads[name][0]:
                self._heads[name] = (int(row["seq"]), str(row["row_hash"]))
        if entries:
            self._journal_pending = True
            if not self._replay_journal(force=True):
                raise AuditUnavailable("the journal could not be replayed")
        self._close_unclean()
        # Signed at every start, even with nothing new: it seals what a crash
        # left unsealed, states the policy of this run, and gives a node that
        # has written nothing yet a checkpoint its witnesses hold.
        self._seal(store.CHECKPOINT_START)
        self._healthy = True

    def _close_unclean(self) -> None:
        """Write an unclean_shutdown end for each subscription this node left open."""
        s = ROWS
        e = aliased(AuditRow)
        ended = exists().where(and_(
            e.node_id == s.c.node_id, e.connection_id == s.c.connection_id,
            e.topic == s.c.topic, e.action == UNSUBSCRIBE, e.outcome == ACCEPTED,
            e.seq > s.c.seq))
        stmt = (select(s).where(s.c.node_id == self.node_id, s.c.action == SUBSCRIBE,
                                s.c.outcome == ACCEPTED, ~ended).order_by(s.c.seq))
        now = chain.format_time(datetime.now(UTC))
        seen: set[tuple[str, str]] = set()
        entries: list[Entry] = []
        assert self._engine is not None
        with self._engine.connect() as conn:
            for r in conn.execute(stmt):
                key = (r.connection_id, r.topic)
                if key in seen:
                    continue  # a repeated subscribe of a held topic: one end closes both
                seen.add(key)
                row = {f: getattr(r, f) for f in _ROW_LIMITS}
                row.update(occurred_at=now, action=UNSUBSCRIBE, outcome=ACCEPTED,
                           code=END_UNCLEAN_SHUTDOWN)
                entries.append((chain.CHAIN_ROWS, row))
        if entries:
            log.warning("audit: closing %d subscriptions left open by an unclean shutdown "
                        "of node %s", len(entries), self.node_id)
            self._commit(entries)

    def _loop(self) -> None:
        max_rows = self.config.group_commit_max_rows
        window = self.config.group_commit_ms / 1000.0
        while True:
            jobs: list[_Job] = []
            with self._cond:
                if not self._queue and not self._stopping:
                    idle_check = self._journal_pending or not self._healthy
                    wait = self._seal_due_in()
                    if idle_check:
                        wait = min(wait or self.retry_interval, self.retry_interval)
                    self._cond.wait(wait)
                if self._queue:
                    if window > 0 and not self._stopping:
                        self._gather(window, min(max_rows, self._last_group or max_rows))
                    taken = 0
                    while self._queue and (not jobs or taken + len(self._queue[0].items)
                                           <= max_rows):
                        job = self._queue.popleft()
                        jobs.append(job)
                        taken += len(job.items)
                    self._queued_rows -= taken
                    self._last_group = taken
                elif self._stopping:
                    return
            if jobs:
                self._process(jobs)
            elif self._journal_pending:
                self._replay_journal()
            elif not self._healthy and time.monotonic() >= self._retry_at:
                self._probe()
            # Checked after jobs too: a steady trickle of rows keeps the queue busy.
            if self._healthy and self._seal_due_in() == 0:
                try:
                    self._seal(store.CHECKPOINT_INTERVAL)
                except Exception as exc:  # retried once the store is back
                    log.error("audit: the interval checkpoint could not be written: %s", exc)

    def _gather(self, window: float, enough: int) -> None:
        """Wait (holding ``_cond``) for more rows to share this commit: up to
        ``window`` seconds after the first, until ``enough`` rows are queued
        (as many as the last group took), or until a quiet slice (a quarter
        of the window) passes with no new row.

        Rows that keep arriving (a subscribe storm) fill the window, so a
        commit still carries a burst, and a group is never cut below the size
        of the one before. Clients that each wait for their answer before
        sending again (a backend with a few POSTs in flight, each waiting for
        its 202) are all in once the last group's number is queued, and are
        committed then instead of after the window; a lone write is committed
        a slice after it came. ``_enqueue`` does not notify while rows are
        queued, so each slice is one timed wait, not a wake-up per row.
        """
        deadline = time.monotonic() + window
        quiet = window / QUIET_SLICES
        seen = self._queued_rows
        self._enough = enough  # _enqueue wakes the writer when it is reached
        try:
            while seen < enough and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, quiet))
                if self._queued_rows == seen:
                    return
                seen = self._queued_rows
        finally:
            self._enough = self.config.group_commit_max_rows

    def _probe(self) -> None:
        """Try the store while it is marked unhealthy and nothing is queued, so
        /readyz turns ready again without waiting for the next write.

        Healthy again only when a write would now succeed: the store opens a
        write transaction and this node's chains there end where the writer's
        own heads are. A head that moved (another process wrote as this node)
        makes every write fail, so the writer stays unhealthy, says why once,
        and tries again after ``retry_interval``.
        """
        assert self._engine is not None
        try:
            # The writer engine opens its transactions as writes (SQLite: BEGIN
            # IMMEDIATE), so a store another writer holds locked stays unhealthy.
            with self._engine.begin() as conn:
                stored = {name: store.load_head(conn, name, self.node_id)
                          for name in CHAIN_TABLES}
        except Exception as exc:
            self._failed(exc)
            return
        moved = [(name, head[0], self._heads[name][0]) for name, head in stored.items()
                 if head != self._heads[name]]
        if moved:
            self._retry_at = time.monotonic() + self.retry_interval
            if not self._head_moved:
                self._head_moved = True
                name, theirs, ours = moved[0]
                log.error("audit: the %s chain of node %r ends at seq %d in the store, but "
                          "this process wrote it up to seq %d: another process is writing as "
                          "this node (or rows were changed outside wsgate). Subscribes stay "
                          "refused: stop the other process, then restart this one.",
                          name, self.node_id, theirs, ours)
            return
        self._head_moved = False
        log.info("audit store is reachable again")
        self._healthy = True

    def _process(self, jobs: list[_Job]) -> None:
        make_row = self._make_row
        entries = [e for job in jobs for e in job.entries(make_row)]
        error: Exception | None = None
        if time.monotonic() < self._retry_at:
            error = AuditUnavailable("the audit store is unavailable (retrying)")
        elif self._journal_pending and not self._replay_journal():
            error = AuditUnavailable("the audit store is unavailable (journal not replayed)")
        else:
            try:
                self._commit(entries)
            except Exception as exc:  # a driver error or a bug: the callers must hear of it
                if not isinstance(exc, SQLAlchemyError):
                    log.exception("audit: unexpected error writing %d rows", len(entries))
                error = AuditUnavailable(f"the audit store cannot write: {exc.__class__.__name__}")
        if error is None:
            self._settle_jobs(jobs, None)
            return
        keep = [e for job in jobs if not job.strict for e in job.entries(make_row)]
        if keep:
            self._to_journal(keep)
        self._settle_jobs([j for j in jobs if j.strict], error)
        self._settle_jobs([j for j in jobs if not j.strict], None)

    def queue_depth(self) -> int:
        """Rows waiting for the writer thread (for /metrics)."""
        return self._queued_rows

    def _failed(self, exc: Exception) -> None:
        if self._healthy:
            log.error("audit store write failed (subscribes refused, ends journaled): %s", exc)
        self._healthy = False
        self._retry_at = time.monotonic() + self.retry_interval

    def _chain(self, entries: list[Entry]) -> tuple[dict[str, list[dict[str, Any]]],
                                                    dict[str, tuple[int, str]]]:
        heads = dict(self._heads)
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in CHAIN_TABLES}
        templates = self._templates
        event_template = self._event_template
        node_id = self.node_id
        for name, fields in entries:
            seq, prev = heads[name]
            row = fields.copy()
            row["node_id"] = node_id
            row["seq"] = seq = seq + 1
            row["prev_hash"] = prev
            if name == chain.CHAIN_ROWS:
                # A connection's rows differ in a few fields only (see chain.RowTemplate).
                key = _fixed_of(row)
                template = templates.get(key)
                if template is None:
                    if len(templates) >= _RowMaker._LIMIT:
                        templates.clear()
                    template = templates[key] = chain.RowTemplate(
                        name, dict(zip(_FIXED_FIELDS, key, strict=True)))
                row["row_hash"] = digest = template.hash(row)
            else:  # the events chain: its template holds this node's id
                row["row_hash"] = digest = event_template.hash(row)
            heads[name] = (seq, digest)
            out[name].append(row)
        return out, heads

    def _commit(self, entries: list[Entry]) -> None:
        """Chain and insert entries in one transaction; advance the heads only on commit."""
        rows, heads = self._chain(entries)
        checkpoints = self._plan(rows)
        assert self._group is not None
        try:
            self._group.write([(table, rows[name]) for name, table in CHAIN_TABLES.items()]
                              + [(CHECKPOINTS, checkpoints)])
        except Exception as exc:
            self._failed(exc)
            raise
        self._heads = heads
        self._signed(checkpoints)
        if not self._healthy:
            log.info("audit store is writable again")
        self._healthy = True

    # --- checkpoints ------------------------------------------------------------------

    def _checkpoint(self, name: str, seq: int, head: str, kind: str, prev: str
                    ) -> dict[str, Any]:
        assert self._private is not None
        return store.make_checkpoint(self._private, name, self.node_id, seq, head, kind,
                                     prev_hash=prev, policy=self._policy)

    def _plan(self, rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The checkpoints to commit with rows (chained, in seq order): one at each
        row that is ``checkpoint_every`` past the chain's last checkpoint, so no
        two checkpoints are further apart than the policy says, whatever the
        size of a group commit or a journal replay."""
        if self._private is None:
            return []
        every = self._policy.every
        out = []
        for name, chained in rows.items():
            signed, prev = self._sealed[name]
            for row in chained:
                seq = row["seq"]
                if seq - signed >= every:
                    cp = self._checkpoint(name, seq, row["row_hash"],
                                          store.CHECKPOINT_PERIODIC, prev)
                    out.append(cp)
                    signed, prev = seq, chain.checkpoint_hash(cp)
        return out

    def _signed(self, checkpoints: list[dict[str, Any]]) -> None:
        """Account for committed checkpoints, and rows committed after them; hand
        the checkpoints to the witnesses."""
        for cp in checkpoints:
            self._sealed[cp["chain"]] = (cp["seq"], chain.checkpoint_hash(cp))
        now = time.monotonic()
        for name, (seq, _) in self._heads.items():
            if seq <= self._sealed[name][0]:
                self._unsealed_since[name] = None
            elif self._unsealed_since[name] is None:
                self._unsealed_since[name] = now
        if checkpoints and self.witness is not None:
            self.witness.submit(checkpoints)

    def _seal_due_in(self) -> float | None:
        """Seconds until rows unsealed longest reach ``checkpoint_interval`` (0: due
        now); None when nothing waits to be sealed (or nothing is ever signed)."""
        if self._private is None or self._journal_pending:
            return None
        since = [t for t in self._unsealed_since.values() if t is not None]
        if not since:
            return None
        return max(0.0, min(since) + self._policy.interval - time.monotonic())

    def _seal(self, kind: str) -> None:
        """Sign the head of each chain now (``start``, ``interval`` or ``close``).

        ``interval`` seals only chains with unsealed rows; ``start`` and
        ``close`` sign every chain, even at a head already signed.

        Raises:
            SQLAlchemyError: the checkpoints could not be committed (nothing changed).
        """
        if self._private is None or self._journal_pending:
            return
        checkpoints = []
        for name, (seq, head) in self._heads.items():
            signed, prev = self._sealed[name]
            if kind == store.CHECKPOINT_INTERVAL and seq <= signed:
                continue
            checkpoints.append(self._checkpoint(name, seq, head, kind, prev))
        if not checkpoints:
            return
        assert self._engine is not None
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(CHECKPOINTS), checkpoints)
        except Exception as exc:
            self._failed(exc)
            raise
        self._signed(checkpoints)

    def _to_journal(self, entries: list[Entry]) -> None:
        rows, heads = self._chain(entries)
        # Keep the order of entries: the journal is replayed line by line.
        flat: list[Entry] = []
        index = {name: 0 for name in rows}
        for name, _ in entries:
            flat.append((name, rows[name][index[name]]))
            index[name] += 1
        try:
            self._journal.append(flat)
        except OSError as exc:
            log.critical("audit: %d rows LOST: the store is down and the journal %s cannot "
                         "be written: %s", len(flat), self._journal.path, exc)
            return
        self._heads = heads
        self._journal_pending = True

    def _replay_journal(self, force: bool = False) -> bool:
        """Write the journal into the store, skipping entries already there. True on success."""
        if not force and time.monotonic() < self._retry_at:
            return False
        entries = self._journal.read()
        own: dict[str, list[dict[str, Any]]] = {name: [] for name in CHAIN_TABLES}
        # Journaled rows whose seq the store holds with another row: something else
        # wrote as this node. They cannot be stored; they are kept, not dropped.
        clashes: list[dict[str, Any]] = []
        assert self._engine is not None
        try:
            with self._engine.begin() as conn:
                for name, table in CHAIN_TABLES.items():
                    rows = [r for c, r in entries if c == name]
                    if not rows:
                        continue
                    stored: dict[tuple[str, int], str] = {}
                    for node_id in {r["node_id"] for r in rows}:
                        low = min(r["seq"] for r in rows if r["node_id"] == node_id)
                        stored.update({(node_id, int(s)): str(h) for s, h in conn.execute(
                            select(table.c.seq, table.c.row_hash).where(
                                table.c.node_id == node_id, table.c.seq >= low))})
                    fresh = [r for r in rows if (r["node_id"], r["seq"]) not in stored]
                    clashes += [r for r in rows
                                if stored.get((r["node_id"], r["seq"]), r["row_hash"])
                                != r["row_hash"]]
                    if fresh:
                        _insert(conn, table, fresh)
                    own[name] = [r for r in fresh if r["node_id"] == self.node_id]
                checkpoints = self._plan(own)
                if checkpoints:
                    conn.execute(insert(CHECKPOINTS), checkpoints)
        except Exception as exc:
            self._failed(exc)
            return False
        kept: Any = None
        if clashes:
            try:
                kept = self._journal.set_aside()
            except OSError as exc:
                kept = f"{self._journal.path} (it could not be copied aside: {exc})"
            log.critical("audit: %d journaled rows of node %s (from seq %d) clash with rows the "
                         "store holds at the same seq: another process wrote as this node. "
                         "They were not stored; the journal is kept in %s for review.",
                         len(clashes), self.node_id, min(r["seq"] for r in clashes), kept)
        if not isinstance(kept, str):  # left in place when it could not be copied
            self._journal.clear()
        self._journal_pending = False
        self._signed(checkpoints)
        self._healthy = True
        log.info("audit: %d journaled rows written to the store", len(entries))
        return True

    def _settle_jobs(self, jobs: list[_Job], error: Exception | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, _Settlement] = {}
        for job in jobs:
            if job.loop is not None and job.done is not None:
                by_loop.setdefault(job.loop, []).append((job.done, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more

    def _shutdown(self) -> None:
        try:
            if self._journal_pending:
                self._replay_journal(force=True)
            self._seal(store.CHECKPOINT_CLOSE)
        except SQLAlchemyError as exc:
            log.error("audit: the closing checkpoint could not be written: %s", exc)
        finally:
            if self._group is not None:
                self._group.close()
            if self._engine is not None:
                self._engine.dispose()


class GroupConnection:
    """The writer's own DB-API connection, kept for its group commits.

    ``Engine.begin()`` costs ~80-110 us of CPU per transaction beyond the driver's
    own (pool checkout and return with its rollback, events, PostgreSQL's
    pre-ping): at one event per POST a group holds a few rows, and that was
    most of the writer's work (bench/txn_cost.py). This connection is taken
    from the engine's pool once (with its connect settings: SQLite's pragmas)
    and kept. Any error discards it (invalidated: a dead PostgreSQL
    connection is never reused) and the next group takes a fresh one; one
    idle for more than PING_AFTER seconds is pinged first, as the pool's
    pre-ping did, so a database restarted while the node was quiet does not
    cost a refused subscribe. Drivers whose parameters are not positional go
    through ``Engine.begin()`` as before.
    """

    PING_AFTER = 1.0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        self._dialect = dialect
        self._error: type[Exception] = dialect.loaded_dbapi.Error
        self._sqlite = dialect.name == "sqlite"
        self._ping = not self._sqlite
        self._copy = dialect.driver == "psycopg"
        self._mark = _mark(dialect.paramstyle)
        self._raw: Any = None
        self._used = 0.0
        #: Set from any thread: the next write takes a fresh connection.
        self.stale = False
        #: Transactions committed through this connection (for tests and benchmarks).
        self.commits = 0
        #: The most rows one transaction inserted (for tests and benchmarks).
        self.largest = 0

    def write(self, inserts: list[tuple[Table, list[dict[str, Any]]]]) -> None:
        """Insert each table's rows, all in one transaction, and commit.

        Raises:
            SQLAlchemyError: nothing was committed (a driver error, wrapped as
                SQLAlchemy wraps it); the connection was discarded.
        """
        inserts = [(t, r) for t, r in inserts if r]
        if not inserts:
            return
        if self._mark is None:
            with self.engine.begin() as conn:
                for table, rows in inserts:
                    _insert(conn, table, rows)
        else:
            self._write_raw(inserts)
        self.commits += 1
        self.largest = max(self.largest, sum(len(r) for _, r in inserts))

    def _write_raw(self, inserts: list[tuple[Table, list[dict[str, Any]]]]) -> None:
        # A kept connection the server closed while it sat idle (a PostgreSQL
        # restart or failover less than PING_AFTER ago) fails at its first
        # statement: the transaction is tried once more on a fresh connection.
        # Never once COMMIT was sent: whether that one took is unknown.
        mark = self._mark
        assert mark is not None  # write() takes Engine.begin() for the others
        for retry in (True, False):
            raw = self._connection()
            committing = False
            try:
                cursor = raw.cursor()
                try:
                    if self._sqlite:
                        # The engine's "begin" hook is not called here: say it ourselves.
                        cursor.execute("BEGIN IMMEDIATE")
                    for table, rows in inserts:
                        if table is EVENTS and self._copy:
                            _copy_rows(cursor, table, rows)
                            continue
                        sql, values = _insert_sql(table, mark)
                        cursor.executemany(sql, [values(r) for r in rows])
                    committing = True
                    raw.commit()
                finally:
                    cursor.close()
            except BaseException as exc:
                lost = (isinstance(exc, self._error) and not self._sqlite
                        and self._dialect.is_disconnect(cast(Any, exc), raw.dbapi_connection, None))
                self.discard()
                if lost and retry and not committing:
                    log.info("audit: the store closed the writer's connection; retrying on a "
                             "new one")
                    continue
                if isinstance(exc, self._error):
                    raise DBAPIError.instance(None, None, exc, self._error, hide_parameters=True,
                                              dialect=self._dialect,
                                              connection_invalidated=True) from exc
                raise
            self._used = time.monotonic()
            return

    def _connection(self) -> Any:
        if self.stale:
            self.stale = False
            self.discard()
        raw = self._raw
        if raw is not None and self._ping and time.monotonic() - self._used > self.PING_AFTER:
            try:
                self._dialect.do_ping(raw.dbapi_connection)
            except Exception:  # any failure: take a fresh connection
                self.discard()
                raw = None
        if raw is None:
            raw = self._raw = self.engine.raw_connection()
        return raw

    def discard(self) -> None:
        """Drop the kept connection (rolled back, closed); the next write takes a new one."""
        raw, self._raw = self._raw, None
        if raw is None:
            return
        try:
            raw.rollback()
        except Exception:  # a dead connection: invalidating it is all that is left
            pass
        try:
            raw.invalidate()
        except Exception:
            pass

    def close(self) -> None:
        """Give the kept connection back to the pool (the writer is closing)."""
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:
                pass


@functools.lru_cache(maxsize=16)
def _columns(table: Table) -> tuple[str, ...]:
    """The columns the writer fills: all but the database's own ``id``."""
    return tuple(c.name for c in table.c if c.name != "id")


def _copy_rows(cursor: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows with PostgreSQL's COPY on a psycopg cursor, in its transaction:
    a quarter of the client's work of executemany, which binds and executes
    each row on its own (the writer inserts every ingested event)."""
    cols = _columns(table)
    values = operator.itemgetter(*cols)
    with cursor.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(values(row))


def _mark(paramstyle: str) -> str | None:
    """The positional parameter mark of a DB-API paramstyle, or None for named styles."""
    return "?" if paramstyle == "qmark" else "%s" if paramstyle in ("format", "pyformat") else None


@functools.lru_cache(maxsize=64)
def _insert_sql(table: Table, mark: str) -> tuple[str, Callable[[dict[str, Any]], Any]]:
    """The positional INSERT of every column but ``id``, and the getter of a row's values."""
    cols = _columns(table)
    sql = (f"INSERT INTO {table.name} ({', '.join(cols)}) "
           f"VALUES ({', '.join(mark for _ in cols)})")
    return sql, operator.itemgetter(*cols)


def _insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows with the driver's executemany.

    Core's insert() costs about as much per row as SQLite itself; at
    thousands of rows per second that doubles the writer's work. Drivers with
    positional parameters (sqlite3, psycopg) take a prepared text statement.
    """
    if table is EVENTS and conn.dialect.driver == "psycopg":
        _copy(conn, table, rows)
        return
    mark = _mark(conn.dialect.paramstyle)
    if mark is None:
        conn.execute(insert(table), rows)
        return
    sql, values = _insert_sql(table, mark)
    conn.exec_driver_sql(sql, [values(r) for r in rows])


def _copy(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows with PostgreSQL's COPY, in conn's transaction (psycopg).

    A quarter of the client's work of executemany, which binds and executes
    each row on its own: the writer inserts every ingested event. The values
    and the transaction are the same; a driver error is raised as SQLAlchemy's
    (a lost connection is invalidated), as from an executed statement.
    """
    dialect = conn.dialect
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    try:
        _copy_rows(cursor, table, rows)
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, dbapi_conn, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(f"COPY {table.name}", None, exc, dialect.loaded_dbapi.Error,
                                  hide_parameters=True, dialect=dialect,
                                  connection_invalidated=lost) from exc
    finally:
        cursor.close()


def _settle(items: _Settlement) -> None:
    for done, error in items:
        try:
            done(error)
        except Exception:
            log.exception("audit: a completion callback failed")


def _resolver(future: asyncio.Future[None]) -> Done:
    """A job's done callback that settles future."""
    def done(error: Exception | None) -> None:
        if future.done():
            return  # the caller was cancelled; its rows are written all the same
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    return done
