"""`policy assess`: membership attacks without shadow models, per output policy, computed
right (scikit-learn agrees), run in process against a served version, kept and audited."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, roc_curve

from modelkeep.api.app import create_app
from modelkeep.api.policy import _read_npz
from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.errors import Forbidden, InvalidInput, TooLarge
from modelkeep.guard.leakage import (
    CANDIDATES,
    attack_scores,
    membership_auc,
    tpr_at_fpr,
    true_class_phi,
)
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.service import Service
from modelkeep.settings import Settings


def sklearn_tpr_at_1pct(members: np.ndarray, non_members: np.ndarray) -> float:
    truth = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    fpr, tpr, _ = roc_curve(truth, np.r_[members, non_members])
    return float(np.max(tpr[fpr <= 0.01]))


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_tpr_match_scikit_learn(ties: bool) -> None:
    rng = np.random.default_rng(0)
    members, non_members = rng.normal(0.4, 1.0, 700), rng.normal(0.0, 1.0, 900)
    if ties:
        members, non_members = np.round(members, 1), np.round(non_members, 1)
    truth = np.r_[np.ones(700), np.zeros(900)]
    assert membership_auc(members, non_members) == pytest.approx(
        roc_auc_score(truth, np.r_[members, non_members]), abs=1e-12
    )
    assert tpr_at_fpr(members, non_members) == pytest.approx(
        sklearn_tpr_at_1pct(members, non_members), abs=1e-12
    )


# -- a model that leaks by construction ----------------------------------------------------


def leaky_world() -> tuple[bytes, dict[str, np.ndarray]]:
    """A random forest of unpruned trees on noisy labels: it memorises its training rows (score
    near 1 on their recorded class), and is unsure on fresh rows."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1200, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    flipped = rng.random(len(y)) < 0.25
    y[flipped] = rng.integers(0, 4, int(flipped.sum()))
    forest = RandomForestClassifier(n_estimators=25, random_state=0).fit(x[:600], y[:600])
    onnx: Any = convert_sklearn(
        forest,
        initial_types=[("input", FloatTensorType([None, 8]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, 4])),
        ],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    data = {
        "members_X": x[:600],
        "members_y": y[:600],
        "non_members_X": x[600:],
        "non_members_y": y[600:],
    }
    return bytes(onnx.SerializeToString()), data


@pytest.fixture(scope="module")
def leaky() -> tuple[bytes, dict[str, np.ndarray]]:
    return leaky_world()


@pytest.fixture
def service(
    tmp_path: Path, leaky: tuple[bytes, dict[str, np.ndarray]]
) -> Iterator[tuple[Service, Principal]]:
    init = init_data_dir(tmp_path / "data")
    svc = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, "leaky", require_signature=False)
        svc.push(admin, "leaky", leaky[0], file_name="leaky.onnx")
        yield svc, admin
    finally:
        svc.stop()


def test_assess_reports_high_auc_under_full_and_less_under_the_recommended_policy(
    service: tuple[Service, Principal], leaky: tuple[bytes, dict[str, np.ndarray]]
) -> None:
    svc, admin = service
    report = svc.assess_policy(admin, "leaky", None, dict(leaky[1]), target_auc=0.70, apply=False)
    by_policy = {row["policy"]: row for row in report["policies"]}
    assert list(by_policy) == list(CANDIDATES)
    assert by_policy["full"]["auc"] > 0.85
    recommended = by_policy[report["recommended"]]
    assert report["target_met"] is True
    assert recommended["auc"] <= 0.70 < by_policy["full"]["auc"]
    # The least restrictive under the target: every policy before it is over the target.
    before = list(CANDIDATES)[: list(CANDIDATES).index(report["recommended"])]
    assert all(by_policy[p]["auc"] > 0.70 for p in before)
    assert all(row["top1_agreement"] == 1.0 for row in report["policies"])
    # Kept with the version, without the rows; and audited.
    kept = svc.privacy_report(admin, "leaky", "1")
    assert kept is not None
    assert (kept["recommended"], kept["version"], kept["created_by"]) == (
        report["recommended"],
        1,
        admin.key_id,
    )
    assert "members_X" not in json.dumps(kept)
    entries = svc.audit_entries(admin, action="policy.assess")
    assert entries[0].details["recommended"] == report["recommended"]


def test_the_reported_auc_is_scikit_learns_on_the_same_scores(
    service: tuple[Service, Principal], leaky: tuple[bytes, dict[str, np.ndarray]]
) -> None:
    svc, admin = service
    data = leaky[1]
    report = svc.assess_policy(admin, "leaky", "1", dict(data), target_auc=0.6, apply=False)
    full = report["policies"][0]
    # The same scores, computed here from the model's own outputs.
    model = OnnxModel.load(leaky[0])
    x = np.concatenate([data["members_X"], data["non_members_X"]])
    y = np.concatenate([data["members_y"], data["non_members_y"]])
    outputs = model.run({"input": x})
    phi = true_class_phi(outputs, "probabilities", y, np.argmax(outputs["probabilities"], axis=1))
    member = np.arange(len(y)) < 600
    truth = np.r_[np.ones(600), np.zeros(600)]
    aucs = {
        name: roc_auc_score(truth, np.r_[m, n])
        for name, (m, n) in attack_scores(phi[member], y[member], phi[~member], y[~member]).items()
    }
    assert full["attack"] == max(aucs, key=lambda name: aucs[name])
    assert full["auc"] == pytest.approx(max(aucs.values()), abs=1e-4)


def test_apply_sets_the_recommended_output_and_keeps_the_rest(
    service: tuple[Service, Principal], leaky: tuple[bytes, dict[str, np.ndarray]]
) -> None:
    svc, admin = service
    report = svc.assess_policy(admin, "leaky", None, dict(leaky[1]), target_auc=0.7, apply=True)
    policy, record = svc.get_policy(admin, "leaky")
    assert report["applied"] is True
    assert str(policy.output) == report["recommended"]
    assert record.policy is not None  # now an explicit policy
    assert policy.limits.budget == "100000/day"  # the defaults it started from are kept


def test_bad_assessment_data_is_a_clear_400(
    service: tuple[Service, Principal], leaky: tuple[bytes, dict[str, np.ndarray]]
) -> None:
    svc, admin = service
    data = leaky[1]
    for bad, message in (
        ({k: v for k, v in data.items() if k != "members_y"}, "exactly"),
        ({**data, "members_y": data["members_y"][:10]}, "one integer class"),
        ({**data, "members_X": data["members_X"][:, :3]}, "input shape"),
        ({**data, "members_y": data["members_y"] + 7}, "class indices"),
    ):
        with pytest.raises(InvalidInput, match=message):
            svc.assess_policy(admin, "leaky", None, dict(bad), target_auc=0.6, apply=False)
    consumer = svc.authenticate(
        "Bearer " + svc.create_key(admin, role="consumer", models=None, expires_at=None).token
    )
    with pytest.raises(Forbidden):
        svc.assess_policy(consumer, "leaky", None, dict(data), target_auc=0.6, apply=False)


def test_uploaded_npz_is_read_without_pickles_and_size_checked() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(10))
    assert _read_npz(buffer.getvalue(), 100)["a"].tolist() == list(range(10))
    with pytest.raises(TooLarge):
        _read_npz(buffer.getvalue(), 5)
    pickled = io.BytesIO()
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InvalidInput):
        _read_npz(pickled.getvalue(), 100)
    with pytest.raises(InvalidInput):
        _read_npz(b"not a zip", 100)


def test_the_api_takes_an_npz_body_keeps_the_report_and_shows_it(
    service: tuple[Service, Principal], leaky: tuple[bytes, dict[str, np.ndarray]]
) -> None:
    svc, principal = service
    app = create_app(svc, manage_lifecycle=False)
    buffer = io.BytesIO()
    np.savez(buffer, **leaky[1])
    token = svc.create_key(principal, role="admin", models=None, expires_at=None).token
    admin = {"Authorization": f"Bearer {token}"}

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mk.test") as client:
            before = await client.get("/api/v1/models/leaky/versions/1/privacy", headers=admin)
            made = await client.post(
                "/api/v1/models/leaky/policy/assess?target_auc=0.7",
                content=buffer.getvalue(),
                headers={**admin, "Content-Type": "application/octet-stream"},
            )
            kept = await client.get("/api/v1/models/leaky/versions/1/privacy", headers=admin)
            bad = await client.post(
                "/api/v1/models/leaky/policy/assess", content=b"PK junk", headers=admin
            )
            return [before, made, kept, bad]

    before, made, kept, bad = asyncio.run(calls())
    assert (before.status_code, list(before.json())) == (404, ["error"])
    assert made.status_code == 200, made.text
    assert kept.status_code == 200
    assert kept.json()["policies"] == made.json()["policies"]
    assert (bad.status_code, bad.json()) == (
        400,
        {"error": "the body must be an .npz file of numeric arrays"},
    )
