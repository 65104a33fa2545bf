"""Guard policy administration: policies, calibration, leakage assessment, blocks, budgets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput
from modelkeep.guard.gate import calibrate
from modelkeep.guard.hardening import score_outputs_of
from modelkeep.guard.leakage import assess
from modelkeep.guard.policy import ModelPolicy
from modelkeep.policy import Action
from modelkeep.registry.records import ModelRecord
from modelkeep.runtime.signature import numpy_dtype
from modelkeep.service._shared import model_target
from modelkeep.service.core import Core, resolve_version


class GuardAdmin:
    """Admin calls that tune a model's guard: policies, calibration, assessment, blocks."""

    def __init__(
        self,
        core: Core,
        *,
        on_calibrated: Callable[[Principal, str, list[list[float]]], None] | None = None,
    ) -> None:
        # Called after ``calibrate_policy`` with the same benign rows (the drift reference).
        self._on_calibrated = on_calibrated
        self.store = core.store
        self.gate = core.gate
        self.refresh = core.refresh
        self._model = core.authorized_model
        self._session = core.session
        self._audited = core.audited
        self._clock = core.clock

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
        """Set the PRADA threshold, the near-copy bucket width and the OOD reference from benign
        rows run through the default version.

        The rows are split among simulated benign callers; the threshold sits below the lowest
        Shapiro-Wilk W any of them reaches (``calibrate_prada``).
        """
        self.refresh()
        details: dict[str, Any] = {"rows": len(rows)}
        with self._audited(principal, "policy.calibrate", model_target(model), details):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            found = resolve_version(record, None)
            policy = self.gate.policy(record.name, record.policy)
            threshold, width, reference = calibrate(self._session(found), found.signature, rows)
            details.update(prada_threshold=threshold, nearcopy_width=width)
            updated = policy.updated(
                prada_threshold=threshold, nearcopy_width=width, ood_reference=reference.to_json()
            )
            self.store.set_policy(model, updated.dumps(), actor=principal.key_id, now=self._clock())
        if self._on_calibrated is not None:
            self._on_calibrated(principal, model, rows)
        self.refresh()
        return updated

    def assess_policy(
        self,
        principal: Principal,
        model: str,
        version: str | None,
        data: dict[str, np.ndarray],
        *,
        target_auc: float,
        apply: bool,
    ) -> dict[str, Any]:
        """Measure membership leakage of a version under each candidate output policy.

        ``data`` holds ``members_X``, ``members_y``, ``non_members_X``, ``non_members_y``; the
        rows are used in memory only. The report (AUCs, never rows) is kept with the version
        and audited; with ``apply`` the recommended output policy is set (audited as
        ``policy.set`` too).
        """
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "policy.assess", model_target(model), details):
            record = self._model(principal, Action.MODEL_CONFIGURE, model)
            found = resolve_version(record, version)
            details["version"] = found.number
            x, y, is_member = _assessment_rows(data, found.signature)
            scores = score_outputs_of(found.signature)
            if not scores:
                raise InvalidInput("the model has no class-score output to assess")
            outputs = self._session(found).run({found.signature.inputs[0].name: x}, None)
            report = assess(outputs, scores[0], y, is_member, target_auc=target_auc)
            shown = {"model": record.name, "version": found.number, **report.to_json()}
            details.update(recommended=report.recommended, target_met=report.target_met)
            self.store.save_privacy_report(
                record.name,
                found.number,
                json.dumps(shown, sort_keys=True),
                actor=principal.key_id,
                now=self._clock(),
            )
        if apply:
            policy = self.gate.policy(record.name, record.policy)
            self.set_policy(principal, model, {**policy.to_json(), "output": report.recommended})
            shown["applied"] = True
        self.refresh()
        return shown

    def privacy_report(
        self, principal: Principal, model: str, version: str | None
    ) -> dict[str, Any] | None:
        """The kept leakage report of a version, or None when it was never assessed."""
        self.refresh()
        record = self._model(principal, Action.POLICY_READ, model)
        found = resolve_version(record, version)
        return self.store.privacy_report(record.name, found.number)

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


_ARRAYS = ("members_X", "members_y", "non_members_X", "non_members_y")


def _assessment_rows(
    data: dict[str, np.ndarray], signature: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members and non-members as one input matrix, class indices and a member mask."""
    if set(data) != set(_ARRAYS):
        raise InvalidInput(f"the assessment data holds exactly: {', '.join(_ARRAYS)}")
    if len(signature.inputs) != 1:
        raise InvalidInput("assessment needs a model with exactly one input")
    spec = signature.inputs[0]
    parts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for side in ("members", "non_members"):
        x, y = data[f"{side}_X"], data[f"{side}_y"]
        if x.dtype.kind not in "biuf" or x.ndim < 2 or len(x) == 0:
            raise InvalidInput(f"{side} X must be a non-empty numeric array of rows")
        if y.dtype.kind not in "biu" or y.shape != (len(x),):
            raise InvalidInput(f"{side} y must hold one integer class index per row of X")
        expected = tuple(d for d in spec.shape[1:])
        if len(expected) != x.ndim - 1 or any(
            d not in (-1, got) for d, got in zip(expected, x.shape[1:], strict=True)
        ):
            raise InvalidInput(f"{side} X rows do not match the model's input shape")
        if not np.all(np.isfinite(x.astype(np.float64))):
            raise InvalidInput(f"{side} X holds non-finite values")
        parts.append(x.astype(numpy_dtype(spec.datatype)))
        labels.append(y.astype(np.int64))
    is_member = np.concatenate([np.ones(len(parts[0]), bool), np.zeros(len(parts[1]), bool)])
    return np.concatenate(parts), np.concatenate(labels), is_member
