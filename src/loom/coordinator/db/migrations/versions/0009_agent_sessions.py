"""Agent sessions across replicas: which replica holds each agent's socket, and an epoch.

Issue 11 §3: the epoch is bumped on every (re)connect; a replica's writes on an agent's
behalf are guarded by it (loom.coordinator.replicas.sessions).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_sessions",
        sa.Column("node_id", sa.String(32), primary_key=True),
        sa.Column("replica_id", sa.String(128), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="1"),
        sa.Column("connected_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("address", sa.String(255), nullable=False, server_default=""),
    )
    op.create_index("ix_agent_sessions_replica_id", "agent_sessions", ["replica_id"])


def downgrade() -> None:
    op.drop_index("ix_agent_sessions_replica_id", table_name="agent_sessions")
    op.drop_table("agent_sessions")
