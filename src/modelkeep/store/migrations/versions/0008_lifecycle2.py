"""Lifecycle: version lineage, crypto-shredded deletion, retention rules, drift references.

Revision ID: 0008_lifecycle2
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0008_lifecycle2"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("deleted_at", UTCDateTime, nullable=True))
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("lineage", sa.Text, nullable=True))
        batch.add_column(sa.Column("deleted_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.String(64), nullable=True))
    for name, columns in (
        (
            "retention_rules",
            [
                sa.Column("keep_versions", sa.Integer, nullable=True),
                sa.Column("capture_days", sa.Integer, nullable=True),
            ],
        ),
        ("drift_configs", [sa.Column("config", sa.Text, nullable=False)]),
    ):
        op.create_table(
            name,
            sa.Column(
                "model_id",
                sa.Integer,
                sa.ForeignKey("models.id", name=f"fk_{name}_model_id"),
                nullable=False,
            ),
            *columns,
            sa.Column("updated_by", sa.String(64), nullable=False),
            sa.Column("updated_at", UTCDateTime, nullable=False),
            sa.PrimaryKeyConstraint("model_id", name=f"pk_{name}"),
        )


def downgrade() -> None:
    op.drop_table("drift_configs")
    op.drop_table("retention_rules")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("deleted_by")
        batch.drop_column("deleted_at")
        batch.drop_column("lineage")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("deleted_at")
