"""The tamper-evident audit log: hash-chained entries, signed checkpoints, verification.

``AuditLog`` appends events durably and reads them back with filters; ``CheckpointSigner``
signs the chain head; ``verify_chain`` checks the whole log and names the first bad entry.
See ``docs/audit.md``.
"""

from __future__ import annotations

from modelkeep.audit.checkpoint import (
    KEY_FILE,
    Checkpoint,
    CheckpointSigner,
    key_id_for,
    load_public_key,
    public_key_path,
    verify_checkpoint,
)
from modelkeep.audit.log import OUTCOMES, AuditEntry, AuditEvent, AuditLog, utcnow
from modelkeep.audit.verify import VerifyResult, verify_chain

__all__ = [
    "KEY_FILE",
    "OUTCOMES",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "CheckpointSigner",
    "VerifyResult",
    "key_id_for",
    "load_public_key",
    "public_key_path",
    "utcnow",
    "verify_chain",
    "verify_checkpoint",
]
