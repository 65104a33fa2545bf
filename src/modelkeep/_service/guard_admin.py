"""Guard policy administration, audit reading and verification, metrics exposition."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from modelkeep._service._base import ServiceBase, model_target
from modelkeep.audit import KEY_FILE as AUDIT_KEY_FILE
from modelkeep.audit import AuditEntry, VerifyResult, public_key_path, verify_chain
from modelkeep.audit import load_public_key as load_audit_public_key
from modelkeep.auth import Principal
from modelkeep.guard.gate import calibrate
from modelkeep.guard.policy import ModelPolicy
from modelkeep.policy import Action
from modelkeep.registry.records import ModelRecord


class GuardAdminMixin(ServiceBase):
    """Auditor and admin calls of ``Service`` that read the audit trail or tune the guard."""

    # -- audit ---------------------------------------------------------------------------

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

    # -- guard policy --------------------------------------------------------------------

    def get_policy(self, principal: Principal, model: str) -> tuple[ModelPolicy, ModelRecord]:
        self.refresh()
        record = self._model(principal, Action.POLICY_READ, model)
        return self.gate.policy(record.name, record.policy), record

    def set_policy(self, principal: Principal, model: str, policy: dict[str, Any]) -> ModelPolicy:
        """Replace a model's guard policy (validated first); audited."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "policy.set", model_target(model), details):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            parsed = ModelPolicy.from_json(policy)
            shown = parsed.to_json()
            shown.pop("ood_reference", None)
            details["policy"] = shown
            self.store.set_policy(model, parsed.dumps(), actor=principal.key_id, now=self._clock())
        self.refresh()
        return parsed

    def calibrate_policy(
        self, principal: Principal, model: str, rows: list[list[float]]
    ) -> ModelPolicy:
        """Set the PRADA threshold and the OOD reference from benign rows of the default version.

        The rows are split among simulated benign callers; the threshold sits below the lowest
        Shapiro-Wilk W any of them reaches (``calibrate_prada``).
        """
        self.refresh()
        details: dict[str, Any] = {"rows": len(rows)}
        with self._audited(principal, "policy.calibrate", model_target(model), details):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            found = self._version(record, None)
            policy = self.gate.policy(record.name, record.policy)
            threshold, reference = calibrate(self._session(found), found.signature, rows)
            details["prada_threshold"] = threshold
            updated = policy.updated(prada_threshold=threshold, ood_reference=reference.to_json())
            self.store.set_policy(model, updated.dumps(), actor=principal.key_id, now=self._clock())
        self.refresh()
        return updated

    def unblock(self, principal: Principal, model: str, key_id: str) -> None:
        """Lift a detector's block or throttle of ``key_id`` on ``model``; audited."""
        self.refresh()
        with self._audited(principal, "policy.unblock", model_target(model), {"key": key_id[:32]}):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            self.store.lift_restriction(model, key_id)
            self.gate.reset(key_id, model, list(record.versions))
        self.refresh()

    def reset_budget(self, principal: Principal, model: str, key_id: str) -> None:
        self.refresh()
        with self._audited(principal, "budget.reset", model_target(model), {"key": key_id[:32]}):
            self._model(principal, Action.MODEL_CONFIGURE, model)
            self.gate.admission.reset_budget(key_id, model)
