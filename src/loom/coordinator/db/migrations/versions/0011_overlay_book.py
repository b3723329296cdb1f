"""The overlay's book in the database, shared by every replica (issue 10 with issue 11).

Until now the address book, the signed certificates and the blocklist were JSON files in
one coordinator's overlay directory, so only that coordinator could sign. Now every
replica reads and writes them here (loom.coordinator.overlay.book); a coordinator that
finds the old files imports them once at start-up.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overlay_ca",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ca_crt", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "overlay_holders",
        sa.Column("holder", sa.String(64), primary_key=True),
        sa.Column("cluster_id", sa.String(64), nullable=False),
        sa.Column("ip", sa.String(15), nullable=False, unique=True),
        sa.Column("pub", sa.Text(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.Column("lifetime", sa.Float(), nullable=False),
        sa.Column("relayed", sa.Boolean(), nullable=True),
    )
    op.create_index("ix_overlay_holders_cluster_id", "overlay_holders", ["cluster_id"])
    op.create_table(
        "overlay_certs",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("cluster_id", sa.String(64), nullable=False),
        sa.Column("ip", sa.String(15), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_overlay_certs_holder", "overlay_certs", ["holder"])
    op.create_index("ix_overlay_certs_cluster_id", "overlay_certs", ["cluster_id"])
    op.create_index("ix_overlay_certs_revoked", "overlay_certs", ["revoked_at", "expires"])
    op.create_table(
        "overlay_lighthouses",
        sa.Column("addresses", sa.String(255), primary_key=True),
        sa.Column("slot", sa.Integer(), nullable=False, unique=True),
        sa.Column("ip", sa.String(15), nullable=False),
        sa.Column("replica_id", sa.String(128), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("overlay_lighthouses")
    op.drop_index("ix_overlay_certs_revoked", table_name="overlay_certs")
    op.drop_index("ix_overlay_certs_cluster_id", table_name="overlay_certs")
    op.drop_index("ix_overlay_certs_holder", table_name="overlay_certs")
    op.drop_table("overlay_certs")
    op.drop_index("ix_overlay_holders_cluster_id", table_name="overlay_holders")
    op.drop_table("overlay_holders")
    op.drop_table("overlay_ca")
