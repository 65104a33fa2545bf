"""Payload capture: sampled, sealed inference requests and responses per model.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payload_captures",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", name="fk_payload_captures_model_id"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("principal", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("input_size", sa.Integer, nullable=False),
        sa.Column("output_size", sa.Integer, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_payload_captures"),
    )
    op.create_index("ix_payload_captures_created_at", "payload_captures", ["created_at"])
    op.create_index("ix_payload_captures_expires_at", "payload_captures", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_payload_captures_expires_at", table_name="payload_captures")
    op.drop_index("ix_payload_captures_created_at", table_name="payload_captures")
    op.drop_table("payload_captures")
