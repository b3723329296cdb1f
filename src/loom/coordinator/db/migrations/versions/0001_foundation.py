"""Foundation: accounts, request nonces, nodes, devices, node events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "request_nonces",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_request_nonces_expires_at", "request_nonces", ["expires_at"])
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("node_key", sa.String(64), nullable=False, unique=True),
        sa.Column("owner_key", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("region", sa.String(32), nullable=False),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("price_micro", sa.BigInteger(), nullable=False),
        sa.Column("price_auto", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_changed_at", sa.Float(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.Column("connected_since", sa.Float(), nullable=True),
        sa.Column("last_heartbeat_at", sa.Float(), nullable=True),
        sa.Column("heartbeats", sa.BigInteger(), nullable=False),
        sa.Column("protocol", sa.Integer(), nullable=False),
        sa.Column("agent_version", sa.String(32), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("os", sa.String(255), nullable=False),
        sa.Column("cpu_model", sa.String(255), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=False),
        sa.Column("ram_mb", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_mb", sa.BigInteger(), nullable=False),
        sa.Column("inventory_json", sa.Text(), nullable=False),
        sa.Column("load_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_nodes_owner_key", "nodes", ["owner_key"])
    op.create_index("ix_nodes_state", "nodes", ["state"])
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "node_id", sa.String(32), sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("vram_mb", sa.BigInteger(), nullable=True),
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("declared", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_devices_node_id", "devices", ["node_id"])
    op.create_index("ix_devices_model_state", "devices", ["model", "state"])
    op.create_table(
        "node_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "node_id", sa.String(32), sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False),
    )
    op.create_index("ix_node_events_node_id", "node_events", ["node_id"])


def downgrade() -> None:
    op.drop_table("node_events")
    op.drop_table("devices")
    op.drop_table("nodes")
    op.drop_table("request_nonces")
    op.drop_table("accounts")
