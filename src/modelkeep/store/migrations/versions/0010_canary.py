"""Canary and shadow traffic on labels.

Revision ID: 0010_canary
Revises: 0009_lifecycle
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0010_canary"
down_revision = "0009_lifecycle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_canaries_model_id"),
            nullable=False,
        ),
        sa.Column("label", sa.String(63), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("share", sa.Float, nullable=False),
        sa.Column("thresholds", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("change_id", sa.String(32), nullable=True),
        sa.Column("started_by", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("ended_by", sa.String(64), nullable=True),
        sa.Column("ended_at", UTCDateTime, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_canaries"),
    )
    op.create_index("ix_canaries_model_id", "canaries", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_canaries_model_id", table_name="canaries")
    op.drop_table("canaries")
