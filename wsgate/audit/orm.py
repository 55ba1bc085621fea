"""The audit tables, and nothing else (SQLAlchemy 2 typed mappings).

The schema is created and changed only by the Alembic migrations in
``wsgate/audit/migrations``; these classes must match the latest revision.

Times are stored as text in one fixed form, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
(see ``chain.format_time``): SQLite and PostgreSQL then hold, sort and hash
exactly the same bytes.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Index, Integer, String, Table, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The Alembic version table of the audit schema (our own name, so the schema can
#: share a database with others).
VERSION_TABLE = "wsgate_audit_alembic_version"

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL needs 64 bits.
BigId = BigInteger().with_variant(Integer(), "sqlite")

TIME = String(27)
HASH = String(64)
ID = String(200)


class Base(DeclarativeBase):
    pass


class AuditRow(Base):
    """One subscribe or unsubscribe of one topic, accepted or rejected (SPEC §5)."""

    __tablename__ = "audit_rows"

    #: Global insertion order (also the query tie-breaker).
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ID)
    #: Position in this node's chain, from 1, without gaps.
    seq: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[str] = mapped_column(TIME)
    connection_id: Mapped[str] = mapped_column(ID)
    action: Mapped[str] = mapped_column(String(32))
    topic: Mapped[str] = mapped_column(String(1024))
    outcome: Mapped[str] = mapped_column(String(16))
    code: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(512))
    customer_id: Mapped[str | None] = mapped_column(String(64))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    authenticator: Mapped[str] = mapped_column(String(200))
    remote_addr: Mapped[str] = mapped_column(String(128))
    origin: Mapped[str | None] = mapped_column(String(1024))
    user_agent: Mapped[str | None] = mapped_column(String(1024))
    prev_hash: Mapped[str] = mapped_column(HASH)
    row_hash: Mapped[str] = mapped_column(HASH)

    __table_args__ = (
        UniqueConstraint("node_id", "seq", name="uq_audit_rows_node_seq"),
        Index("ix_audit_rows_occurred", "occurred_at", "id"),
        Index("ix_audit_rows_customer", "customer_id", "occurred_at"),
        Index("ix_audit_rows_agent", "agent_id", "occurred_at"),
        Index("ix_audit_rows_subject", "subject", "occurred_at"),
        # Also serves topic lookups within a connection (ends, unclean shutdown,
        # recipients). No index on topic alone: prefix LIKE cannot use a plain btree
        # on either backend, and each index costs every insert.
        Index("ix_audit_rows_connection", "connection_id", "topic"),
    )


class AuditEvent(Base):
    """One ingested event, for ``audit recipients``. Each node chains its own events."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ID)
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(200))
    #: The event's topics as a compact JSON list.
    topics: Mapped[str] = mapped_column(Text)
    ingest_key_id: Mapped[str] = mapped_column(String(200))
    payload_sha256: Mapped[str] = mapped_column(HASH)
    published_at: Mapped[str] = mapped_column(TIME)
    prev_hash: Mapped[str] = mapped_column(HASH)
    row_hash: Mapped[str] = mapped_column(HASH)

    __table_args__ = (
        UniqueConstraint("node_id", "seq", name="uq_audit_events_node_seq"),
        Index("ix_audit_events_event_id", "event_id"),
        Index("ix_audit_events_published", "published_at"),
    )


class AuditCheckpoint(Base):
    """A signed statement "the head of this node's chain was head_hash at seq".

    ``kind`` is ``start`` (the node started), ``periodic`` (checkpoint_every
    rows), ``interval`` (rows stayed unsealed checkpoint_interval seconds),
    ``close`` (clean shutdown), or ``prune`` (rows up to seq were deleted on
    purpose; the retained chain starts after it).

    A chained checkpoint names the hash of the node's previous chained
    checkpoint of the same chain in ``prev_hash`` (64 zeros for its first) and
    the policy it was signed under in ``policy``; both are signed. ``prune``
    checkpoints, written by ``wsgate audit prune`` beside a running node, and
    those written before migration 0002 have neither.
    """

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    chain: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[str] = mapped_column(ID)
    seq: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(HASH)
    signed_at: Mapped[str] = mapped_column(TIME)
    kind: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(200))
    prev_hash: Mapped[str | None] = mapped_column(HASH)
    policy: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_audit_checkpoints_node", "chain", "node_id", "seq"),
    )


# Core Table objects, typed as such (``__table__`` is typed as a bare FromClause).
ROWS = cast(Table, AuditRow.__table__)
EVENTS = cast(Table, AuditEvent.__table__)
CHECKPOINTS = cast(Table, AuditCheckpoint.__table__)

#: The chain tables by chain name (see chain.CHAIN_ROWS / CHAIN_EVENTS).
CHAIN_TABLES: dict[str, Table] = {"rows": ROWS, "events": EVENTS}
