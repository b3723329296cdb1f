"""Honest billing, private public view: confirmed readiness, measured capacity, pseudonyms.

Issue 14 §3-4.

- members: ``confirmed_s``, ``confirmed_last``, ``confirm_note`` (only confirmed time is
  billed); member_meters: ``billed_s``.
- devices: ``verified_units`` (what the challenge measured; offers never exceed it).
- ledger_aliases: the public pseudonym of each private account. Accounts that already
  hold money keep their name (the hash chain cannot be rewritten): they map to themselves.

Independent of 0006's content: it only adds columns and one table.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("confirmed_s", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("confirmed_last", sa.Float(), nullable=True))
        batch.add_column(sa.Column("confirm_note", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("member_meters") as batch:
        batch.add_column(sa.Column("billed_s", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("verified_units", sa.Integer(), nullable=True))
    op.create_table(
        "ledger_aliases",
        sa.Column("account", sa.String(80), primary_key=True),
        sa.Column("alias", sa.String(80), nullable=False, unique=True),
    )
    # Money that moved before pseudonyms stays under its old name.
    op.execute(
        "INSERT INTO ledger_aliases (account, alias) SELECT account, account FROM "
        "account_balances WHERE account LIKE 'user:%' OR account LIKE 'escrow:%'"
    )
    # Meters that existed before: their past time was billed as healthy time already.
    op.execute(
        "UPDATE members SET confirmed_s = COALESCE((SELECT MAX(m.metered_until) FROM "
        "member_meters m WHERE m.member_id = members.id), 0) - COALESCE(ready_at, 0) "
        "WHERE ready_at IS NOT NULL AND EXISTS (SELECT 1 FROM member_meters m "
        "WHERE m.member_id = members.id)"
    )
    op.execute(
        "UPDATE member_meters SET billed_s = COALESCE((SELECT CAST(members.confirmed_s AS "
        "BIGINT) FROM members WHERE members.id = member_meters.member_id), 0)"
    )


def downgrade() -> None:
    op.drop_table("ledger_aliases")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("verified_units")
    with op.batch_alter_table("member_meters") as batch:
        batch.drop_column("billed_s")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("confirm_note")
        batch.drop_column("confirmed_last")
        batch.drop_column("confirmed_s")
