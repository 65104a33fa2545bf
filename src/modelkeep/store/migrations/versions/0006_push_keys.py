"""Idempotency keys of pushes: a retried push returns the version its key already made.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "push_keys",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_push_keys_model_id"),
            nullable=False,
        ),
        sa.Column("principal", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("versions.id", name="fk_push_keys_version_id"),
            nullable=False,
        ),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "principal", "idempotency_key", name="pk_push_keys"),
    )
    op.create_index("ix_push_keys_expires_at", "push_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_push_keys_expires_at", table_name="push_keys")
    op.drop_table("push_keys")
