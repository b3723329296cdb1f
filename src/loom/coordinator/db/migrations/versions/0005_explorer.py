"""Explorer: utilization samples, one row a minute, for the 24 h chart.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "utilization_samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("nodes_online", sa.Integer(), nullable=False),
        sa.Column("gpu_total", sa.Integer(), nullable=False),
        sa.Column("gpu_allocated", sa.Integer(), nullable=False),
        sa.Column("cpu_total", sa.Integer(), nullable=False),
        sa.Column("cpu_allocated", sa.Integer(), nullable=False),
        sa.Column("heartbeats_per_s", sa.Float(), nullable=False),
    )
    op.create_index("ix_utilization_samples_at", "utilization_samples", ["at"])


def downgrade() -> None:
    op.drop_index("ix_utilization_samples_at", table_name="utilization_samples")
    op.drop_table("utilization_samples")
