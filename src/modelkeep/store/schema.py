"""Tables of the metadata store (SQLAlchemy Core). Alembic migrations create them.

Everything here is untrusted storage (DESIGN §4): credentials are hashes, data keys are wrapped by
the key service, and model bytes live elsewhere, sealed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import true as sa_true
from sqlalchemy.engine import Dialect

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ix": "ix_%(table_name)s_%(column_0_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no zone, PostgreSQL would convert."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the metadata store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


# One row. Every change to keys, models, versions or labels bumps `generation` in the same
# transaction; workers poll it to refresh their in-memory view (DESIGN §2). Taking this row's
# lock first also serializes writers, which keeps version numbers gapless.
state = Table(
    "state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("description", Text, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # New models refuse unsigned pushes; an admin may turn it off per model (audited).
    Column("require_signature", Boolean, nullable=False, server_default=sa_true()),
    # Set when an admin deleted the model (crypto-shredded every version): the row stays so
    # the name is never reused for something the audit log would confuse with it.
    Column("deleted_at", UTCDateTime, nullable=True),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("format", String(32), nullable=False),
    Column("signature", Text, nullable=False),
    Column("uploaded_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("blob_key", String(128), nullable=False, unique=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("kek_id", String(64), nullable=False),
    # Whether the blob is one file or a directory (a tar), the model file's name as the
    # signed manifest records it, the signer's key fingerprint, the
    # signature bundle itself (checked again at every load), the scanner's report, and the
    # types the scanner approved (skops).
    Column("layout", String(16), nullable=True),
    Column("file_name", String(255), nullable=True),
    Column("signer", String(80), nullable=True),
    Column("bundle", LargeBinary, nullable=True),
    Column("scan_report", Text, nullable=True),
    Column("trusted_types", Text, nullable=True),
    # What the publisher declared about how the version was made (validated JSON, see
    # registry/lineage.py), and when and by whom it was crypto-shredded: a deleted version keeps
    # its row (digest, who pushed it) but its wrapped data key is gone and its blob deleted.
    Column("lineage", Text, nullable=True),
    Column("deleted_at", UTCDateTime, nullable=True),
    Column("deleted_by", String(64), nullable=True),
    UniqueConstraint("model_id", "number", name="uq_versions_model_number"),
)

publishers = Table(
    "publishers",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("fingerprint", String(80), primary_key=True),
    Column("pem", Text, nullable=False),
    Column("added_by", String(64), nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
)

labels = Table(
    "labels",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("name", String(63), primary_key=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(32), nullable=False),
    # JSON list of model names, or NULL for every model.
    Column("models", Text, nullable=True),
    Column("description", Text, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# The tamper-evident audit log (modelkeep.audit). Rows are only ever appended: `seq` counts
# 1, 2, 3... without gaps and each `hash` covers the row and the previous row's hash, so an edit,
# a deletion or an insertion breaks the chain. `details` is canonical JSON text, hashed as stored.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", UTCDateTime, nullable=False, index=True),
    Column("actor", Text, nullable=False, index=True),
    Column("action", String(64), nullable=False),
    Column("target", Text, nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed statements "the chain head at `seq` had `head_hash`": they make truncating the tail of the
# log, or rewriting it wholesale, detectable by anyone holding the public key.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("head_hash", String(64), nullable=False),
    Column("time", UTCDateTime, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(64), nullable=False),
)

# Per-model guard policy (limits, budgets, output hardening, detection) as validated JSON, and the
# keys a detector suspended or throttled on a model until an admin lifts it. Both are read into
# every worker's snapshot, so a block reaches every replica like a revocation does.
model_policies = Table(
    "model_policies",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("policy", Text, nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

key_restrictions = Table(
    "key_restrictions",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("key_id", String(32), primary_key=True),
    # "block": no access to the model; "throttle": its rates are cut.
    Column("kind", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Sampled inference payloads of models whose policy turns capture on (modelkeep.audit.capture).
# `sealed` is the record sealed under its own data key, which the key service wrapped bound to
# (model, id); only metadata needed to list records is in the clear. Rows past `expires_at` are
# purged.
payload_captures = Table(
    "payload_captures",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("principal", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
    Column("input_size", Integer, nullable=False),
    Column("output_size", Integer, nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("kek_id", String(64), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
)

# Idempotency keys of pushes (``Idempotency-Key``), per model and caller, each with the version
# it made, written in the same transaction as that version and forgotten after `expires_at`: a
# retried push gets the version its first attempt made, on any worker or replica, after any
# restart. `request_sha256` fingerprints the request so a reused key is told from a retry.
push_keys = Table(
    "push_keys",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("principal", String(64), primary_key=True),
    Column("idempotency_key", String(128), primary_key=True),
    Column("request_sha256", String(64), nullable=False),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
)

# The leakage report of `modelkeep policy assess` per model version (modelkeep.guard.leakage):
# attack AUCs per output policy, never the rows it was measured on. The latest run replaces
# the previous one; every run is in the audit log.
privacy_reports = Table(
    "privacy_reports",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("report", Text, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)


# Retention rules per model (``modelkeep retention set``): keep only the newest
# ``keep_versions`` versions (labelled ones are never deleted) and captures for at most
# ``capture_days`` days. NULL means no rule. Applied on a schedule by every server; audited.
retention_rules = Table(
    "retention_rules",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("keep_versions", Integer, nullable=True),
    Column("capture_days", Integer, nullable=True),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# -- lifecycle (docs/lifecycle.md): evaluation sets and gates, metrics, protected labels, label
# history, change requests and their approvals. None of it is in the workers' snapshot: only
# management calls read it, so writes that do not move a label leave the change counter alone.

# A model's evaluation set, sealed like a version's blob (its data key wrapped by the key
# service, bound to (model, digest)), and the gates its versions must pass (JSON list of text).
eval_sets = Table(
    "eval_sets",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("summary", Text, nullable=False),
    Column("gates", Text, nullable=False),
    Column("blob_key", String(128), nullable=False, unique=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("kek_id", String(64), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Metrics a version earned on one evaluation set (by its digest). `status`: pending, done, error.
evaluations = Table(
    "evaluations",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("evalset_sha256", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("metrics", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("evaluated_at", UTCDateTime, nullable=False),
)

# Labels that move only through an approved change request.
protected_labels = Table(
    "protected_labels",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("label", String(63), primary_key=True),
    Column("approvals", Integer, nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# The reference distribution of a model's inputs for population drift monitoring
# (modelkeep.guard.drift): per-feature quantiles fitted by `policy calibrate`, with the
# window and thresholds; JSON made by DriftConfig.dumps.
drift_configs = Table(
    "drift_configs",
    metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("config", Text, nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Every move of every label, written in the transaction that moves it. `version` NULL: deleted.
label_history = Table(
    "label_history",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, index=True),
    Column("label", String(63), nullable=False),
    Column("version", Integer, nullable=True),
    Column("previous", Integer, nullable=True),
    Column("kind", String(16), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("change_id", String(32), nullable=True),
    Column("time", UTCDateTime, nullable=False),
)

# A move of a protected label (or a weakening of its protection) waiting for approvals.
# `status`: pending, applied, rejected, expired, failed.
change_requests = Table(
    "change_requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("label", String(63), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("version", Integer, nullable=True),
    Column("previous", Integer, nullable=True),
    Column("new_approvals", Integer, nullable=True),
    Column("approvals_needed", Integer, nullable=False),
    Column("requester", String(64), nullable=False),
    Column("pusher", String(64), nullable=True),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("decided_by", String(64), nullable=True),
    Column("decided_at", UTCDateTime, nullable=True),
)

change_approvals = Table(
    "change_approvals",
    metadata,
    Column("change_id", String(32), ForeignKey("change_requests.id"), primary_key=True),
    Column("key_id", String(64), primary_key=True),
    Column("time", UTCDateTime, nullable=False),
)

# Canary and shadow traffic on a label (docs/lifecycle.md): `mode` canary (a share of the
# label's callers served by `version`) or shadow (a sample of its requests mirrored to `version`
# off the request path). `share`: percent of callers (canary) or of requests (shadow).
# `thresholds`: JSON (service/canary.py). `status`: pending (a change request must approve it),
# active, promoted, aborted, rolled_back or ended; at most one pending or active row per
# (model, label, mode), which the service enforces.
canaries = Table(
    "canaries",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, index=True),
    Column("label", String(63), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("share", Float, nullable=False),
    Column("thresholds", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("change_id", String(32), nullable=True),
    Column("started_by", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_by", String(64), nullable=True),
    Column("ended_at", UTCDateTime, nullable=True),
    Column("reason", Text, nullable=True),
)
