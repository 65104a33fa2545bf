"""Reading the audit trail: entries, verification of the chain, metrics exposition."""

from __future__ import annotations

from datetime import datetime

from modelkeep.audit import KEY_FILE as AUDIT_KEY_FILE
from modelkeep.audit import AuditEntry, VerifyResult, public_key_path, verify_chain
from modelkeep.audit import load_public_key as load_audit_public_key
from modelkeep.auth import Principal
from modelkeep.policy import Action
from modelkeep.service.core import Core


class AuditReader:
    """Auditor and admin calls that read the audit trail and the metrics."""

    def __init__(self, core: Core) -> None:
        self.settings = core.settings
        self.store = core.store
        self.audit = core.audit
        self.metrics = core.metrics
        self.authorizer = core.authorizer

    def audit_entries(
        self,
        principal: Principal,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Audit entries matching the filters, newest first (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        return list(
            self.audit.entries(
                since=since,
                until=until,
                actor=actor,
                action=action,
                model=model,
                limit=limit,
                newest_first=True,
            )
        )

    def metrics_exposition(self, principal: Principal) -> tuple[bytes, str]:
        """Prometheus text exposition (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        return self.metrics.render()

    def audit_verify(self, principal: Principal) -> VerifyResult:
        """Verify the whole chain and its signed checkpoints (auditors and admins)."""
        self.authorizer.check(principal, Action.AUDIT_READ)
        public_key = None
        if self.settings.data_dir is not None:
            public_key = load_audit_public_key(
                public_key_path(self.settings.data_dir / AUDIT_KEY_FILE)
            )
        return verify_chain(self.store.engine, public_key)
