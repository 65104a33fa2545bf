"""The lifecycle through the management API (and the CLI) of an in-process server.

Evaluation gates decide what a protected label may point at; a protected label moves only when
a key other than the requester's and the pusher's approves; labels keep their history and roll
back; every step lands in the audit log, which still verifies.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelkeep.api.app import create_app
from modelkeep.audit import KEY_FILE, CheckpointSigner, verify_chain
from modelkeep.bootstrap import init_data_dir
from modelkeep.cli import app as cli_app
from modelkeep.cli._client import ClientOverrides
from modelkeep.errors import IntegrityError
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import LentTransport, SyncAppTransport

MODEL = "iris"
PUSH = f"/api/v1/models/{MODEL}/versions?filename=iris.onnx"
LABEL = f"/api/v1/models/{MODEL}/labels/production"


def noisy_iris_onnx(flip: float) -> bytes:
    """An iris classifier trained with a share ``flip`` of its labels wrong (worse as it grows):
    on all of iris 0 -> accuracy 0.9733, 0.2 -> 0.9467, 0.35 -> 0.72, 0.5 -> 0.4133."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    y = iris.target.copy()
    wrong = np.random.default_rng(1).choice(150, int(150 * flip), replace=False)
    y[wrong] = (y[wrong] + 1) % 3
    classifier = LogisticRegression(max_iter=1000).fit(iris.data, y)
    model: Any = convert_sklearn(
        classifier,
        initial_types=[("input", FloatTensorType([None, 4]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, 3])),
        ],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {
        "good": noisy_iris_onnx(0.0),
        "mid": noisy_iris_onnx(0.2),
        "poor": noisy_iris_onnx(0.35),
        "bad": noisy_iris_onnx(0.5),
    }


def iris_evalset() -> tuple[bytes, np.ndarray]:
    from sklearn.datasets import load_iris

    iris = load_iris()
    inputs = iris.data.astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, inputs=inputs, expected=iris.target.astype(np.int64))
    return buffer.getvalue(), inputs


def app_client(app: Any) -> httpx.Client:
    return httpx.Client(transport=SyncAppTransport(app), base_url="http://127.0.0.1")


@dataclass
class Alerts:
    """Stands in for the webhook alerter: remembers every event it is shown."""

    seen: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def observe(self, kind: str, **fields: object) -> None:
        self.seen.append((kind, fields))

    def close(self, timeout: float) -> None:
        return None

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.seen]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    svc: Service
    http: httpx.Client
    data_dir: Path
    tokens: dict[str, str]
    ids: dict[str, str]
    alerts: Alerts
    clock: Clock

    def as_(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def push(self, who: str, data: bytes) -> int:
        r = self.http.post(
            PUSH,
            content=data,
            headers={**self.as_(who), "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
        number: int = r.json()["version"]
        return number

    def label(self, who: str, version: int, label: str = "production") -> Any:
        path = f"/api/v1/models/{MODEL}/labels/{label}"
        return self.http.put(path, json={"version": version}, headers=self.as_(who))

    def approve(self, who: str, change_id: str) -> Any:
        return self.http.post(f"/api/v1/changes/{change_id}/approve", headers=self.as_(who))

    def labels(self) -> dict[str, int]:
        r = self.http.get(f"/api/v1/models/{MODEL}", headers=self.as_("admin"))
        found: dict[str, int] = r.json()["labels"]
        return found

    def protect(self, approvals: int, label: str = "production") -> Any:
        path = f"/api/v1/models/{MODEL}/protection/{label}"
        return self.http.put(path, json={"approvals": approvals}, headers=self.as_("admin"))

    def set_evalset(self, gates: list[str]) -> Any:
        data, _ = iris_evalset()
        return self.http.put(
            f"/api/v1/models/{MODEL}/eval",
            params=[("gate", g) for g in gates],
            content=data,
            headers={**self.as_("admin"), "Content-Type": "application/octet-stream"},
        )

    def evaluated(self) -> None:
        assert self.svc.evaluations.evaluator.wait(60), "evaluations did not finish"

    def actions(self) -> list[str]:
        return [e.action for e in self.svc.audit.entries()]

    def cli(self, who: str, *args: str, columns: int = 250) -> Any:
        overrides = ClientOverrides(transport=LentTransport(self.http._transport))
        env = {
            "MODELKEEP_TOKEN": self.tokens[who],
            "MODELKEEP_URL": "http://127.0.0.1",
            "COLUMNS": str(columns),
        }
        return CliRunner().invoke(cli_app, list(args), obj=overrides, env=env)


def _world(tmp_path: Path, **settings: Any) -> Iterator[World]:
    init = init_data_dir(tmp_path / "data")
    clock = Clock()
    svc = Service.open(
        Settings(data_dir=tmp_path / "data", access_log=False, **settings), clock=clock
    )
    alerts = Alerts()
    svc.core.alerter = alerts  # type: ignore[assignment]
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, MODEL, require_signature=False)
        tokens = {"admin": init.admin_key}
        ids = {"admin": admin.key_id}
        for name, role in (
            ("publisher", "publisher"),
            ("approver", "approver"),
            ("approver2", "approver"),
            ("consumer", "consumer"),
        ):
            made = svc.create_key(admin, role=role, models=None, expires_at=None)
            tokens[name], ids[name] = made.token, made.record.key_id
        http = app_client(create_app(svc, manage_lifecycle=False))
        try:
            yield World(svc, http, tmp_path / "data", tokens, ids, alerts, clock)
        finally:
            http.close()
    finally:
        svc.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path)


# -- gates ------------------------------------------------------------------------------------


def test_a_version_below_a_gate_cannot_be_under_a_protected_label_and_one_above_can(
    world: World, models: dict[str, bytes]
) -> None:
    assert world.set_evalset(["accuracy>=0.9"]).status_code == 200
    assert world.protect(1).json() == {"model": MODEL, "label": "production", "approvals": 1}
    bad = world.push("publisher", models["bad"])
    good = world.push("publisher", models["good"])
    world.evaluated()

    listed = world.http.get(f"/api/v1/models/{MODEL}/versions", headers=world.as_("consumer"))
    evaluations = {v["version"]: v["evaluation"] for v in listed.json()["versions"]}
    assert (evaluations[bad]["status"], evaluations[bad]["metrics"]["accuracy"]) == (
        "failed",
        0.413333,
    )
    assert (evaluations[good]["status"], evaluations[good]["metrics"]["accuracy"]) == (
        "passed",
        0.973333,
    )

    refused = world.label("publisher", bad)
    assert refused.status_code == 409
    assert refused.json()["error"] == (
        f"version {bad} may not be under protected label 'production': gate accuracy>=0.9 "
        "failed: accuracy is 0.4133, 0.4867 below the required 0.9000"
    )
    assert refused.json()["gates"][0]["passed"] is False

    opened = world.label("publisher", good)
    assert opened.status_code == 202, opened.text
    assert "production" not in world.labels()
    applied = world.approve("approver", opened.json()["id"])
    assert (applied.status_code, applied.json()["status"]) == (200, "applied")
    assert world.labels()["production"] == good


def test_a_version_not_yet_evaluated_is_refused_until_it_passes(
    world: World, models: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    world.set_evalset(["accuracy>=0.9"])
    world.protect(1)
    monkeypatch.setattr(world.svc.evaluations.evaluator, "submit", lambda model, number: True)
    number = world.push("publisher", models["good"])
    refused = world.label("publisher", number)
    assert refused.status_code == 409
    assert (
        "gate accuracy>=0.9 not decided: the version has not been evaluated"
        in (refused.json()["error"])
    )
    monkeypatch.undo()
    ran = world.http.post(
        f"/api/v1/models/{MODEL}/versions/{number}/evaluate", headers=world.as_("publisher")
    )
    assert ran.status_code == 202
    world.evaluated()
    assert world.label("publisher", number).status_code == 202


def test_no_worse_than_production_compares_with_the_version_under_production(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=production-0.01"])
    world.protect(1)
    poor = world.push("publisher", models["poor"])  # 0.72
    good = world.push("publisher", models["good"])  # 0.9733
    mid = world.push("publisher", models["mid"])  # 0.9467
    world.evaluated()
    # Nothing is under production yet: nothing to be worse than.
    world.approve("approver", world.label("publisher", poor).json()["id"])
    assert world.label("admin", good, label="staging").status_code == 200
    # mid is worse than staging (and than the newest good version), but not than production.
    opened = world.label("publisher", mid)
    assert opened.status_code == 202, opened.text
    world.approve("approver", opened.json()["id"])
    assert world.labels()["production"] == mid
    # Now production is mid: poor is 0.2267 below it.
    refused = world.label("publisher", poor)
    assert refused.status_code == 409
    gate = refused.json()["gates"][0]
    assert (gate["value"], gate["required"]) == (0.72, pytest.approx(0.946667 - 0.01))
    assert "(production)" in gate["reason"]


def test_evaluation_sets_are_sealed_at_rest_and_every_read_is_audited(
    world: World, models: dict[str, bytes]
) -> None:
    data, inputs = iris_evalset()
    assert world.set_evalset(["accuracy>=0.9"]).status_code == 200
    number = world.push("publisher", models["good"])
    world.evaluated()
    needles = [data[:64], data[-64:], inputs.tobytes()[:48], inputs.tobytes()[-48:], b"inputs.npy"]
    for root, _, files in os.walk(world.data_dir):
        for name in files:
            content = (Path(root) / name).read_bytes()
            for needle in needles:
                assert needle not in content, f"plaintext of the evaluation set in {name}"
    reads = list(world.svc.audit.entries(action="evalset.read"))
    assert [(e.actor, e.outcome, e.details["purpose"]) for e in reads] == [
        ("server", "success", f"evaluate version {number}")
    ]
    shown = world.http.get(f"/api/v1/models/{MODEL}/eval", headers=world.as_("consumer")).json()
    assert shown["evalset"]["rows"] == 150
    assert "inputs" not in shown["evalset"]


# -- two-person rule --------------------------------------------------------------------------


def test_the_requester_the_pusher_and_an_admin_alone_never_complete_a_protected_move(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    two = world.push("publisher", models["mid"])
    three = world.push("admin", models["poor"])
    assert world.label("admin", one).status_code == 200
    world.protect(1)

    # The publisher's request: neither the publisher (requester and pusher) nor the admin
    # who created the publisher's key may approve it.
    by_publisher = world.label("publisher", two).json()["id"]
    assert world.approve("publisher", by_publisher).status_code == 403
    assert world.approve("admin", by_publisher).status_code == 403
    # The admin's own request: not by the admin, the pusher, or a key the admin mints now.
    by_admin = world.label("admin", three).json()["id"]
    assert world.approve("admin", by_admin).status_code == 403
    sock = world.http.post(
        "/api/v1/keys", json={"role": "approver"}, headers=world.as_("admin")
    ).json()
    world.tokens["sock"] = sock["key"]
    assert world.approve("sock", by_admin).status_code == 403
    # Nor through the command line...
    cli = world.cli("admin", "changes", "approve", by_admin)
    assert cli.exit_code != 0
    assert "cannot be approved by the key that made it" in cli.output
    cli = world.cli("admin", "label", "set", MODEL, "production", str(two))
    assert cli.exit_code == 0
    assert "change request" in cli.output
    # ...nor by rollback, deleting the label or removing its protection.
    rollback = world.http.post(f"{LABEL}/rollback", json={}, headers=world.as_("admin"))
    assert rollback.status_code == 409  # no earlier version yet; protected moves only pending
    deleted = world.http.delete(LABEL, headers=world.as_("admin"))
    assert deleted.status_code == 409
    unprotect = world.protect(0)
    assert unprotect.status_code == 202
    assert world.approve("admin", unprotect.json()["id"]).status_code == 403
    assert world.labels()["production"] == one
    assert world.svc.protections(
        world.svc.authenticate(f"Bearer {world.tokens['admin']}"), MODEL
    ) == {"production": 1}
    # A real second person completes the publisher's request.
    done = world.approve("approver", by_publisher)
    assert (done.status_code, done.json()["status"]) == (200, "applied")
    assert world.labels()["production"] == two
    # The approver's key was made by the admin: it cannot approve the admin's request either.
    assert world.approve("approver", by_admin).status_code == 403
    assert world.labels()["production"] == two


def test_a_request_whose_label_moved_meanwhile_fails(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    two = world.push("publisher", models["mid"])
    world.protect(1)
    first = world.label("publisher", one).json()["id"]
    second = world.label("publisher", two).json()["id"]
    assert world.approve("approver", first).json()["status"] == "applied"
    stale = world.approve("approver2", second)
    assert stale.status_code == 409
    assert "moved since the request was made" in stale.json()["error"]
    assert world.labels()["production"] == one
    shown = world.http.get(f"/api/v1/changes/{second}", headers=world.as_("admin")).json()
    assert shown["status"] == "failed"


def test_two_approvals_means_two_different_keys(world: World, models: dict[str, bytes]) -> None:
    one = world.push("publisher", models["good"])
    world.protect(2)
    change = world.label("publisher", one).json()
    assert change["approvals_needed"] == 2
    assert world.approve("approver", change["id"]).json()["status"] == "pending"
    again = world.approve("approver", change["id"])
    assert (again.status_code, again.json()["error"]) == (
        409,
        "this key has already approved the change request",
    )
    assert "production" not in world.labels()
    assert world.approve("approver2", change["id"]).json()["status"] == "applied"
    assert world.labels()["production"] == one


def test_consumers_may_not_approve_and_approvers_may_not_move_labels(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    world.protect(1)
    change = world.label("publisher", one).json()["id"]
    assert world.approve("consumer", change).status_code == 403
    assert world.label("approver", one).status_code == 403
    assert world.protect(1).status_code == 200
    protect_as_publisher = world.http.put(
        f"/api/v1/models/{MODEL}/protection/production",
        json={"approvals": 0},
        headers=world.as_("publisher"),
    )
    assert protect_as_publisher.status_code == 403


def test_rejection_and_expiry_close_a_request(world: World, models: dict[str, bytes]) -> None:
    one = world.push("publisher", models["good"])
    world.protect(1)
    rejected = world.label("publisher", one).json()["id"]
    no_reason = world.http.post(
        f"/api/v1/changes/{rejected}/reject", json={"reason": ""}, headers=world.as_("approver")
    )
    assert no_reason.status_code == 400
    r = world.http.post(
        f"/api/v1/changes/{rejected}/reject",
        json={"reason": "holdout f1 dropped"},
        headers=world.as_("approver"),
    )
    assert (r.json()["status"], r.json()["reason"]) == ("rejected", "holdout f1 dropped")
    assert world.approve("approver2", rejected).status_code == 409

    expiring = world.label("publisher", one).json()["id"]
    world.clock.now += timedelta(hours=24, seconds=1)
    late = world.approve("approver", expiring)
    assert (late.status_code, late.json()["error"]) == (
        409,
        "the change request is expired, not pending",
    )
    listed = world.http.get("/api/v1/changes", headers=world.as_("approver")).json()["changes"]
    assert {c["id"]: c["status"] for c in listed} == {rejected: "rejected", expiring: "expired"}
    assert "production" not in world.labels()
    decided = [f for kind, f in world.alerts.seen if kind == "change_decided"]
    assert [f["status"] for f in decided] == ["rejected", "expired"]
    assert world.alerts.kinds().count("change_requested") == 2


def test_the_requester_may_withdraw_but_other_publishers_may_not_reject(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    world.protect(1)
    change = world.label("publisher", one).json()["id"]
    other = world.http.post(
        "/api/v1/keys", json={"role": "publisher"}, headers=world.as_("admin")
    ).json()
    world.tokens["other"] = other["key"]
    body = {"reason": "no"}
    path = f"/api/v1/changes/{change}/reject"
    assert world.http.post(path, json=body, headers=world.as_("other")).status_code == 403
    withdrawn = world.http.post(path, json=body, headers=world.as_("publisher"))
    assert withdrawn.json()["status"] == "rejected"


# -- rollback and history -----------------------------------------------------------------------


def test_rollback_needs_one_approval_or_an_admins_declared_emergency(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    two = world.push("publisher", models["mid"])
    three = world.push("publisher", models["poor"])
    for number in (one, two, three):
        assert world.label("admin", number).status_code == 200
    world.protect(2)
    # One approval is enough for a rollback, even where a move needs two.
    change = world.http.post(f"{LABEL}/rollback", json={}, headers=world.as_("publisher"))
    assert (change.status_code, change.json()["approvals_needed"]) == (202, 1)
    assert change.json()["version"] == two
    assert world.approve("publisher", change.json()["id"]).status_code == 403
    assert world.approve("approver", change.json()["id"]).json()["status"] == "applied"
    assert world.labels()["production"] == two
    # A publisher cannot declare an emergency; an admin can, and it is audited and alerted.
    refused = world.http.post(
        f"{LABEL}/rollback", json={"emergency": True}, headers=world.as_("publisher")
    )
    assert refused.status_code == 403
    cli = world.cli("admin", "label", "rollback", MODEL, "production", "--emergency")
    assert cli.exit_code == 0, cli.output
    assert world.labels()["production"] == one
    emergency = [
        e for e in world.svc.audit.entries(action="label.rollback") if e.details.get("emergency")
    ]
    assert [(e.outcome, e.details["version"], e.details["previous"]) for e in emergency] == [
        ("denied", one, two),
        ("success", one, two),
    ]
    assert ("emergency_change", one) in [(kind, f.get("version")) for kind, f in world.alerts.seen]
    history = world.http.get(
        f"/api/v1/models/{MODEL}/history?label=production", headers=world.as_("consumer")
    ).json()["history"]
    assert [(m["version"], m["previous"], m["kind"]) for m in history] == [
        (one, None, "set"),
        (two, one, "set"),
        (three, two, "set"),
        (two, three, "rollback"),
        (one, two, "emergency"),
    ]
    assert history[3]["change_id"] == change.json()["id"]
    # Nothing earlier is left to roll back to.
    nothing = world.http.post(
        f"{LABEL}/rollback", json={"emergency": True}, headers=world.as_("admin")
    )
    assert nothing.status_code == 409


def test_an_unprotected_label_rolls_back_at_once(world: World, models: dict[str, bytes]) -> None:
    one = world.push("publisher", models["good"])
    two = world.push("publisher", models["mid"])
    world.label("publisher", one, label="staging")
    world.label("publisher", two, label="staging")
    r = world.http.post(
        f"/api/v1/models/{MODEL}/labels/staging/rollback", headers=world.as_("publisher")
    )
    assert (r.status_code, r.json()) == (200, {"model": MODEL, "label": "staging", "version": one})
    assert world.labels()["staging"] == one


# -- audit ----------------------------------------------------------------------------------------


def test_every_step_is_audited_and_the_log_still_verifies(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=0.5"])
    one = world.push("publisher", models["good"])
    two = world.push("publisher", models["mid"])
    world.evaluated()
    world.label("admin", one)
    world.protect(1)
    change = world.label("publisher", two).json()["id"]
    world.approve("publisher", change)
    world.approve("approver", change)
    world.http.post(f"{LABEL}/rollback", json={"emergency": True}, headers=world.as_("admin"))
    rejected = world.label("publisher", two).json()["id"]
    world.http.post(
        f"/api/v1/changes/{rejected}/reject", json={"reason": "no"}, headers=world.as_("approver")
    )
    world.label("publisher", two)
    world.clock.now += timedelta(days=2)
    world.http.get("/api/v1/changes", headers=world.as_("admin"))

    actions = world.actions()
    for action in (
        "eval.set",
        "evalset.read",
        "version.evaluate",
        "label.set",
        "label.protect",
        "change.request",
        "change.approve",
        "change.apply",
        "label.rollback",
        "change.reject",
        "change.expire",
    ):
        assert action in actions, action
    denied = [e for e in world.svc.audit.entries(action="change.approve") if e.outcome == "denied"]
    assert [e.actor for e in denied] == [world.ids["publisher"]]
    signer = CheckpointSigner.load(world.data_dir / KEY_FILE)
    world.svc.audit.checkpoint()
    result = verify_chain(world.svc.store.engine, signer.public_key)
    assert result.ok, result.problem


# -- hostile input --------------------------------------------------------------------------------


def test_hostile_evaluation_sets_and_gates_are_clear_4xx(tmp_path: Path) -> None:
    for world in _world(tmp_path, max_evalset_bytes=20_000):
        path = f"/api/v1/models/{MODEL}/eval"
        octet = {**world.as_("admin"), "Content-Type": "application/octet-stream"}
        pickled = io.BytesIO()
        np.savez(pickled, inputs=np.array([{"x": 1}], dtype=object), expected=np.array([1]))
        big = io.BytesIO()
        np.savez(big, inputs=np.ones((1000, 4)), expected=np.ones(1000))
        cases = [
            (b"definitely not a zip", [], 400, "not an .npz file"),
            (b"PK\x03\x04" + os.urandom(100), [], 400, "not an .npz file"),
            (pickled.getvalue(), [], 400, "could not be read"),
            (big.getvalue(), [], 413, "larger than the limit of 20000 bytes"),
            (iris_evalset()[0][:100], [], 400, "not an .npz file"),
        ]
        for body, gates, status, message in cases:
            r = world.http.put(
                path, content=body, params=[("gate", g) for g in gates], headers=octet
            )
            assert r.status_code == status, r.text
            assert message in r.json()["error"]
            assert "Traceback" not in r.text
            assert str(world.data_dir) not in r.text
        small = io.BytesIO()
        np.savez(small, inputs=np.ones((5, 4), np.float32), expected=np.arange(5) % 3)
        for gate, message in (
            ("accuracy>0.9", "a gate is METRIC>=NUMBER"),
            ("precision>=0.5", "unknown metric"),
            ("rmse>=0.1", "lower rmse is better"),
        ):
            r = world.http.put(path, content=small.getvalue(), params={"gate": gate}, headers=octet)
            assert (r.status_code, message in r.json()["error"]) == (400, True), r.text
        gates = world.http.put(
            f"{path}/gates", json={"gates": ["accuracy>=0.9"]}, headers=world.as_("admin")
        )
        assert gates.status_code == 400  # no set yet
        as_consumer = world.http.put(
            path,
            content=small.getvalue(),
            headers={**world.as_("consumer"), **{"Content-Type": "application/octet-stream"}},
        )
        assert as_consumer.status_code == 403
        bad_id = world.approve("approver", "../../etc/passwd")
        assert bad_id.status_code == 404
        bad_status = world.http.get("/api/v1/changes?status=nope", headers=world.as_("admin"))
        assert bad_status.status_code == 400
        assert not list(world.svc.registry.blobs.keys())  # nothing refused was stored


def test_versions_ls_and_eval_show_on_the_command_line(
    world: World, models: dict[str, bytes], tmp_path: Path
) -> None:
    data, _ = iris_evalset()
    (tmp_path / "eval.npz").write_bytes(data)
    done = world.cli(
        "admin",
        "eval",
        "set",
        MODEL,
        "--data",
        str(tmp_path / "eval.npz"),
        "--gate",
        "accuracy>=0.9",
    )
    assert done.exit_code == 0, done.output
    assert "150 rows (classification)" in done.output
    world.push("publisher", models["bad"])
    world.evaluated()
    listed = world.cli("publisher", "versions", "ls", MODEL, columns=120)
    assert listed.output.splitlines()[0].split()[-1] == "EVAL"
    assert listed.output.splitlines()[1].split()[-1] == "failed"
    shown = world.cli("publisher", "eval", "show", MODEL, "1")
    assert "accuracy>=0.9: accuracy is 0.4133, 0.4867 below the required 0.9000" in shown.output
    protect = world.cli("admin", "label", "protect", MODEL, "production", "--approvals", "1")
    assert "needs 1 approval(s)" in protect.output
    ls = world.cli("approver", "changes", "ls")
    assert (ls.exit_code, "no change requests" in ls.output) == (0, True)


# -- authorization --------------------------------------------------------------------------------

# One row per lifecycle route; columns: admin, publisher, approver, consumer. A request that
# is authorized may still fail on its merits (400, 404, 409): what matters is 403 or not.
ROUTES = """
PUT    /api/v1/models/iris/eval/gates                   400 403 403 403
GET    /api/v1/models/iris/eval                         200 200 200 200
POST   /api/v1/models/iris/versions/1/evaluate          404 404 403 403
GET    /api/v1/models/iris/protection                   200 200 200 200
PUT    /api/v1/models/iris/protection/staging           200 403 403 403
GET    /api/v1/models/iris/history                      200 200 200 200
POST   /api/v1/models/iris/labels/nothing/rollback      404 404 403 403
GET    /api/v1/changes                                  200 200 200 200
"""


def test_lifecycle_routes_are_authorized_by_role(world: World, models: dict[str, bytes]) -> None:
    world.push("publisher", models["good"])
    bodies = {
        "/api/v1/models/iris/eval/gates": {"gates": ["accuracy>=0.9"]},
        "/api/v1/models/iris/protection/staging": {"approvals": 1},
    }
    found = []
    expected = []
    for line in ROUTES.strip().splitlines():
        method, path, *statuses = line.split()
        for who, status in zip(
            ("admin", "publisher", "approver", "consumer"), statuses, strict=True
        ):
            r = world.http.request(method, path, json=bodies.get(path), headers=world.as_(who))
            found.append((method, path, who, r.status_code))
            expected.append((method, path, who, int(status)))
            if r.status_code >= 400:
                assert list(r.json()) == ["error"]
    assert found == expected


def test_label_history_on_the_command_line(world: World, models: dict[str, bytes]) -> None:
    one = world.push("publisher", models["good"])
    world.label("publisher", one, label="staging")
    shown = world.cli("consumer", "label", "history", MODEL)
    assert shown.exit_code == 0, shown.output
    assert "staging" in shown.output
    one_label = world.cli("consumer", "label", "history", MODEL, "production")
    assert "no label moves recorded" in one_label.output


def test_a_set_that_does_not_fit_the_model_is_an_error_and_blocks_the_label(
    world: World, models: dict[str, bytes]
) -> None:
    misfit = io.BytesIO()
    np.savez(misfit, inputs=np.ones((10, 3), np.float32), expected=np.arange(10) % 3)
    r = world.http.put(
        f"/api/v1/models/{MODEL}/eval",
        params={"gate": "accuracy>=0.5"},
        content=misfit.getvalue(),
        headers={**world.as_("admin"), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    world.protect(1)
    number = world.push("publisher", models["good"])
    world.evaluated()
    shown = world.http.get(
        f"/api/v1/models/{MODEL}/eval?version={number}", headers=world.as_("publisher")
    ).json()["versions"][0]
    assert (shown["status"], shown["error"]) == (
        "error",
        "'inputs' has shape [10, 3]; the model's input 'input' takes [-1, 4]",
    )
    assert world.label("publisher", number).status_code == 409
    failures = [
        e for e in world.svc.audit.entries(action="version.evaluate") if e.outcome == "failure"
    ]
    assert [e.details["version"] for e in failures] == [number]


def test_a_kek_rotation_rewraps_the_evaluation_set_too(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=0.9"])
    number = world.push("publisher", models["good"])
    world.evaluated()
    admin = world.svc.authenticate(f"Bearer {world.tokens['admin']}")
    new_key = world.svc.kek_rotate(admin)
    assert world.svc.evaluations.lifecycle.evalset_keys()[0][3] != new_key
    done = world.svc.kek_rewrap(admin)
    assert done.after is None
    assert world.svc.evaluations.lifecycle.evalset_keys()[0][3] == new_key
    rewraps = list(world.svc.audit.entries(action="kek.rewrap"))
    assert rewraps[-1].details["evalsets"] == [MODEL]
    again = world.svc.evaluations.evaluate_now(MODEL, number, force=True)
    assert again is not None
    assert again.metrics == {
        "accuracy": 0.973333,
        "f1": 0.973323,
        "auc": pytest.approx(0.998, abs=0.002),
    }


def test_concurrent_last_approvals_apply_the_change_once(
    world: World, models: dict[str, bytes]
) -> None:
    one = world.push("publisher", models["good"])
    world.protect(2)
    # A third approver, so that two approvals can race to be the last one.
    third = world.http.post(
        "/api/v1/keys", json={"role": "approver"}, headers=world.as_("admin")
    ).json()
    world.tokens["approver3"] = third["key"]
    change = world.label("publisher", one).json()["id"]
    assert world.approve("approver", change).status_code == 200
    principals = [
        world.svc.authenticate(f"Bearer {world.tokens[who]}") for who in ("approver2", "approver3")
    ]
    results: list[str] = []
    barrier = threading.Barrier(2)

    def approve(index: int) -> None:
        barrier.wait()
        try:
            results.append(world.svc.approve_change(principals[index], change).status)
        except Exception as exc:  # recorded, asserted below
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) in (["applied", "applied"], ["Conflict", "applied"])
    moves = [
        m
        for m in world.svc.evaluations.lifecycle.history(MODEL, "production")
        if m.change_id == change
    ]
    assert len(moves) == 1
    assert world.labels()["production"] == one


def test_a_tampered_evaluation_set_is_refused_audited_and_alerted(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=0.9"])
    number = world.push("publisher", models["good"])
    world.evaluated()
    stored = world.svc.evaluations.lifecycle.evalset(MODEL)
    assert stored is not None
    [blob] = [p for p in (world.data_dir / "blobs").rglob(stored.blob_key) if p.is_file()]
    sealed = bytearray(blob.read_bytes())
    sealed[len(sealed) // 2] ^= 1
    blob.write_bytes(bytes(sealed))
    with pytest.raises(IntegrityError):
        world.svc.evaluations.evaluate_now(MODEL, number, force=True)
    failed = [e for e in world.svc.audit.entries(action="evalset.read") if e.outcome == "failure"]
    assert len(failed) == 1
    assert ("tampering", MODEL) in [(kind, f.get("model")) for kind, f in world.alerts.seen]


# -- with crypto-shredding and bills of materials (lifecycle2) -------------------------------


def test_the_bom_shows_the_servers_metrics_and_the_approvals_of_a_promoted_version(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=0.9"])
    world.protect(1)
    good = world.push("publisher", models["good"])
    world.evaluated()
    change = world.label("publisher", good).json()["id"]
    world.approve("approver", change)
    bom = world.http.get(
        f"/api/v1/models/{MODEL}/versions/{good}/bom", headers=world.as_("consumer")
    )
    assert bom.status_code == 200, bom.text
    props: dict[str, list[str]] = {}
    for p in bom.json()["metadata"]["component"]["properties"]:
        props.setdefault(p["name"], []).append(p["value"])
    assert props["modelkeep:metric:accuracy"] == ["0.973333"]
    card = bom.json()["metadata"]["component"]["modelCard"]
    assert {"type": "accuracy", "value": "0.973333"} in card["quantitativeAnalysis"][
        "performanceMetrics"
    ]
    [approval] = [json.loads(v) for v in props["modelkeep:approval"]]
    assert approval["change"] == change
    assert (approval["label"], approval["requester"]) == ("production", world.ids["publisher"])
    assert approval["approvers"] == [world.ids["approver"]]


def test_a_version_a_pending_change_request_targets_is_not_deleted(
    world: World, models: dict[str, bytes]
) -> None:
    world.set_evalset(["accuracy>=0.9"])
    world.protect(1)
    good = world.push("publisher", models["good"])
    world.evaluated()
    change = world.label("publisher", good).json()["id"]
    path = f"/api/v1/models/{MODEL}/versions/{good}"
    refused = world.http.delete(path, headers=world.as_("admin"))
    assert refused.status_code == 409
    assert change in refused.json()["error"]
    rejected = world.http.post(
        f"/api/v1/changes/{change}/reject", json={"reason": "no"}, headers=world.as_("approver")
    )
    assert rejected.status_code == 200, rejected.text
    deleted = world.http.delete(path, headers=world.as_("admin"))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted_at"] is not None


def test_deleting_a_model_removes_its_lifecycle_records_and_shreds_its_evaluation_set(
    world: World, models: dict[str, bytes]
) -> None:
    import sqlalchemy as sa

    from modelkeep.store import schema as t

    world.set_evalset(["accuracy>=0.9"])
    world.protect(1)
    good = world.push("publisher", models["good"])
    world.evaluated()
    world.approve("approver", world.label("publisher", good).json()["id"])
    assert world.protect(0).status_code == 202  # a second request, left pending
    stored = world.svc.evaluations.lifecycle.evalset(MODEL)
    assert stored is not None
    assert stored.blob_key in set(world.svc.registry.blobs.keys())

    deleted = world.http.delete(f"/api/v1/models/{MODEL}", headers=world.as_("admin"))
    assert deleted.status_code == 200, deleted.text
    tables = (
        t.eval_sets,
        t.evaluations,
        t.protected_labels,
        t.label_history,
        t.change_requests,
        t.change_approvals,
    )
    with world.svc.store.engine.connect() as conn:
        counts = {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            for table in tables
        }
    assert counts == {table.name: 0 for table in tables}
    assert stored.blob_key not in set(world.svc.registry.blobs.keys())
    [entry] = world.svc.audit.entries(action="model.delete")
    assert entry.details["evalset_sha256"] == stored.sha256
