"""Hardware verification: challenge history per device, and fraud evidence.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_challenges",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("challenge_id", sa.String(64), nullable=False, unique=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column(
            "node_id",
            sa.String(32),
            sa.ForeignKey("nodes.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("device_class", sa.String(64), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("measured_rate", sa.Float(), nullable=True),
        sa.Column("required_rate", sa.Float(), nullable=False),
        sa.Column("openings_checked", sa.Integer(), nullable=False),
        sa.Column("openings_failed", sa.Integer(), nullable=False),
    )
    op.create_index("ix_device_challenges_device", "device_challenges", ["device_id", "started_at"])
    op.create_index("ix_device_challenges_node", "device_challenges", ["node_id", "started_at"])
    op.create_table(
        "challenge_evidence",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("challenge_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("node_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_challenge_evidence_challenge_id", "challenge_evidence", ["challenge_id"])
    op.create_index("ix_challenge_evidence_node_id", "challenge_evidence", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_challenge_evidence_node_id", table_name="challenge_evidence")
    op.drop_index("ix_challenge_evidence_challenge_id", table_name="challenge_evidence")
    op.drop_table("challenge_evidence")
    op.drop_index("ix_device_challenges_node", table_name="device_challenges")
    op.drop_index("ix_device_challenges_device", table_name="device_challenges")
    op.drop_table("device_challenges")
