"""Guard policies per model and detector restrictions per key and model.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_policies",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_model_policies_model_id"),
            primary_key=True,
        ),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "key_restrictions",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_key_restrictions_model_id"),
            primary_key=True,
        ),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_restrictions")
    op.drop_table("model_policies")
