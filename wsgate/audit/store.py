"""The audit store: engines, migrations, keys, chain heads, verify and prune.

Everything here is synchronous and may block: the server calls it from the
audit writer thread or a thread executor, the CLI directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

from wsgate.audit import chain, nodelock, proof
from wsgate.audit.orm import CHAIN_TABLES, CHECKPOINTS, VERSION_TABLE
from wsgate.config import AuditConfig

log = logging.getLogger("wsgate.audit")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Checkpoint kinds (see orm.AuditCheckpoint).
CHECKPOINT_START = "start"
CHECKPOINT_PERIODIC = "periodic"
CHECKPOINT_INTERVAL = "interval"
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


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the audit schema to ``revision``, the latest by default (creates it when absent).

    Concurrent migrations of one store take turns: on PostgreSQL under an
    advisory lock, on a SQLite file under ``<file>.migrate.lock`` (see
    :func:`nodelock.sqlite_migration_lock`), which also covers the engine's
    first connection, where a new file is switched to WAL mode.

    Raises:
        nodelock.NodeLockError: a SQLite file's migration lock cannot be opened.
    """
    cfg = _alembic_config()
    with nodelock.sqlite_migration_lock(engine.url), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def schema_revision(conn: Connection) -> str | None:
    """The audit schema's Alembic revision in this store (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def head_revision() -> str:
    """The latest audit schema revision this wsgate knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def require_schema(engine: Engine) -> None:
    """Raise AuditStoreError when the audit tables do not exist (nothing ever wrote here)."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        if not inspect(conn).has_table("audit_rows"):
            raise AuditStoreError(
                f"no audit tables at {engine.url.render_as_string(hide_password=True)}: "
                "has a wsgate server run with this [audit] url?")
        found, head = schema_revision(conn), head_revision()
        if found != head:
            raise AuditStoreError(
                f"the audit schema at {engine.url.render_as_string(hide_password=True)} is "
                f"at revision {found}, and this wsgate reads revision {head}: start "
                "`wsgate serve` with this config once (it migrates the store at start), "
                "or run the wsgate that wrote it")


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
                    head_hash: str, kind: str, *, prev_hash: str | None = None,
                    policy: chain.Policy | None = None) -> dict[str, Any]:
    """A signed checkpoint row, ready to insert into audit_checkpoints.

    With ``prev_hash`` (the hash of the node's previous chained checkpoint of
    this chain, or GENESIS for its first) it is chained and also signs
    ``policy``; without, it stands alone (prune checkpoints).
    """
    cp: dict[str, Any] = {
        "chain": chain_name, "node_id": node_id, "seq": seq, "head_hash": head_hash,
        "signed_at": chain.format_time(datetime.now(UTC)), "kind": kind,
        "key_id": chain.key_id(private.public_key()), "prev_hash": prev_hash,
        "policy": policy.text() if policy is not None and prev_hash is not None else None,
    }
    cp["signature"] = chain.sign_checkpoint(private, cp)
    return cp


def load_seal(conn: Connection, chain_name: str, node_id: str) -> tuple[int, str]:
    """Where a node's checkpoint chain stands: the seq its last chained checkpoint
    signed and that checkpoint's hash; ``(0, GENESIS)`` before its first.

    A node whose checkpoints were all made before checkpoints chained starts
    its chain at GENESIS from its newest such checkpoint's seq.
    """
    cp = CHECKPOINTS
    last = conn.execute(
        select(*[c for c in cp.c if c.name != "id"])
        .where(cp.c.chain == chain_name, cp.c.node_id == node_id,
               cp.c.kind != CHECKPOINT_PRUNE)
        .order_by(cp.c.prev_hash.is_(None), cp.c.seq.desc(), cp.c.id.desc()).limit(1)
    ).first()
    if last is None:
        return 0, chain.GENESIS
    found = dict(last._mapping)
    if found["prev_hash"] is None:
        return int(found["seq"]), chain.GENESIS
    return int(found["seq"]), chain.checkpoint_hash(found)


# --- verify ------------------------------------------------------------------------

# Problem kinds reported by verify (see wsgate.audit.proof for all of them).
CHANGED = proof.CHANGED
DELETED = proof.DELETED
INSERTED = proof.INSERTED
BAD_SIGNATURE = proof.BAD_SIGNATURE
VerifyProblem = proof.VerifyProblem


@dataclass
class VerifyResult:
    """What ``verify`` found. ``ok`` is true when no problem was found.

    ``problems`` holds, per node and chain, each bad checkpoint signature,
    the first break of the checkpoint chain and the first break of the row
    chain (rows after a break cannot be trusted, so they are not reported
    separately), and what the witnesses hold that the store lost.
    ``signatures_checked`` is false when no key was available: the chains
    were checked, the signatures were not. ``unsealed`` lists each node's
    rows after its last checkpoint (a warning, not a problem, while within
    the node's policy).
    """

    problems: list[VerifyProblem] = field(default_factory=list)
    rows_checked: int = 0
    events_checked: int = 0
    checkpoints_checked: int = 0
    nodes: list[str] = field(default_factory=list)
    signatures_checked: bool = False
    unsealed: list[proof.UnsealedTail] = field(default_factory=list)
    witnesses: list[str] = field(default_factory=list)
    witnessed_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> VerifyProblem | None:
        """The first problem of the subscription-rows chain (else events), lowest seq."""
        if not self.problems:
            return None
        return min(self.problems, key=lambda p: (p.chain != chain.CHAIN_ROWS, p.seq, p.node_id))

    def add(self, report: proof.ChainReport, chain_name: str) -> None:
        """Count in one node's chain report."""
        self.problems.extend(report.problems)
        self.checkpoints_checked += report.checkpoints
        if chain_name == chain.CHAIN_ROWS:
            self.rows_checked += report.rows
        else:
            self.events_checked += report.rows
        if report.tail is not None:
            self.unsealed.append(report.tail)

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
            "unsealed": [t.to_dict() for t in self.unsealed],
            "witnesses": self.witnesses,
            "witnessed_checked": self.witnessed_checked,
        }


def load_checkpoints(conn: Connection, chain_name: str | None = None,
                     node_id: str | None = None) -> list[dict[str, Any]]:
    """Stored checkpoints (of one chain and node when given), by chain, node, seq,
    then the order they were stored; without the ``id`` column."""
    cp = CHECKPOINTS
    conds = []
    if chain_name is not None:
        conds.append(cp.c.chain == chain_name)
    if node_id is not None:
        conds.append(cp.c.node_id == node_id)
    stmt = select(*[c for c in cp.c if c.name != "id"]).where(*conds).order_by(
        cp.c.chain, cp.c.node_id, cp.c.seq, cp.c.id)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def verify(engine: Engine, public_key: Ed25519PublicKey | None,
           witnesses: Sequence[tuple[str, Sequence[dict[str, Any]]]] = ()) -> VerifyResult:
    """Check every node's chains (subscription rows and events), every checkpoint and
    each checkpoint chain (the rules of :mod:`wsgate.audit.proof`), and compare
    what each witness holds with the store.

    Args:
        witnesses: (name, checkpoints read from it) pairs.

    Rows are streamed in seq order, so memory stays flat on big logs.
    """
    result = VerifyResult(signatures_checked=public_key is not None)
    nodes: set[str] = set()
    stored: list[dict[str, Any]] = []
    with engine.connect() as conn:
        for chain_name in (chain.CHAIN_ROWS, chain.CHAIN_EVENTS):
            table = CHAIN_TABLES[chain_name]
            checkpoints = load_checkpoints(conn, chain_name)
            stored.extend(checkpoints)
            by_node: dict[str, list[dict[str, Any]]] = {}
            for c in checkpoints:
                by_node.setdefault(c["node_id"], []).append(c)
            chain_nodes = {r[0] for r in conn.execute(select(table.c.node_id).distinct())}
            for node_id in sorted(chain_nodes | set(by_node)):
                nodes.add(node_id)
                cols = [table.c[f] for f in chain.CHAIN_FIELDS[chain_name] if f in table.c]
                stmt = (select(*cols, table.c.row_hash).where(table.c.node_id == node_id)
                        .order_by(table.c.seq, table.c.id).execution_options(yield_per=2000))
                # Closed explicitly: an early stop must not leave a server-side cursor behind.
                with conn.execute(stmt) as rows:
                    report = proof.check_chain(chain_name, node_id, by_node.get(node_id, []),
                                               (r._mapping for r in rows), public_key)
                result.add(report, chain_name)
    for name, held in witnesses:
        result.witnesses.append(name)
        result.witnessed_checked += len(held)
        result.problems.extend(proof.check_witnessed(held, stored, public_key, name))
        nodes |= {str(c.get("node_id")) for c in held}
    result.nodes = sorted(nodes)
    return result


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
