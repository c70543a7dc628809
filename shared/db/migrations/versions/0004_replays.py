"""replays: what a replay changed on an audit record

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 05:00:00

A delivery that was ignored and routes when reprocessed (a mapping added or enabled since) has its
audit record upgraded in place: ``previous_outcome``/``previous_reason`` keep what it was, and
``replay_id`` names the replay that changed it (also set on records a replay created).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_records", sa.Column("replay_id", sa.String(length=64), nullable=True))
    op.add_column("audit_records", sa.Column("previous_outcome", sa.String(length=16), nullable=True))
    op.add_column("audit_records", sa.Column("previous_reason", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_records", "previous_reason")
    op.drop_column("audit_records", "previous_outcome")
    op.drop_column("audit_records", "replay_id")
