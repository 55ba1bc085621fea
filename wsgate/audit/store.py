"""The audit store: engines, migrations, keys, chain heads, verify and prune.

Everything here is synchronous and may block: the server calls it from the
audit writer thread or a thread executor, the CLI directly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import Connection, Engine, create_engine, delete, event, func, insert, select, text
from sqlalchemy.engine import make_url

from wsgate.audit import chain, nodelock
from wsgate.audit.orm import CHAIN_TABLES, CHECKPOINTS
from wsgate.config import AuditConfig

log = logging.getLogger("wsgate.audit")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Checkpoint kinds (see orm.AuditCheckpoint).
CHECKPOINT_PERIODIC = "periodic"
CHECKPOINT_CLOSE = "close"
CHECKPOINT_PRUNE = "prune"

# Any fixed 64-bit number: serialises concurrent migrations of several nodes on PostgreSQL.
_MIGRATION_LOCK = 0x77736761746541


#: SQLite WAL pages between automatic checkpoints of the writer (see make_engine).
WAL_CHECKPOINT_PAGES = 10000


class AuditStoreError(Exception):
    """The audit store cannot be used for this operation; the message says why."""


# --- engines and schema ---------------------------------------------------------------

def make_engine(url: str, *, writer: bool = False, busy_timeout_ms: int = 5000) -> Engine:
    """Create a SQLAlchemy engine for the audit store.

    SQLite files get WAL mode and ``synchronous=FULL`` (a commit survives a
    power cut) and wait ``busy_timeout_ms`` for a lock; a ``writer`` engine
    checkpoints the WAL every ``WAL_CHECKPOINT_PAGES`` pages. A ``writer`` engine
    starts every transaction with ``BEGIN IMMEDIATE`` so two processes
    writing the same file (a server and ``audit prune``) queue for the lock
    instead of failing on a read-to-write upgrade.
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(u)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver, so BEGIN is ours (below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if writer:
                cur.execute("PRAGMA journal_mode=WAL")
                # Checkpoint every ~40 MiB of WAL instead of SQLite's 4 MiB: each
                # group commit rewrites the same index pages, and a page is copied
                # into the database once per checkpoint however often it changed
                # (a third less commit work at thousands of rows a second).
                # Durability is the WAL's, fsynced at every commit, either way.
                cur.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    connect_args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = 5
    return create_engine(u, pool_pre_ping=True, connect_args=connect_args)


def migrate(engine: Engine) -> None:
    """Bring the audit schema to the latest Alembic revision (creates it when absent).

    Concurrent migrations of one store take turns: on PostgreSQL under an
    advisory lock, on a SQLite file under ``<file>.migrate.lock`` (see
    :func:`nodelock.sqlite_migration_lock`), which also covers the engine's
    first connection, where a new file is switched to WAL mode.

    Raises:
        nodelock.NodeLockError: a SQLite file's migration lock cannot be opened.
    """
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with nodelock.sqlite_migration_lock(engine.url), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def require_schema(engine: Engine) -> None:
    """Raise AuditStoreError when the audit tables do not exist (nothing ever wrote here)."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        if not inspect(conn).has_table("audit_rows"):
            raise AuditStoreError(
                f"no audit tables at {engine.url.render_as_string(hide_password=True)}: "
                "has a wsgate server run with this [audit] url?")


# --- keys -------------------------------------------------------------------------------

def signing_key(cfg: AuditConfig) -> Ed25519PrivateKey | None:
    """The checkpoint signing key from ``signing_key`` or ``signing_key_file``, if any.

    Raises:
        AuditStoreError: the key cannot be read or is not Ed25519.
    """
    try:
        if cfg.signing_key:
            return chain.load_private_key(str(cfg.signing_key))
        if cfg.signing_key_file:
            return chain.load_private_key(Path(cfg.signing_key_file).read_bytes())
    except (OSError, chain.SigningKeyError) as exc:
        raise AuditStoreError(f"[audit] signing key: {exc}") from None
    return None


def verify_key(cfg: AuditConfig) -> Ed25519PublicKey | None:
    """The key checkpoints are verified with: ``verify_key_file``, else the signing key's.

    Raises:
        AuditStoreError: a configured key cannot be read or is not Ed25519.
    """
    if cfg.verify_key_file:
        try:
            return chain.load_public_key(Path(cfg.verify_key_file).read_bytes())
        except (OSError, chain.SigningKeyError) as exc:
            raise AuditStoreError(f"[audit] verify_key_file: {exc}") from None
    private = signing_key(cfg)
    return private.public_key() if private is not None else None


# --- chain heads and checkpoints ---------------------------------------------------

def load_head(conn: Connection, chain_name: str, node_id: str) -> tuple[int, str]:
    """The last (seq, row_hash) of a node's chain.

    With no rows, the newest prune checkpoint (everything was pruned), else
    ``(0, GENESIS)``.
    """
    table = CHAIN_TABLES[chain_name]
    row = conn.execute(
        select(table.c.seq, table.c.row_hash).where(table.c.node_id == node_id)
        .order_by(table.c.seq.desc()).limit(1)
    ).first()
    cp = CHECKPOINTS
    anchor = conn.execute(
        select(cp.c.seq, cp.c.head_hash)
        .where(cp.c.chain == chain_name, cp.c.node_id == node_id, cp.c.kind == CHECKPOINT_PRUNE)
        .order_by(cp.c.seq.desc()).limit(1)
    ).first()
    best = (0, chain.GENESIS)
    for found in (row, anchor):
        if found is not None and found[0] > best[0]:
            best = (int(found[0]), str(found[1]))
    return best


def make_checkpoint(private: Ed25519PrivateKey, chain_name: str, node_id: str, seq: int,
                    head_hash: str, kind: str) -> dict[str, Any]:
    """A signed checkpoint row, ready to insert into audit_checkpoints."""
    cp: dict[str, Any] = {
        "chain": chain_name, "node_id": node_id, "seq": seq, "head_hash": head_hash,
        "signed_at": chain.format_time(datetime.now(UTC)), "kind": kind,
        "key_id": chain.key_id(private.public_key()),
    }
    cp["signature"] = chain.sign_checkpoint(private, cp)
    return cp


# --- verify ------------------------------------------------------------------------

#: Problem kinds reported by verify.
CHANGED = "changed"
DELETED = "deleted"
INSERTED = "inserted"
BAD_SIGNATURE = "bad_signature"


@dataclass(frozen=True)
class VerifyProblem:
    """One break found by verify: what, in which chain of which node, at which seq."""

    kind: str
    chain: str
    node_id: str
    seq: int
    message: str


@dataclass
class VerifyResult:
    """What ``verify`` found. ``ok`` is true when no problem was found.

    ``problems`` holds the first break of each node's chain (rows after a
    break cannot be trusted, so they are not reported separately) and every
    bad checkpoint signature. ``signatures_checked`` is false when no key was
    available: the chain was checked, the signatures were not.
    """

    problems: list[VerifyProblem] = field(default_factory=list)
    rows_checked: int = 0
    events_checked: int = 0
    checkpoints_checked: int = 0
    nodes: list[str] = field(default_factory=list)
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> VerifyProblem | None:
        """The first problem of the subscription-rows chain (else events), lowest seq."""
        if not self.problems:
            return None
        return min(self.problems, key=lambda p: (p.chain != chain.CHAIN_ROWS, p.seq, p.node_id))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the HTTP API's /v1.0/audit/verify answer)."""
        return {
            "ok": self.ok,
            "first": asdict(self.first) if self.first else None,
            "problems": [asdict(p) for p in self.problems],
            "rows_checked": self.rows_checked,
            "events_checked": self.events_checked,
            "checkpoints_checked": self.checkpoints_checked,
            "nodes": self.nodes,
            "signatures_checked": self.signatures_checked,
        }


def verify(engine: Engine, public_key: Ed25519PublicKey | None) -> VerifyResult:
    """Check every node's chains (subscription rows and events) and every checkpoint.

    Rows are streamed in seq order, so memory stays flat on big logs.

    Reports, per node and chain, the first row that was ``changed`` (its
    hash does not match its fields), ``deleted`` (a seq is missing, or rows
    signed by a checkpoint are gone), or ``inserted`` (a duplicate seq, or a
    row not linked to the row before it); and every checkpoint whose
    signature does not verify under ``public_key`` (``bad_signature``).
    """
    result = VerifyResult(signatures_checked=public_key is not None)
    kid = chain.key_id(public_key) if public_key is not None else None
    nodes: set[str] = set()
    with engine.connect() as conn:
        for chain_name in (chain.CHAIN_ROWS, chain.CHAIN_EVENTS):
            table = CHAIN_TABLES[chain_name]
            cp = CHECKPOINTS
            chain_nodes = {r[0] for r in conn.execute(select(table.c.node_id).distinct())}
            chain_nodes |= {r[0] for r in conn.execute(
                select(cp.c.node_id).where(cp.c.chain == chain_name).distinct())}
            for node_id in sorted(chain_nodes):
                nodes.add(node_id)
                checkpoints = [dict(r._mapping) for r in conn.execute(
                    select(cp).where(cp.c.chain == chain_name, cp.c.node_id == node_id)
                    .order_by(cp.c.seq, cp.c.id))]
                good: list[dict[str, Any]] = []
                for c in checkpoints:
                    result.checkpoints_checked += 1
                    if public_key is not None and (
                            c["key_id"] != kid or not chain.checkpoint_signature_ok(public_key, c)):
                        why = ("was signed by another key (key id "
                               f"{c['key_id']}, expected {kid})" if c["key_id"] != kid
                               else "has a signature that does not verify")
                        result.problems.append(VerifyProblem(
                            BAD_SIGNATURE, chain_name, node_id, int(c["seq"]),
                            f"the {c['kind']} checkpoint at seq {c['seq']} {why}"))
                    else:
                        good.append(c)
                problem, count = _verify_chain(conn, chain_name, node_id, good)
                if chain_name == chain.CHAIN_ROWS:
                    result.rows_checked += count
                else:
                    result.events_checked += count
                if problem is not None:
                    result.problems.append(problem)
    result.nodes = sorted(nodes)
    return result


def _verify_chain(conn: Connection, chain_name: str, node_id: str,
                  checkpoints: list[dict[str, Any]]) -> tuple[VerifyProblem | None, int]:
    table = CHAIN_TABLES[chain_name]
    fields = chain.CHAIN_FIELDS[chain_name]
    noun = "row" if chain_name == chain.CHAIN_ROWS else "event"

    def problem(kind: str, seq: int, message: str) -> VerifyProblem:
        return VerifyProblem(kind, chain_name, node_id, seq, f"node {node_id!r}: {message}")

    prunes = {c["seq"]: c for c in checkpoints if c["kind"] == CHECKPOINT_PRUNE}
    signed: dict[int, list[dict[str, Any]]] = {}
    for c in checkpoints:
        signed.setdefault(int(c["seq"]), []).append(c)

    cols = [table.c[f] for f in fields if f in table.c] + [table.c.row_hash]
    stmt = (select(*cols).where(table.c.node_id == node_id)
            .order_by(table.c.seq, table.c.id).execution_options(yield_per=2000))
    expected_seq: int | None = None
    prev = chain.GENESIS
    last_seq = 0
    count = 0
    # Closed explicitly: an early return must not leave a server-side cursor behind.
    with conn.execute(stmt) as result:
        for r in result:
            row = r._mapping
            seq = int(row["seq"])
            count += 1
            if expected_seq is None:
                # Where the retained chain starts: seq 1, or just after a signed prune.
                if seq == 1:
                    expected_seq = 1
                elif seq - 1 in prunes:
                    expected_seq, prev = seq, str(prunes[seq - 1]["head_hash"])
                else:
                    below = [s for s in prunes if s < seq]
                    missing = (max(below) + 1) if below else 1
                    return problem(DELETED, missing,
                                   f"{noun}s {missing}..{seq - 1} are missing and no signed "
                                   "prune checkpoint covers them"), count
            if seq == last_seq:
                return problem(INSERTED, seq, f"two {noun}s have seq {seq}"), count
            if seq != expected_seq:
                return problem(DELETED, expected_seq,
                               f"{noun} seq {expected_seq} is missing (next is {seq})"), count
            if chain.row_hash(chain_name, dict(row)) != row["row_hash"]:
                return problem(CHANGED, seq,
                               f"{noun} seq {seq} was changed: its hash does not match "
                               "its fields"), count
            if row["prev_hash"] != prev:
                return problem(INSERTED, seq,
                               f"{noun} seq {seq} is not linked to the {noun} before it "
                               "(prev_hash mismatch): it was inserted, or the rows before it "
                               "were replaced"), count
            for c in signed.get(seq, ()):
                if c["head_hash"] != row["row_hash"]:
                    return problem(CHANGED, seq,
                                   f"{noun}s up to seq {seq} differ from what the "
                                   f"{c['kind']} checkpoint signed at {c['signed_at']}: "
                                   "they were rewritten"), count
            prev = str(row["row_hash"])
            last_seq = seq
            expected_seq = seq + 1
    top = max((int(c["seq"]) for c in checkpoints), default=0)
    if top > last_seq and not (last_seq == 0 and top in prunes):
        start = last_seq + 1
        if last_seq == 0:
            below = [s for s in prunes if s < top]
            start = (max(below) + 1) if below else 1
        return problem(DELETED, start,
                       f"{noun}s {start}..{top} were signed by a checkpoint but are gone"), count
    return None, count


# --- prune ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneResult:
    """What prune removed: counts, and the (chain, node_id, seq) of each prune checkpoint."""

    rows_deleted: int
    events_deleted: int
    checkpoints: list[tuple[str, str, int]]


def prune(engine: Engine, before: datetime, private_key: Ed25519PrivateKey | None) -> PruneResult:
    """Delete rows (and recorded events) older than ``before``, keeping the log verifiable.

    For each node and chain the oldest rows up to the first row at or after
    ``before`` are deleted, and in the same transaction a signed ``prune``
    checkpoint records the seq and hash of the last deleted row: verify then
    starts the retained chain there. The log is verified first; a broken log
    is not pruned (that would erase the evidence).

    Raises:
        AuditStoreError: no signing key, or the log does not verify.
    """
    if private_key is None:
        raise AuditStoreError("prune needs the [audit] signing key: without a signed "
                              "checkpoint the shortened chain could not be verified")
    check = verify(engine, private_key.public_key())
    if not check.ok:
        first = check.first
        assert first is not None
        raise AuditStoreError(f"the log does not verify ({first.message}); "
                              "investigate before pruning")
    cutoff = chain.format_time(before)
    deleted = {chain.CHAIN_ROWS: 0, chain.CHAIN_EVENTS: 0}
    made: list[tuple[str, str, int]] = []
    with engine.begin() as conn:
        for chain_name, table in CHAIN_TABLES.items():
            when = table.c.occurred_at if chain_name == chain.CHAIN_ROWS else table.c.published_at
            for (node_id,) in conn.execute(select(table.c.node_id).distinct()).all():
                first_kept = conn.execute(
                    select(func.min(table.c.seq))
                    .where(table.c.node_id == node_id, when >= cutoff)).scalar()
                last = conn.execute(
                    select(func.max(table.c.seq)).where(table.c.node_id == node_id)).scalar()
                if last is None:
                    continue
                upto = int(first_kept) - 1 if first_kept is not None else int(last)
                head = conn.execute(
                    select(table.c.row_hash)
                    .where(table.c.node_id == node_id, table.c.seq == upto)).scalar()
                if head is None:
                    continue  # nothing old enough (or already pruned up to there)
                conn.execute(insert(CHECKPOINTS).values(make_checkpoint(
                    private_key, chain_name, node_id, upto, str(head), CHECKPOINT_PRUNE)))
                n = conn.execute(delete(table).where(
                    table.c.node_id == node_id, table.c.seq <= upto)).rowcount
                deleted[chain_name] += n
                made.append((chain_name, node_id, upto))
    log.info("audit prune before %s: %d rows, %d events deleted", cutoff,
             deleted[chain.CHAIN_ROWS], deleted[chain.CHAIN_EVENTS])
    return PruneResult(deleted[chain.CHAIN_ROWS], deleted[chain.CHAIN_EVENTS], made)
