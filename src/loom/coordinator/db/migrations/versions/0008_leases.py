"""Leased work items (issue 11 §1): lock columns, role leases, the lease audit trail.

- clusters: ``lock_owner``, ``lock_token``, ``lock_expires_at`` replace ``lease_until``
  (an unexpired old lease keeps its expiry, owned by "pre-0008", so it lapses as before),
  and ``fail_reason``: set when a cluster goes `terminating` to end `failed` (the
  reconciler's teardown reads it; "" ends `terminated`).
- devices: the same three columns (the challenger's lease).
- leases: named role leases (name, owner, token, expires_at).
- lease_audit: one row per action applied under a lease.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: 0006's partial unique index: dropped and rebuilt around the table rebuild (SQLite's
#: batch mode copies the table, and would lose the index's WHERE clause).
NAME_INDEX = "uq_clusters_owner_live_name"
LIVE_STATES = ("requested", "provisioning", "running", "healing", "terminating")


def _drop_name_index() -> None:
    op.drop_index(NAME_INDEX, table_name="clusters")


def _create_name_index() -> None:
    where = sa.text("state IN (" + ", ".join(f"'{s}'" for s in LIVE_STATES) + ")")
    op.create_index(
        NAME_INDEX,
        "clusters",
        ["owner_key", "name"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def _lock_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("lock_owner", sa.String(128), nullable=True),
        sa.Column("lock_token", sa.String(64), nullable=True),
        sa.Column("lock_expires_at", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    _drop_name_index()
    with op.batch_alter_table("clusters") as batch:
        for column in _lock_columns():
            batch.add_column(column)
        batch.add_column(sa.Column("fail_reason", sa.Text(), nullable=False, server_default=""))
    op.execute(
        "UPDATE clusters SET lock_owner = 'pre-0008', lock_expires_at = lease_until "
        "WHERE lease_until > 0"
    )
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("lease_until")
    _create_name_index()
    with op.batch_alter_table("devices") as batch:
        for column in _lock_columns():
            batch.add_column(column)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, server_default=""),
        sa.Column("token", sa.String(64), nullable=False, server_default=""),
        sa.Column("expires_at", sa.Float(), nullable=False, server_default="0"),
    )
    op.create_table(
        "lease_audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_lease_audit_item", "lease_audit", ["kind", "item_id"])
    op.create_index("ix_lease_audit_at", "lease_audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_lease_audit_at", table_name="lease_audit")
    op.drop_index("ix_lease_audit_item", table_name="lease_audit")
    op.drop_table("lease_audit")
    op.drop_table("leases")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("lock_expires_at")
        batch.drop_column("lock_token")
        batch.drop_column("lock_owner")
    _drop_name_index()
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("lease_until", sa.Float(), nullable=False, server_default="0"))
    op.execute("UPDATE clusters SET lease_until = COALESCE(lock_expires_at, 0)")
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("fail_reason")
        batch.drop_column("lock_expires_at")
        batch.drop_column("lock_token")
        batch.drop_column("lock_owner")
    _create_name_index()
