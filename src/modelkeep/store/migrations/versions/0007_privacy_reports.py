"""Privacy reports: the membership-leakage report of a model version (`policy assess`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_reports",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_privacy_reports_model_id"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("report", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "version", name="pk_privacy_reports"),
    )


def downgrade() -> None:
    op.drop_table("privacy_reports")
