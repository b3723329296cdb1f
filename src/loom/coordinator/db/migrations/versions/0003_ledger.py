"""The money plane: ledger transactions and entries, balances, head, member meters.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

GENESIS_HASH = "0" * 64


def upgrade() -> None:
    op.create_table(
        "ledger_transactions",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("meta_json", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "ledger_entries",
        sa.Column(
            "txn_seq",
            sa.BigInteger(),
            sa.ForeignKey("ledger_transactions.seq"),
            primary_key=True,
        ),
        sa.Column("account", sa.String(100), primary_key=True),
        sa.Column("amount_micro", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_ledger_entries_account", "ledger_entries", ["account", "txn_seq"])
    op.create_table(
        "account_balances",
        sa.Column("account", sa.String(100), primary_key=True),
        sa.Column("balance_micro", sa.BigInteger(), nullable=False),
    )
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])
    op.create_table(
        "member_meters",
        sa.Column(
            "member_id",
            sa.String(32),
            sa.ForeignKey("members.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("cluster_id", sa.String(32), nullable=False),
        sa.Column("supplier_key", sa.String(64), nullable=False),
        sa.Column("metered_until", sa.Float(), nullable=False),
        sa.Column("carry", sa.Integer(), nullable=False),
        sa.Column("accrued_micro", sa.BigInteger(), nullable=False),
        sa.Column("settled_micro", sa.BigInteger(), nullable=False),
        sa.Column("paid_micro", sa.BigInteger(), nullable=False),
        sa.Column("written_off_micro", sa.BigInteger(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_member_meters_cluster_id", "member_meters", ["cluster_id"])
    op.create_index("ix_member_meters_supplier_key", "member_meters", ["supplier_key"])


def downgrade() -> None:
    op.drop_table("member_meters")
    op.drop_table("ledger_head")
    op.drop_table("account_balances")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_transactions")
