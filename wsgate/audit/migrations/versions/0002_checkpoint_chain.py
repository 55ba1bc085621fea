"""Checkpoints chain: audit_checkpoints.prev_hash and policy.

Checkpoints written before this revision keep both columns null: verify
checks them as unchained checkpoints, signed over their original fields.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("policy", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.drop_column("policy")
        batch_op.drop_column("prev_hash")
