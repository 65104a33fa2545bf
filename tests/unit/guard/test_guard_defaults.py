"""Defaults that hold: a model with no policy gets the measured default guard policy; admins see
full outputs, consumers only the top-1 class, with its label always the model's own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_iris

from modelkeep.api.policy import policy_out
from modelkeep.api.v2.infer import v2_call
from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.guard.policy import DEFAULT_POLICY, ModelPolicy
from modelkeep.service import Budget, Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx

ROWS = 3000
BATCH = 500


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Principal, Principal]]:
    init = init_data_dir(tmp_path / "data")
    svc = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, "iris", require_signature=False)
        svc.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
        created = svc.create_key(admin, role="consumer", models=["iris"], expires_at=None)
        yield svc, admin, svc.authenticate(f"Bearer {created.token}")
    finally:
        svc.stop()


def infer(
    svc: Service, principal: Principal, rows: np.ndarray
) -> tuple[dict[str, np.ndarray], Budget | None]:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": rows.ravel().tolist(),
                }
            ]
        }
    ).encode()
    result = svc.dataplane.infer_now(principal, "iris", v2_call(body))
    return result.outputs, result.budget


def test_a_new_model_gets_the_defaults_and_the_api_says_so(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, admin, _ = service
    policy, record = svc.get_policy(admin, "iris")
    assert record.policy is None
    assert policy == DEFAULT_POLICY
    shown = policy_out("iris", policy, record)
    assert shown["default"] is True
    assert (shown["output"], shown["output_for"], shown["on_alarm"]) == (
        "confidence=1",
        {"admin": "full"},
        "alert",
    )
    assert shown["detect"] == ["nearcopy", "ood", "prada"]
    assert shown["limits"] == {"rate": "100/second", "budget": "100000/day"}


def test_admin_sees_full_outputs_and_consumer_only_what_the_default_allows_on_thousands_of_rows(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, admin, consumer = service
    rng = np.random.default_rng(0)
    # Spread over and beyond iris's ranges, so that many rows are close calls between classes.
    rows = rng.uniform([4.0, 2.0, 1.0, 0.1], [8.0, 4.5, 7.0, 2.5], size=(ROWS, 4)).astype(
        np.float32
    )
    for start in range(0, ROWS, BATCH):
        batch = rows[start : start + BATCH]
        full, _ = infer(svc, admin, batch)
        shown, budget = infer(svc, consumer, batch)
        # Admin: the model's own probabilities (rows of a distribution, not one-hot).
        assert np.allclose(full["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        assert np.count_nonzero(full["probabilities"], axis=1).max() > 1
        # Consumer: one class per row, at 1.0; its label and top-1 are the model's.
        scores = shown["probabilities"]
        assert (np.count_nonzero(scores, axis=1) == 1).all()
        assert set(np.unique(scores).tolist()) <= {0.0, 1.0}
        assert np.array_equal(shown["label"], full["label"])
        assert np.array_equal(np.argmax(scores, axis=1), np.argmax(full["probabilities"], axis=1))
        # Every key has a daily row budget.
        assert budget is not None
        assert budget.limit == 100000
    assert budget.remaining == 100000 - ROWS


def test_output_full_is_one_change_kept_with_the_other_defaults_and_audited(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, admin, consumer = service
    current, _ = svc.get_policy(admin, "iris")
    svc.set_policy(admin, "iris", {**current.to_json(), "output": "full"})
    policy, record = svc.get_policy(admin, "iris")
    assert record.policy is not None
    assert policy_out("iris", policy, record)["default"] is False
    assert policy == DEFAULT_POLICY.updated(output="full")
    shown, _ = infer(svc, consumer, np.array([[5.9, 3.0, 4.2, 1.5]], np.float32))
    assert np.count_nonzero(shown["probabilities"]) == 3
    assert svc.audit_entries(admin, action="policy.set")[0].details["policy"]["output"] == "full"


def test_an_explicit_policy_is_kept_as_written() -> None:
    explicit = ModelPolicy.loads(json.dumps({"output": "full", "detect": []}))
    assert (str(explicit.output), explicit.detect, explicit.limited) == ("full", frozenset(), False)
    assert ModelPolicy.loads(None) is DEFAULT_POLICY
    assert ModelPolicy.loads(DEFAULT_POLICY.dumps()) == DEFAULT_POLICY


def test_a_batch_of_zero_rows_under_the_defaults_is_answered(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, _, consumer = service
    shown, budget = infer(svc, consumer, np.zeros((0, 4), np.float32))
    assert shown["probabilities"].shape == (0, 3)
    assert budget is not None
    assert budget.remaining == 100000


def test_calibration_fits_the_near_copy_width_of_dense_low_dimensional_data(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, admin, _ = service
    rows = np.random.default_rng(4).permutation(np.tile(load_iris().data, (4, 1)))
    policy = svc.calibrate_policy(admin, "iris", rows.tolist())
    # Natural iris rows are near-copies at the default width of 0.2; calibration narrows it.
    assert policy.nearcopy_width is not None
    assert policy.nearcopy_width < 0.2
    assert "nearcopy" in policy.detect  # the rest of the defaults are kept
    entry = svc.audit_entries(admin, action="policy.calibrate")[0]
    assert entry.details["nearcopy_width"] == policy.nearcopy_width


def test_under_the_defaults_an_extraction_walk_is_alarmed_and_audited_off_the_request_path(
    service: tuple[Service, Principal, Principal],
) -> None:
    svc, _, consumer = service
    # A fixed-step walk, one row a request: PRADA's least normal stream.
    for step in range(80):
        infer(svc, consumer, np.array([[5.0, 3.0, 1.5, 0.2]], np.float32) + 0.01 * step)
    assert svc.gate.feed.flush(timeout=30.0)
    alarms = list(svc.audit.entries(action="detector.alarm", model="iris"))
    assert alarms, "no detector alarm was audited"
    assert alarms[0].actor == consumer.key_id
    assert alarms[0].details["detector"] == "prada"
    assert alarms[0].details["action"] == "alert"
