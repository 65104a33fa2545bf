"""Signatures and scanning: trusted publishers per model, signer and scan report per version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("require_signature", sa.Boolean, nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("layout", sa.String(16), nullable=True))
        batch.add_column(sa.Column("file_name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("signer", sa.String(80), nullable=True))
        batch.add_column(sa.Column("bundle", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("scan_report", sa.Text, nullable=True))
        batch.add_column(sa.Column("trusted_types", sa.Text, nullable=True))
    op.create_table(
        "publishers",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_publishers_model_id"),
            primary_key=True,
        ),
        sa.Column("fingerprint", sa.String(80), primary_key=True),
        sa.Column("pem", sa.Text, nullable=False),
        sa.Column("added_by", sa.String(64), nullable=False),
        sa.Column("added_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("publishers")
    with op.batch_alter_table("versions") as batch:
        for column in ("trusted_types", "scan_report", "bundle", "signer", "file_name", "layout"):
            batch.drop_column(column)
    with op.batch_alter_table("models") as batch:
        batch.drop_column("require_signature")
