"""The ledger's hand-off queue: transfers a replica without the sequencer role hands over.

Issue 11 §6: the role holder claims pending rows (FOR UPDATE SKIP LOCKED on PostgreSQL)
inside its batch transaction and answers each in the same transaction; the submitting
replica reads its answers and deletes them (loom.coordinator.services.ledger_queue).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_queue",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("submitted_by", sa.String(128), nullable=False),
        sa.Column("submitted_at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idem_key", sa.Text(), nullable=False),
        sa.Column("entries_json", sa.Text(), nullable=False),
        sa.Column("meta_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False, server_default="pending"),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("code", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("answered_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_ledger_queue_state", "ledger_queue", ["state", "id"])


def downgrade() -> None:
    op.drop_index("ix_ledger_queue_state", table_name="ledger_queue")
    op.drop_table("ledger_queue")
