"""Population drift monitoring of each model's inputs: the ``DriftWatch`` part of the service
(the monitor itself is ``guard/drift.py``).

The reference is fitted from the benign rows of ``policy calibrate`` (or given directly to
``configure_drift``); the monitor is fed off the request path and reports here, on its own
thread: gauges for every evaluation, an alert and an audit entry when a model starts or stops
drifting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput, ModelkeepError
from modelkeep.guard.drift import DriftConfig, DriftMonitor, DriftScores
from modelkeep.policy import Action
from modelkeep.service._shared import log, model_target
from modelkeep.service.core import Core

# The detector queue at this many requests means the server is busy: drift sheds first.
_SHED_AT_PENDING = 1024


class DriftWatch:
    """Drift configuration, status and the monitor's reports. The data plane offers each
    call's inputs to ``monitor`` (one cheap call; a lookup when the model is not monitored)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.store = core.store
        self.gate = core.gate
        self.metrics = core.metrics
        self.refresh = core.refresh
        self.record = core.record
        self.alert = core.alert
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        # Fed off the request path, shed before the detectors when the server is busy.
        self.monitor = DriftMonitor(
            self._on_drift, shed=self._drift_busy, on_drop=self.metrics.drift_feed_dropped
        )
        # Drift references follow the snapshot; queued rows are scored before the store closes.
        core.on_refresh(self.configure_drift_monitor)
        core.on_stop(lambda: self.monitor.feed.flush(timeout=5))

    def _drift_busy(self) -> bool:
        return self.gate.feed.pending() >= _SHED_AT_PENDING

    def _on_drift(self, model: str, scores: DriftScores, changed: bool) -> None:
        # On the drift feeder's thread.
        self.metrics.set_drift(
            model=model, psi=scores.psi, ks=scores.ks, drifted=scores.drifted_features
        )
        if not changed:
            return
        details = scores.to_json()
        if scores.drifted:
            log.warning("model %s: input drift (PSI %.3f, KS %.3f)", model, scores.psi, scores.ks)
            self.alert(
                "drift",
                model=model,
                psi=round(scores.psi, 4),
                ks_statistic=round(scores.ks, 4),
                drifted_features=scores.drifted_features,
            )
        try:
            action = "drift.detected" if scores.drifted else "drift.cleared"
            self.record("server", action, model_target(model), "success", details)
        except ModelkeepError as exc:
            log.error("drift event of model %s not audited: %s", model, exc.message)

    def configure_drift_monitor(self) -> None:
        """Hand every model's drift config to the monitor (after each snapshot change)."""
        self.monitor.configure(
            {name: m.drift for name, m in self.core.snapshot.models.items() if m.drift is not None}
        )

    def drift_status(self, principal: Principal, model: str) -> dict[str, Any]:
        """A model's drift settings and latest scores in this worker (None before a window)."""
        self.refresh()
        record = self._model(principal, Action.DRIFT_READ, model)
        config = None if record.drift is None else DriftConfig.loads(record.drift)
        scores = self.monitor.status(record.name)
        return {
            "model": record.name,
            "configured": config is not None,
            "settings": None if config is None else config.settings(),
            "latest": None if scores is None else scores.to_json(),
        }

    def configure_drift(
        self,
        principal: Principal,
        model: str,
        *,
        rows: list[list[float]] | None = None,
        window: int | None = None,
        psi_threshold: float | None = None,
        ks_alpha: float | None = None,
    ) -> dict[str, Any]:
        """Fit the reference from ``rows`` and/or change settings (admin); audited."""
        self.refresh()
        details: dict[str, Any] = {
            "rows": None if rows is None else len(rows),
            "window": window,
            "psi_threshold": psi_threshold,
            "ks_alpha": ks_alpha,
        }
        with self._audited(principal, "drift.configure", model_target(model), details):
            record = self._model(principal, Action.DRIFT_CONFIGURE, model)
            if rows is not None:
                config = DriftConfig.fit(_matrix(rows))
                if record.drift is not None:
                    old = DriftConfig.loads(record.drift)
                    config = config.with_settings(
                        window=old.window, psi_threshold=old.psi_threshold, ks_alpha=old.ks_alpha
                    )
            elif record.drift is not None:
                config = DriftConfig.loads(record.drift)
            else:
                raise InvalidInput(
                    "no drift reference yet: give reference rows, or run `modelkeep policy"
                    " calibrate`"
                )
            config = config.with_settings(
                window=window, psi_threshold=psi_threshold, ks_alpha=ks_alpha
            )
            self.store.set_drift(
                record.name, config.dumps(), actor=principal.key_id, now=self._clock()
            )
        return self.drift_status(principal, model)

    def calibrate_from(self, principal: Principal, model: str, rows: list[list[float]]) -> None:
        """Hook of ``policy calibrate``: the same benign rows become the drift reference."""
        try:
            self.configure_drift(principal, model, rows=rows)
        except InvalidInput as exc:
            log.warning("model %s: no drift reference from calibration: %s", model, exc.message)


def _matrix(rows: list[list[float]]) -> np.ndarray:
    try:
        x = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput("reference rows must be a rectangular list of numbers") from None
    if x.ndim != 2:
        raise InvalidInput("reference rows must be a rectangular list of numbers")
    return x
