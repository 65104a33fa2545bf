"""Protected labels, change requests and rollback: the two-person rule (``Changes``).

A protected label never moves on one key's word. Moving it (``set_label``), rolling it back or
weakening its protection opens a change request; the request takes effect when enough approvals
have arrived from keys that are neither the requester's nor the pusher's (nor created by or
creating them: ``lifecycle/changes.py``), unless it was rejected or expired first. Gates are
checked when the request is made and again when it is applied. The one exception is a rollback
by an admin who declares an emergency: it happens at once and is audited and alerted as such.
Every step is an audit entry; requests and decisions also raise alerts.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from modelkeep.auth import Principal
from modelkeep.errors import Conflict, Forbidden, InvalidInput, NotFound
from modelkeep.lifecycle.changes import (
    CHANGE_ID,
    MAX_APPROVALS,
    new_change_id,
    refusal_to_approve,
    rollback_target,
)
from modelkeep.lifecycle.gates import GateResult
from modelkeep.policy import Action
from modelkeep.registry.records import ModelRecord, VersionRecord, check_name
from modelkeep.service._shared import model_target
from modelkeep.service.core import Core, resolve_version
from modelkeep.service.evaluation import Evaluations
from modelkeep.store.metadata import ChangeRequest, LabelMove, StaleChange

_MAX_REASON = 500


class GateRefused(Conflict):
    """A version does not (yet) pass the gates a protected label requires."""


class Changes:
    """Protected labels, change requests, approvals and rollback. Gates are decided by
    ``evaluations``; management calls ``protected_move`` and ``refuse_protected_delete``
    where labels move."""

    def __init__(self, core: Core, evaluations: Evaluations) -> None:
        self.core = core
        self.evaluations = evaluations
        self.lifecycle = evaluations.lifecycle
        self.settings = core.settings
        self.store = core.store
        self.authorizer = core.authorizer
        self.refresh = core.refresh
        self.record = core.record
        self.alert = core.alert
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock

    # -- hooks called where labels move (management) -------------------------------------

    def protected_move(
        self, principal: Principal, model: str, label: str, version: int
    ) -> ChangeRequest | None:
        """None if ``label`` is not protected (the caller moves it), else the change request
        opened for the move; refusals (authorization, gates) are audited."""
        self.refresh()
        if not self._is_protected(model, label):
            return None
        details: dict[str, Any] = {"label": label, "version": version, "kind": "set"}
        with self._audited(principal, "change.request", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            found = resolve_version(record, version)
            self._require_gates(record, found.number, label, relative=True)
            change = self._open_change(principal, record, label, "set", found.number)
            details["change"] = change.id
        self._announce(change)
        return change

    def refuse_protected_delete(self, model: str, label: str) -> None:
        """Conflict if ``label`` is protected: deleting it would move the default version."""
        if self._is_protected(model, label):
            raise Conflict(
                f"label '{label}' is protected; remove its protection first "
                f"(modelkeep label protect {model} {label} --approvals 0, which needs approval)"
            )

    def _is_protected(self, model: str, label: str) -> bool:
        return model in self.core.snapshot.models and label in self.lifecycle.protections(model)

    # -- for canaries (service/canary.py), which start and promote through change requests --

    def protected(self, model: str, label: str) -> bool:
        """Whether ``label`` of ``model`` moves only through approved change requests."""
        return self._is_protected(model, label)

    def require_gates(self, record: ModelRecord, number: int, label: str) -> None:
        """GateRefused unless version ``number`` passes ``label``'s gates now."""
        self._require_gates(record, number, label, relative=True)

    def open_change(
        self, principal: Principal, record: ModelRecord, label: str, kind: str, version: int
    ) -> ChangeRequest:
        """Open a change request of ``kind`` (``canary``: start a canary) on ``label``."""
        return self._open_change(principal, record, label, kind, version)

    def announce(self, change: ChangeRequest) -> None:
        self._announce(change)

    # -- evidence for bills of materials ---------------------------------------------------

    def bom_evidence(
        self, version: VersionRecord
    ) -> tuple[Mapping[str, float], list[Mapping[str, Any]]]:
        """The server's metrics of ``version`` on its model's current evaluation set, and the
        approved change requests that moved a label onto it (who requested, who approved)."""
        metrics: Mapping[str, float] = {}
        stored = self.lifecycle.evalset(version.model)
        if stored is not None:
            found = self.lifecycle.evaluations(version.model, stored.sha256).get(version.number)
            if found is not None and found.status == "done" and found.metrics is not None:
                metrics = found.metrics
        approvals: list[Mapping[str, Any]] = [
            {
                "change": c.id,
                "label": c.label,
                "kind": c.kind,
                "requester": c.requester,
                "approvers": sorted(c.approvals),
                "applied_at": c.decided_at,
            }
            for c in reversed(self.lifecycle.changes(status="applied"))
            if c.model == version.model
            and c.version == version.number
            and c.kind not in ("protect", "canary")
        ]
        return metrics, approvals

    # -- protection ----------------------------------------------------------------------

    def protect_label(
        self, principal: Principal, model: str, label: str, approvals: int
    ) -> tuple[int, ChangeRequest | None]:
        """Require ``approvals`` approvals to move ``label``; audited.

        Raising (or first setting) the protection takes effect at once; lowering or removing
        it (``approvals`` 0) opens a change request approved like a move. Returns the
        approvals now required and the request, if one was opened.
        """
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "approvals": approvals}
        change = None
        with self._audited(principal, "label.protect", model_target(model), details):
            record = self._model(principal, Action.LABEL_PROTECT, model)
            check_name("label", label)
            if isinstance(approvals, bool) or not 0 <= approvals <= MAX_APPROVALS:
                raise InvalidInput(f"approvals must be between 0 and {MAX_APPROVALS}")
            current = self.lifecycle.protections(record.name).get(label, 0)
            details["previous"] = current
            if approvals >= current:
                self.lifecycle.protect(
                    record.name, label, approvals, actor=principal.key_id, now=self._clock()
                )
            else:
                change = self._open_change(
                    principal, record, label, "protect", None, new_approvals=approvals
                )
                details["change"] = change.id
        if change is not None:
            self._announce(change)
            return current, change
        return approvals, None

    def protections(self, principal: Principal, model: str) -> dict[str, int]:
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        return self.lifecycle.protections(record.name)

    # -- history and rollback ------------------------------------------------------------

    def label_history(
        self, principal: Principal, model: str, label: str | None = None
    ) -> list[LabelMove]:
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        if label is not None:
            check_name("label", label)
        return self.lifecycle.history(record.name, label)

    def rollback_label(
        self, principal: Principal, model: str, label: str, *, emergency: bool = False
    ) -> tuple[int, ChangeRequest | None]:
        """Move ``label`` back to the version it pointed at before; audited.

        An unprotected label moves at once. A protected one opens a change request that one
        approval completes (its absolute gates still apply), unless an admin declares an
        ``emergency``: then it moves at once, and the audit entry and an alert say so.
        Returns the target version and the request, if one was opened.
        """
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "emergency": emergency}
        change = None
        with self._audited(principal, "label.rollback", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            check_name("label", label)
            current = record.labels.get(label)
            if current is None:
                raise NotFound(f"model '{record.name}' has no label '{label}'")
            moves = self.lifecycle.history(record.name, label)
            target = rollback_target((m.kind, m.version, m.previous) for m in moves)
            if target is None or target not in record.versions:
                raise Conflict(f"label '{label}' has no earlier version to roll back to")
            details.update(version=target, previous=current)
            now = self._clock()
            if emergency:
                self.authorizer.check(principal, Action.LABEL_EMERGENCY, record.name)
                self.lifecycle.move_now(
                    record.name, label, target, actor=principal.key_id, now=now, kind="emergency"
                )
                self.alert(
                    "emergency_change",
                    model=record.name,
                    label=label,
                    version=target,
                    previous=current,
                    principal=principal.key_id,
                )
            elif self._is_protected(record.name, label):
                self._require_gates(record, target, label, relative=False)
                change = self._open_change(principal, record, label, "rollback", target)
                details["change"] = change.id
            else:
                self.store.set_label(
                    record.name, label, target, actor=principal.key_id, now=now, kind="rollback"
                )
        self.refresh()
        if change is not None:
            self._announce(change)
        return target, change

    # -- change requests -----------------------------------------------------------------

    def _open_change(
        self,
        principal: Principal,
        record: ModelRecord,
        label: str,
        kind: str,
        version: int | None,
        *,
        new_approvals: int | None = None,
    ) -> ChangeRequest:
        protection = self.lifecycle.protections(record.name).get(label, 0)
        previous = record.labels.get(label)
        if kind != "protect" and previous == version:
            raise Conflict(f"label '{label}' already points at version {version}")
        now = self._clock()
        change = ChangeRequest(
            id=new_change_id(),
            model=record.name,
            label=label,
            kind=kind,
            version=version,
            previous=previous,
            new_approvals=new_approvals,
            # A rollback is allowed with one approval (docs/lifecycle.md).
            approvals_needed=min(protection, 1) if kind == "rollback" else protection,
            requester=principal.key_id,
            pusher=None if version is None else record.versions[version].uploaded_by,
            status="pending",
            reason=None,
            created_at=now,
            expires_at=now + timedelta(seconds=self.settings.change_request_ttl_s),
            decided_by=None,
            decided_at=None,
        )
        self.lifecycle.add_change(change)
        return change

    def _announce(self, change: ChangeRequest) -> None:
        self.alert(
            "change_requested",
            change=change.id,
            model=change.model,
            label=change.label,
            change_kind=change.kind,
            version=change.version,
            requester=change.requester,
        )

    def _require_gates(
        self, record: ModelRecord, number: int, label: str, *, relative: bool
    ) -> None:
        results = self.evaluations.gate_results(
            record, number, relative=relative, evaluate_references=relative
        )
        failed = [r for r in results if r.passed is not True]
        if failed:
            raise GateRefused(
                _gate_message(number, label, failed),
                details={"gates": [r.to_json() for r in results]},
            )

    def list_changes(
        self, principal: Principal, *, status: str | None = None
    ) -> list[ChangeRequest]:
        """Change requests on models this key may read, newest first; overdue ones expire."""
        self.refresh()
        self.authorizer.check(principal, Action.SERVER_READ)
        if status is not None and status not in _STATUSES:
            raise InvalidInput(f"status is one of: {', '.join(_STATUSES)}")
        self.expire_changes()
        return [
            c
            for c in self.lifecycle.changes(status=status)
            if self.authorizer.is_allowed(principal, Action.MODEL_READ, c.model)
        ]

    def get_change(self, principal: Principal, change_id: str) -> ChangeRequest:
        self.refresh()
        change = self._change(change_id)
        self._model(principal, Action.MODEL_READ, change.model)
        return self.lifecycle.change(change.id)

    def _change(self, change_id: str) -> ChangeRequest:
        if CHANGE_ID.fullmatch(change_id) is None:
            raise NotFound("no such change request")
        change = self.lifecycle.change(change_id)
        if change.status == "pending" and self._clock() >= change.expires_at:
            self._expire(change)
            change = self.lifecycle.change(change_id)
        return change

    def expire_changes(self) -> int:
        """Close every pending request past its time (audited, alerted); returns how many."""
        now = self._clock()
        overdue = [c for c in self.lifecycle.changes(status="pending") if now >= c.expires_at]
        for change in overdue:
            self._expire(change)
        return len(overdue)

    def _expire(self, change: ChangeRequest) -> None:
        if self.lifecycle.decide(change.id, "expired", by="server", now=self._clock()):
            self.record(
                "server",
                "change.expire",
                model_target(change.model),
                "success",
                {"change": change.id, "label": change.label, "approvals": len(change.approvals)},
            )
            self.alert("change_decided", change=change.id, model=change.model, status="expired")

    def approve_change(self, principal: Principal, change_id: str) -> ChangeRequest:
        """Approve a pending request; with enough approvals it is applied. Audited.

        Forbidden for the requester's and the pusher's keys (and keys related to them by
        creation); Conflict when the request is not pending (applied, rejected, expired) or
        can no longer be applied (the label moved, or the version no longer passes its gates).
        """
        self.refresh()
        details: dict[str, Any] = {"change": change_id[:32]}
        with self._audited(principal, "change.approve", f"change:{change_id[:32]}", details):
            change = self._change(change_id)
            details["model"] = change.model
            self._model(principal, Action.CHANGE_APPROVE, change.model)
            if change.status != "pending":
                raise Conflict(f"the change request is {change.status}, not pending")
            refusal = refusal_to_approve(
                principal.key_id, change.requester, change.pusher, self.lifecycle.key_creators()
            )
            if refusal is not None:
                raise Forbidden(refusal)
            count = self.lifecycle.approve(change.id, principal.key_id, now=self._clock())
            details.update(approvals=count, needed=change.approvals_needed)
        if count >= change.approvals_needed:
            try:
                self._apply(principal, change)
            except Conflict:
                # Another approver's call applied it first: this approval counted all the same.
                if self.lifecycle.change(change.id).status != "applied":
                    raise
        return self.lifecycle.change(change.id)

    def _apply(self, principal: Principal, change: ChangeRequest) -> None:
        details: dict[str, Any] = {
            "change": change.id,
            "label": change.label,
            "kind": change.kind,
            "version": change.version,
            "previous": change.previous,
            "requester": change.requester,
        }
        target = model_target(change.model)
        with self._audited(principal, "change.apply", target, details):
            try:
                self._check_still_valid(change)
                self.lifecycle.apply_change(change, by=principal.key_id, now=self._clock())
            except (GateRefused, StaleChange, NotFound) as exc:
                # NotFound: the version is gone (deleted since the request was made).
                reason = (
                    f"label '{change.label}' moved since the request was made"
                    if isinstance(exc, StaleChange)
                    else exc.message
                )
                self.lifecycle.decide(
                    change.id, "failed", by=principal.key_id, now=self._clock(), reason=reason
                )
                self.alert("change_decided", change=change.id, model=change.model, status="failed")
                raise Conflict(f"the change request could not be applied: {reason}") from None
        self.refresh()
        self.alert(
            "change_decided",
            change=change.id,
            model=change.model,
            label=change.label,
            version=change.version,
            status="applied",
        )

    def _check_still_valid(self, change: ChangeRequest) -> None:
        if change.kind == "protect" or change.version is None:
            return
        self.refresh()
        record = self.core.snapshot.models[change.model]
        relative = change.kind in ("set", "canary")
        self._require_gates(record, change.version, change.label, relative=relative)

    def reject_change(self, principal: Principal, change_id: str, reason: str) -> ChangeRequest:
        """Close a pending request unapplied; approvers, admins, or the requester (withdraw)."""
        self.refresh()
        details: dict[str, Any] = {"change": change_id[:32]}
        with self._audited(principal, "change.reject", f"change:{change_id[:32]}", details):
            if not isinstance(reason, str) or not reason.strip() or len(reason) > _MAX_REASON:
                raise InvalidInput(f"give a reason of 1 to {_MAX_REASON} characters")
            change = self._change(change_id)
            details.update(model=change.model, reason=reason)
            if principal.key_id == change.requester:
                self._model(principal, Action.MODEL_READ, change.model)
                details["withdrawn"] = True
            else:
                self._model(principal, Action.CHANGE_APPROVE, change.model)
            if change.status != "pending":
                raise Conflict(f"the change request is {change.status}, not pending")
            if not self.lifecycle.decide(
                change.id, "rejected", by=principal.key_id, now=self._clock(), reason=reason
            ):
                raise Conflict("the change request is no longer pending")
        self.alert("change_decided", change=change.id, model=change.model, status="rejected")
        return self.lifecycle.change(change.id)


_STATUSES = ("pending", "applied", "rejected", "expired", "failed")


def _gate_message(number: int, label: str, failed: list[GateResult]) -> str:
    parts = [
        f"gate {r.gate.text} failed: {r.reason}"
        if r.passed is False
        else f"gate {r.gate.text} not decided: {r.reason}"
        for r in failed
    ]
    return f"version {number} may not be under protected label '{label}': " + "; ".join(parts)
