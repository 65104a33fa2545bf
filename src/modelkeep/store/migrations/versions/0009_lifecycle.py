"""Lifecycle: evaluation sets and metrics, protected labels, label history, change requests.

Revision ID: 0009_lifecycle
Revises: 0008_lifecycle2
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modelkeep.store.schema import UTCDateTime

revision = "0009_lifecycle"
down_revision = "0008_lifecycle2"
branch_labels = None
depends_on = None


def _model_fk(table: str) -> sa.Column[int]:
    return sa.Column(
        "model_id",
        sa.Integer,
        sa.ForeignKey("models.id", name=f"fk_{table}_model_id"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "eval_sets",
        _model_fk("eval_sets"),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("gates", sa.Text, nullable=False),
        sa.Column("blob_key", sa.String(128), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("model_id", name="pk_eval_sets"),
        sa.UniqueConstraint("blob_key", name="uq_eval_sets_blob_key"),
    )
    op.create_table(
        "evaluations",
        _model_fk("evaluations"),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("evalset_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("evaluated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "version", "evalset_sha256", name="pk_evaluations"),
    )
    op.create_table(
        "protected_labels",
        _model_fk("protected_labels"),
        sa.Column("label", sa.String(63), nullable=False),
        sa.Column("approvals", sa.Integer, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "label", name="pk_protected_labels"),
    )
    op.create_table(
        "label_history",
        sa.Column("id", sa.Integer, nullable=False),
        _model_fk("label_history"),
        sa.Column("label", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("previous", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("change_id", sa.String(32), nullable=True),
        sa.Column("time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_label_history"),
    )
    op.create_index("ix_label_history_model_id", "label_history", ["model_id"])
    op.create_table(
        "change_requests",
        sa.Column("id", sa.String(32), nullable=False),
        _model_fk("change_requests"),
        sa.Column("label", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("previous", sa.Integer, nullable=True),
        sa.Column("new_approvals", sa.Integer, nullable=True),
        sa.Column("approvals_needed", sa.Integer, nullable=False),
        sa.Column("requester", sa.String(64), nullable=False),
        sa.Column("pusher", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("decided_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_change_requests"),
    )
    op.create_index("ix_change_requests_status", "change_requests", ["status"])
    op.create_table(
        "change_approvals",
        sa.Column(
            "change_id",
            sa.String(32),
            sa.ForeignKey("change_requests.id", name="fk_change_approvals_change_id"),
            nullable=False,
        ),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("change_id", "key_id", name="pk_change_approvals"),
    )


def downgrade() -> None:
    op.drop_table("change_approvals")
    op.drop_index("ix_change_requests_status", table_name="change_requests")
    op.drop_table("change_requests")
    op.drop_index("ix_label_history_model_id", table_name="label_history")
    op.drop_table("label_history")
    op.drop_table("protected_labels")
    op.drop_table("evaluations")
    op.drop_table("eval_sets")
