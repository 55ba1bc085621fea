"""Initial audit schema: audit_rows, audit_events, audit_checkpoints.

Revision ID: 0001
Revises: (none)
Create Date: 2024-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL needs 64 bits.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table("audit_checkpoints",
    sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
    sa.Column("chain", sa.String(length=16), nullable=False),
    sa.Column("node_id", sa.String(length=200), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("head_hash", sa.String(length=64), nullable=False),
    sa.Column("signed_at", sa.String(length=27), nullable=False),
    sa.Column("kind", sa.String(length=16), nullable=False),
    sa.Column("key_id", sa.String(length=64), nullable=False),
    sa.Column("signature", sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.create_index("ix_audit_checkpoints_node", ["chain", "node_id", "seq"])

    op.create_table("audit_events",
    sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
    sa.Column("node_id", sa.String(length=200), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("event_id", sa.String(length=64), nullable=False),
    sa.Column("type", sa.String(length=200), nullable=False),
    sa.Column("topics", sa.Text(), nullable=False),
    sa.Column("ingest_key_id", sa.String(length=200), nullable=False),
    sa.Column("payload_sha256", sa.String(length=64), nullable=False),
    sa.Column("published_at", sa.String(length=27), nullable=False),
    sa.Column("prev_hash", sa.String(length=64), nullable=False),
    sa.Column("row_hash", sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("node_id", "seq", name="uq_audit_events_node_seq")
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_event_id", ["event_id"])
        batch_op.create_index("ix_audit_events_published", ["published_at"])

    op.create_table("audit_rows",
    sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
    sa.Column("node_id", sa.String(length=200), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("occurred_at", sa.String(length=27), nullable=False),
    sa.Column("connection_id", sa.String(length=200), nullable=False),
    sa.Column("action", sa.String(length=32), nullable=False),
    sa.Column("topic", sa.String(length=1024), nullable=False),
    sa.Column("outcome", sa.String(length=16), nullable=False),
    sa.Column("code", sa.String(length=64), nullable=False),
    sa.Column("kind", sa.String(length=32), nullable=False),
    sa.Column("subject", sa.String(length=512), nullable=False),
    sa.Column("customer_id", sa.String(length=64), nullable=True),
    sa.Column("agent_id", sa.String(length=64), nullable=True),
    sa.Column("authenticator", sa.String(length=200), nullable=False),
    sa.Column("remote_addr", sa.String(length=128), nullable=False),
    sa.Column("origin", sa.String(length=1024), nullable=True),
    sa.Column("user_agent", sa.String(length=1024), nullable=True),
    sa.Column("prev_hash", sa.String(length=64), nullable=False),
    sa.Column("row_hash", sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("node_id", "seq", name="uq_audit_rows_node_seq")
    )
    with op.batch_alter_table("audit_rows", schema=None) as batch_op:
        batch_op.create_index("ix_audit_rows_agent", ["agent_id", "occurred_at"])
        batch_op.create_index("ix_audit_rows_connection", ["connection_id", "topic"])
        batch_op.create_index("ix_audit_rows_customer", ["customer_id", "occurred_at"])
        batch_op.create_index("ix_audit_rows_occurred", ["occurred_at", "id"])
        batch_op.create_index("ix_audit_rows_subject", ["subject", "occurred_at"])



def downgrade() -> None:
    with op.batch_alter_table("audit_rows", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_rows_subject")
        batch_op.drop_index("ix_audit_rows_occurred")
        batch_op.drop_index("ix_audit_rows_customer")
        batch_op.drop_index("ix_audit_rows_connection")
        batch_op.drop_index("ix_audit_rows_agent")

    op.drop_table("audit_rows")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_published")
        batch_op.drop_index("ix_audit_events_event_id")

    op.drop_table("audit_events")
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_checkpoints_node")

    op.drop_table("audit_checkpoints")
