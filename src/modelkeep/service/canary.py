"""Canary and shadow traffic on labels, and their automatic rollback (``Canaries``).

``start_canary`` sends a share of a label's callers (sticky per caller) to another version;
``start_shadow`` mirrors a sample of a label's requests to another version off the request path.
Routing and counting live in the data plane (``_canary_watch.py``); this part starts, promotes,
aborts and reports them, and withdraws a canary whose error rate, latency or agreement with the
primary crosses the thresholds set with it (checked on the poller, off the request path): the
canary ends, an alert is raised and the event is audited with the numbers.

On a protected label a canary starts, and is promoted, only through a change request approved
like a label move (the canary's version must pass the label's gates); aborting one, and the
automatic rollback, return to the approved version and are always allowed. A shadow never
changes an answer, so it needs no approval.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import replace
from typing import Any

from modelkeep.auth import Principal
from modelkeep.errors import Conflict, InvalidInput, ModelkeepError, NotFound
from modelkeep.lifecycle.canary import Thresholds, WindowStats, check_share, crossed
from modelkeep.lifecycle.changes import new_change_id
from modelkeep.policy import Action
from modelkeep.registry.canaries import CanaryStore
from modelkeep.registry.records import Canary, ModelRecord, check_name
from modelkeep.service._canary_watch import Experiment, Watches
from modelkeep.service._shared import log, model_target
from modelkeep.service.changes import Changes
from modelkeep.service.core import Core, resolve_version
from modelkeep.store.metadata import ChangeRequest

__all__ = ["Canaries"]

_MODES = ("canary", "shadow")
# Canaries are judged at most this often (the poller runs every refresh interval, 0.25 s by
# default; judging reads up to the last 20,000 runs of each canary).
_CHECK_EVERY_S = 1.0


class Canaries:
    """Start, promote, abort and report canaries and shadows; withdraw failing canaries."""

    def __init__(self, core: Core, changes: Changes, watches: Watches) -> None:
        self.core = core
        self.changes = changes
        self.watches = watches
        self.store = CanaryStore(core.store)
        self.refresh = core.refresh
        self.record = core.record
        self.alert = core.alert
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        # Numbers of ended canaries are dropped; failing canaries are withdrawn after each poll.
        core.on_refresh(self._forget_ended)
        core.on_poll(self._check_quietly)
        self._checked = 0.0

    # -- starting ------------------------------------------------------------------------

    def start_canary(
        self,
        principal: Principal,
        model: str,
        label: str,
        version: int,
        share: float,
        thresholds: Thresholds,
    ) -> tuple[Canary, ChangeRequest | None]:
        """Serve ``share`` percent of ``label``'s callers from ``version``; audited.

        On a protected label the canary waits for an approved change request (returned).
        """
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "version": version, "share": share}
        change = None
        with self._audited(principal, "canary.start", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            current = self._primary(record, label)
            check_share(share, "the canary share")
            found = resolve_version(record, version)
            if found.number == current:
                raise Conflict(f"label '{label}' already points at version {found.number}")
            details["thresholds"] = thresholds.dumps()
            status = "active"
            if self.changes.protected(record.name, label):
                self.changes.require_gates(record, found.number, label)
                change = self.changes.open_change(principal, record, label, "canary", found.number)
                details["change"] = change.id
                status = "pending"
            canary = self._new(principal, record, label, "canary", found.number, share)
            canary = _with(canary, thresholds=thresholds.dumps(), status=status, change=change)
            self.store.start(canary)
            details["canary"] = canary.id
        self.refresh()
        if change is not None:
            self.changes.announce(change)
        return canary, change

    def start_shadow(
        self, principal: Principal, model: str, label: str, version: int, sample: float
    ) -> Canary:
        """Mirror ``sample`` percent of ``label``'s requests to ``version``; audited. Its
        answers are compared and never returned, so no approval is needed."""
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "version": version, "sample": sample}
        with self._audited(principal, "shadow.start", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            current = self._primary(record, label)
            check_share(sample, "the shadow sample")
            found = resolve_version(record, version)
            if found.number == current:
                raise Conflict(f"label '{label}' already points at version {found.number}")
            shadow = self._new(principal, record, label, "shadow", found.number, sample)
            self.store.start(shadow)
            details["canary"] = shadow.id
        self.refresh()
        return shadow

    def _primary(self, record: ModelRecord, label: str) -> int:
        check_name("label", label)
        current = record.labels.get(label)
        if current is None:
            raise NotFound(
                f"model '{record.name}' has no label '{label}': set it first (the canary's"
                " callers are the label's)"
            )
        return current

    def _new(
        self,
        principal: Principal,
        record: ModelRecord,
        label: str,
        mode: str,
        version: int,
        share: float,
    ) -> Canary:
        return Canary(
            id=new_change_id(),
            model=record.name,
            label=label,
            mode=mode,
            version=version,
            share=share,
            thresholds=Thresholds().dumps(),
            status="active",
            change_id=None,
            started_by=principal.key_id,
            started_at=self._clock(),
        )

    # -- promoting and aborting ----------------------------------------------------------

    def promote(
        self, principal: Principal, model: str, label: str
    ) -> tuple[int, ChangeRequest | None]:
        """Point ``label`` at its canary's version, ending the canary; audited. A protected
        label opens a change request for the move instead (returned)."""
        self.refresh()
        details: dict[str, Any] = {"label": label[:63]}
        change = None
        with self._audited(principal, "canary.promote", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            check_name("label", label)
            canary = self.store.live(record.name, label, "canary")
            if canary is None or canary.status != "active":
                raise NotFound(f"label '{label}' of model '{record.name}' has no active canary")
            details.update(version=canary.version, canary=canary.id)
            if self.changes.protected(record.name, label):
                change = self.changes.protected_move(principal, record.name, label, canary.version)
                if change is not None:
                    details["change"] = change.id
            if change is None:
                self.store.promote(record.name, label, by=principal.key_id, now=self._clock())
        self.refresh()
        return canary.version, change

    def abort(self, principal: Principal, model: str, label: str, mode: str = "canary") -> Canary:
        """End ``label``'s canary (or shadow): its callers return to the label's version at
        once. Always allowed to whoever may move the label, protected or not; audited."""
        self.refresh()
        details: dict[str, Any] = {"label": label[:63], "mode": mode}
        with self._audited(principal, f"{mode}.abort", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            check_name("label", label)
            if mode not in _MODES:
                raise InvalidInput("mode is canary or shadow")
            ended = self.store.end(
                record.name, label, mode, status="aborted", by=principal.key_id, now=self._clock()
            )
            if ended is None:
                raise NotFound(f"label '{label}' of model '{record.name}' has no {mode}")
            details.update(version=ended.version, canary=ended.id)
            if ended.change_id is not None and ended.status == "pending":
                self.changes.lifecycle.decide(
                    ended.change_id,
                    "rejected",
                    by=principal.key_id,
                    now=self._clock(),
                    reason="the canary was aborted",
                )
        self.refresh()
        return ended

    # -- status --------------------------------------------------------------------------

    def status(
        self, principal: Principal, model: str, label: str | None = None
    ) -> list[dict[str, Any]]:
        """``model``'s live canaries and shadows and those that ended last, newest first, with
        this replica's numbers for the live ones."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        if label is not None:
            check_name("label", label)
        rows = [c for c in self.store.of_model(record.name) if label in (None, c.label)]
        return [self._status(c) for c in rows]

    def _status(self, canary: Canary) -> dict[str, Any]:
        thresholds = Thresholds.loads(canary.thresholds)
        status = canary.status
        if status == "pending" and canary.change_id is not None:
            # Its change request was rejected, expired or failed: it never starts.
            with suppress(NotFound):
                decided = self.changes.lifecycle.change(canary.change_id).status
                status = status if decided == "pending" else decided
        since = time.monotonic() - thresholds.window_s
        versions: list[dict[str, Any]] = []
        shed = 0
        for experiment in self.watches.of(canary.id):
            shed += experiment.shed
            for arm, number in (
                (experiment.primary, experiment.primary_version),
                (experiment.candidate, canary.version),
            ):
                window = arm.window(since)
                versions.append(
                    {
                        "version": number,
                        "role": arm.role,
                        "requests": arm.requests,
                        "errors": arm.errors,
                        **_window_out(window),
                    }
                )
        return {
            "id": canary.id,
            "model": canary.model,
            "label": canary.label,
            "mode": canary.mode,
            "version": canary.version,
            "share": canary.share,
            "thresholds": {
                "max_error_rate": thresholds.max_error_rate,
                "max_p99_ms": thresholds.max_p99_ms,
                "min_agreement": thresholds.min_agreement,
                "min_requests": thresholds.min_requests,
                "window_s": thresholds.window_s,
            },
            "status": status,
            "change_id": canary.change_id,
            "started_by": canary.started_by,
            "started_at": canary.started_at,
            "ended_by": canary.ended_by,
            "ended_at": canary.ended_at,
            "reason": canary.reason,
            "shed": shed,
            "versions": versions,
        }

    # -- automatic rollback (on the poller) ----------------------------------------------

    def check(self) -> list[str]:
        """Withdraw every active canary whose numbers in this replica crossed a threshold;
        returns the ids withdrawn."""
        withdrawn = []
        for record in list(self.core.snapshot.models.values()):
            for canary in list(record.canaries.values()):
                for experiment in self.watches.of(canary.id):
                    stats = experiment.candidate.window(
                        time.monotonic() - experiment.thresholds.window_s
                    )
                    reason = crossed(stats, experiment.thresholds)
                    if reason is not None and self._roll_back(experiment, stats, reason):
                        withdrawn.append(canary.id)
                        break
        return withdrawn

    def _check_quietly(self) -> None:
        now = time.monotonic()
        if now - self._checked < _CHECK_EVERY_S:
            return
        self._checked = now
        try:
            self.check()
        except ModelkeepError as exc:
            log.error("canary check failed: %s", exc.message)

    def _roll_back(self, experiment: Experiment, stats: WindowStats, reason: str) -> bool:
        canary = experiment.record
        ended = self.store.end(
            canary.model,
            canary.label,
            "canary",
            status="rolled_back",
            by="server",
            now=self._clock(),
            reason=reason,
            only_id=canary.id,
        )
        if ended is None:
            return False  # another replica (or a person) ended it first
        self.refresh()
        numbers = {
            "label": canary.label,
            "version": canary.version,
            "primary": experiment.primary_version,
            "canary": canary.id,
            "reason": reason,
            **_window_out(stats),
        }
        log.warning(
            "canary of model %s label %s (version %s) rolled back: %s",
            canary.model,
            canary.label,
            canary.version,
            reason,
        )
        self.alert("canary_rollback", model=canary.model, **numbers)
        self.record("server", "canary.rollback", model_target(canary.model), "success", numbers)
        return True

    def _forget_ended(self) -> None:
        live: set[str] = set()
        for record in self.core.snapshot.models.values():
            live.update(c.id for c in record.canaries.values())
            live.update(c.id for c in record.shadows.values())
        self.watches.forget(live)


def _window_out(stats: WindowStats) -> dict[str, Any]:
    return {
        "window_requests": stats.requests,
        "window_errors": stats.errors,
        "error_rate": None if stats.error_rate is None else round(stats.error_rate, 6),
        "p50_ms": _ms(stats.p50_ms),
        "p95_ms": _ms(stats.p95_ms),
        "p99_ms": _ms(stats.p99_ms),
        "agreement": None if stats.agreement is None else round(stats.agreement, 6),
        "compared": stats.compared,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _with(canary: Canary, *, thresholds: str, status: str, change: ChangeRequest | None) -> Canary:
    return replace(
        canary,
        thresholds=thresholds,
        status=status,
        change_id=None if change is None else change.id,
    )
