"""Population drift: shifted inputs raise the gauge and the alert, unshifted ones do not; the
monitor is fed off the request path and sheds under load."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from conftest import Env
from modelkeep.api.v2.infer import v2_call
from modelkeep.errors import Forbidden, InvalidInput
from modelkeep.guard.drift import DriftConfig, DriftMonitor, DriftScores, score
from modelkeep.testing import build_iris_onnx, iris_rows

MEAN = np.array([5.8, 3.0, 3.7, 1.2])
SPREAD = np.array([0.8, 0.4, 1.7, 0.7])


def rows(n: int, *, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(MEAN + shift * SPREAD, SPREAD, size=(n, 4))).astype(np.float32)


def infer_body(batch: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ]
        }
    ).encode()


class RecordingAlerter:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def observe(self, kind: str, **fields: Any) -> list[object]:
        self.events.append((kind, fields))
        return []

    def close(self, timeout: float = 0) -> None:
        pass


def gauge(env: Env, name: str) -> float | None:
    return env.service.metrics.registry.get_sample_value(name, {"model": "iris"})


def send(env: Env, data: np.ndarray) -> None:
    consumer = env.key("consumer")[0]
    for start in range(0, len(data), 25):
        env.service.dataplane.infer_now(
            consumer, "iris", v2_call(infer_body(data[start : start + 25])), None
        )
    assert env.service.drift.monitor.feed.flush(timeout=20)


@pytest.fixture
def monitored(env: Env) -> tuple[Env, RecordingAlerter]:
    svc = env.service
    svc.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    svc.configure_drift(env.admin, "iris", rows=rows(2000, seed=0).tolist(), window=200)
    alerter = RecordingAlerter()
    svc.core.alerter = alerter  # type: ignore[assignment]
    return env, alerter


def test_unshifted_inputs_raise_neither_gauge_nor_alert(
    monitored: tuple[Env, RecordingAlerter],
) -> None:
    env, alerter = monitored
    send(env, rows(400, seed=1))
    psi = gauge(env, "modelkeep_drift_psi")
    assert psi is not None
    assert psi < 0.1
    assert gauge(env, "modelkeep_drift_features_drifted") == 0
    assert alerter.events == []
    status = env.service.drift_status(env.admin, "iris")
    assert status["latest"]["drifted"] is False
    assert list(env.service.audit.entries(action="drift.detected")) == []


def test_shifted_inputs_raise_the_gauge_the_alert_and_an_audit_entry(
    monitored: tuple[Env, RecordingAlerter],
) -> None:
    env, alerter = monitored
    send(env, rows(200, seed=2))
    assert alerter.events == []
    send(env, rows(400, seed=3, shift=1.5))
    psi = gauge(env, "modelkeep_drift_psi")
    assert psi is not None
    assert psi > 0.25
    assert (gauge(env, "modelkeep_drift_features_drifted") or 0) >= 1
    assert [kind for kind, _ in alerter.events] == ["drift"]  # once, on the crossing
    assert alerter.events[0][1]["model"] == "iris"
    [entry] = env.service.audit.entries(action="drift.detected")
    assert entry.details["drifted"] is True
    # Back to normal: cleared (audited), no second alert.
    send(env, rows(400, seed=4))
    assert [e.action for e in env.service.audit.entries(action="drift.cleared")] == [
        "drift.cleared"
    ]
    assert len(alerter.events) == 1


def test_policy_calibrate_fits_the_drift_reference(env: Env) -> None:
    svc = env.service
    svc.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    svc.calibrate_policy(env.admin, "iris", iris_rows(400))
    settings = svc.drift_status(env.admin, "iris")["settings"]
    assert (settings["features"], settings["reference_rows"]) == (4, 400)


def test_bad_drift_settings_and_roles_are_refused(env: Env) -> None:
    svc = env.service
    svc.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    with pytest.raises(InvalidInput, match="no drift reference"):
        svc.configure_drift(env.admin, "iris", window=100)
    with pytest.raises(InvalidInput, match="at least 50"):
        svc.configure_drift(env.admin, "iris", rows=[[1.0, 2.0]] * 10)
    with pytest.raises(InvalidInput, match="rectangular"):
        svc.configure_drift(env.admin, "iris", rows=[[1.0, 2.0], [1.0]])
    reference = rows(100, seed=0).tolist()
    for bad in (
        {"window": 10},
        {"psi_threshold": -1.0},
        {"ks_alpha": 2.0},
        {"psi_threshold": float("nan")},
    ):
        with pytest.raises(InvalidInput):
            svc.configure_drift(env.admin, "iris", rows=reference, **bad)  # type: ignore[arg-type]
    consumer = env.key("consumer")[0]
    with pytest.raises(Forbidden):
        svc.drift_status(consumer, "iris")
    publisher = env.key("publisher", ["iris"])[0]
    with pytest.raises(Forbidden):
        svc.configure_drift(publisher, "iris", rows=reference)
    assert svc.drift_status(publisher, "iris")["configured"] is False


def test_the_monitor_sheds_when_busy_and_ignores_unmonitored_models() -> None:
    seen: list[DriftScores] = []
    dropped: list[int] = []
    busy = [False]
    monitor = DriftMonitor(
        lambda _m, s, _c: seen.append(s), shed=lambda: busy[0], on_drop=lambda: dropped.append(1)
    )
    config = DriftConfig.fit(rows(500, seed=0)).with_settings(window=100)
    monitor.configure({"m": config.dumps()})
    monitor.offer("unmonitored", {"x": rows(10, seed=1)})
    assert monitor.feed.pending() == 0
    busy[0] = True
    monitor.offer("m", {"x": rows(10, seed=1)})
    assert (monitor.feed.pending(), len(dropped)) == (0, 1)
    busy[0] = False
    for seed in range(5):
        monitor.offer("m", {"x": rows(20, seed=seed)})
    monitor.feed.drain()
    assert seen
    assert not seen[-1].drifted


def test_scores_separate_same_and_shifted_distributions() -> None:
    config = DriftConfig.fit(rows(2000, seed=0))
    same = score(config, rows(500, seed=9).astype(np.float64))
    shifted = score(config, rows(500, seed=9, shift=1.0).astype(np.float64))
    assert (same.drifted, shifted.drifted) == (False, True)
    assert same.psi < 0.1 < 0.25 < shifted.psi
    assert shifted.drifted_features == 4
