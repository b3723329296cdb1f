"""Clusters, members, allocations, cluster events; device allocation counter.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("allocated_units", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "clusters",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("owner_key", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("ray_token", sa.String(128), nullable=False),
        sa.Column("head_address", sa.String(255), nullable=False),
        sa.Column("dashboard_url", sa.String(255), nullable=False),
        sa.Column("client_address", sa.String(255), nullable=False),
        sa.Column("hourly_micro", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ready_at", sa.Float(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("state_changed_at", sa.Float(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("timings_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_clusters_owner_key", "clusters", ["owner_key"])
    op.create_index("ix_clusters_state", "clusters", ["state"])
    op.create_table(
        "members",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "cluster_id",
            sa.String(32),
            sa.ForeignKey("clusters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("node_id", sa.String(32), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("gpu_indices", sa.String(128), nullable=False),
        sa.Column("price_micro", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ready_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("ray_node_id", sa.String(64), nullable=False),
    )
    op.create_index("ix_members_cluster_id", "members", ["cluster_id"])
    op.create_index("ix_members_node_id", "members", ["node_id"])
    op.create_index("ix_members_state", "members", ["state"])
    op.create_table(
        "allocations",
        sa.Column(
            "member_id",
            sa.String(32),
            sa.ForeignKey("members.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("units", sa.Integer(), nullable=False),
    )
    op.create_table(
        "cluster_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "cluster_id",
            sa.String(32),
            sa.ForeignKey("clusters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_cluster_events_cluster_id", "cluster_events", ["cluster_id"])


def downgrade() -> None:
    op.drop_table("cluster_events")
    op.drop_table("allocations")
    op.drop_table("members")
    op.drop_table("clusters")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("allocated_units")
