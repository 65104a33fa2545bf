"""Canary and shadow traffic on labels (docs/lifecycle.md, "Canary and shadow").

A canary serves a share of a label's callers from another version, each caller always the
same one; a shadow mirrors requests to another version off the request path and never answers
from it; a canary whose runs fail past its threshold is withdrawn with an alert and an audit
entry; on a protected label a canary starts and is promoted only with another key's approval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelkeep.api.app import create_app
from modelkeep.api.v2.codec import InferRequest, decode_infer_request
from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.cli import app as cli_app
from modelkeep.cli._client import ClientOverrides
from modelkeep.errors import Conflict, Forbidden, InvalidInput, ModelkeepError, Unavailable
from modelkeep.lifecycle.canary import Thresholds, WindowStats, agreement, bucket, crossed
from modelkeep.service import InferCall, InferResult, Service
from modelkeep.settings import Settings
from modelkeep.testing import (
    LentTransport,
    SyncAppTransport,
    build_flaky_onnx,
    build_iris_onnx,
    iris_rows,
)

MODEL = "iris"


def body(rows: list[list[float]]) -> bytes:
    tensor = {"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}
    return json.dumps({"inputs": [tensor]}).encode()


def decoder(data: bytes) -> Any:
    def decode(signature: Any, max_elements: int) -> InferRequest:
        return decode_infer_request(data, signature, max_elements=max_elements)

    return decode


@dataclass
class Alerts:
    seen: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def observe(self, kind: str, **fields: object) -> None:
        self.seen.append((kind, fields))

    def close(self, timeout: float) -> None:
        return None


@dataclass
class World:
    svc: Service
    admin: Principal
    alerts: Alerts

    def key(self, role: str = "consumer") -> Principal:
        made = self.svc.create_key(self.admin, role=role, models=None, expires_at=None)
        return self.svc.authenticate(f"Bearer {made.token}")

    def push(self, data: bytes, who: Principal | None = None) -> int:
        pushed = self.svc.push(who or self.admin, MODEL, data, file_name="model.onnx")
        number: int = pushed.number
        return number

    def infer(
        self,
        who: Principal,
        rows: list[list[float]] | None = None,
        *,
        label: str | None = "production",
        version: str | None = None,
    ) -> InferResult[InferRequest]:
        data = body(rows or iris_rows(2))
        call = InferCall(data, decoder(data))
        return asyncio.run(self.svc.dataplane.infer(who, MODEL, call, version, label))

    def canary(self, version: int, share: float, label: str = "production", **limits: Any) -> Any:
        return self.svc.start_canary(self.admin, MODEL, label, version, share, Thresholds(**limits))

    def audit(self, action: str) -> list[Any]:
        return [e for e in self.svc.audit.entries() if e.action == action]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    init = init_data_dir(tmp_path / "data")
    svc = Service.open(Settings(data_dir=tmp_path / "data", access_log=False))
    alerts = Alerts()
    svc.core.alerter = alerts  # type: ignore[assignment]
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, MODEL, require_signature=False)
        yield World(svc, admin, alerts)
    finally:
        svc.stop()


def test_buckets_split_callers_within_statistical_bounds_of_the_share() -> None:
    callers = [f"key{i:05d}" for i in range(20_000)]
    for share in (1.0, 10.0, 50.0):
        inside = sum(bucket(k, MODEL, "production", "c1") < share for k in callers)
        expected = len(callers) * share / 100
        sd = math.sqrt(len(callers) * share / 100 * (1 - share / 100))
        assert abs(inside - expected) <= 5 * sd, (share, inside)
    # Another canary draws its callers afresh.
    first = {k for k in callers if bucket(k, MODEL, "production", "c1") < 10}
    second = {k for k in callers if bucket(k, MODEL, "production", "c2") < 10}
    assert 0 < len(first & second) < len(first) // 2


def stats(requests: int = 100, errors: int = 0, p99: float = 1.0, agreed: int = 100) -> Any:
    return WindowStats(requests, errors, 0.5, 0.9, p99, agreed, 100)


def test_each_threshold_withdraws_a_canary_only_once_it_has_enough_requests() -> None:
    limits = Thresholds(max_error_rate=0.05, max_p99_ms=20, min_agreement=0.9, min_requests=50)
    assert crossed(stats(), limits) is None
    assert crossed(stats(errors=6), limits) == "error rate 0.0600 above 0.0500"
    assert crossed(stats(p99=25.0), limits) == "p99 latency 25.00 ms above 20.00 ms"
    assert crossed(stats(agreed=80), limits) == "agreement 0.8000 below 0.9000"
    # Too few requests: not judged, however bad.
    assert crossed(stats(requests=49, errors=49, p99=999.0, agreed=0), limits) is None
    # Thresholds not given are not checked.
    assert crossed(stats(errors=90, p99=999.0, agreed=0), Thresholds()) is None


def test_thresholds_out_of_range_are_refused_and_round_trip_as_json() -> None:
    for bad in (
        {"max_error_rate": 1.5},
        {"min_agreement": -0.1},
        {"max_p99_ms": 0},
        {"max_p99_ms": float("nan")},
        {"min_requests": 0},
        {"window_s": 0.5},
        {"window_s": 10**6},
    ):
        with pytest.raises(InvalidInput):
            Thresholds(**bad)
    limits = Thresholds(max_error_rate=0.1, max_p99_ms=5.5, min_agreement=0.95, window_s=60)
    assert Thresholds.loads(limits.dumps()) == limits


def test_agreement_compares_top1_answers_of_class_scores_or_labels() -> None:
    scores = {"probabilities": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)}
    other = {"probabilities": np.array([[0.4, 0.6], [0.1, 0.9], [0.2, 0.8]], dtype=np.float32)}
    assert agreement(scores, other) == (2, 3)
    labels = {"label": np.array([1, 0, 2], dtype=np.int64)}
    assert agreement(labels, {"label": np.array([1, 1, 2], dtype=np.int64)}) == (2, 3)
    assert agreement(labels, {"label": np.array([1, 0], dtype=np.int64)}) == (0, 0)


def test_a_canary_serves_its_share_of_callers_each_always_from_the_same_version(
    world: World,
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    canary, change = world.canary(two, 30)
    assert (canary.status, change) == ("active", None)

    callers = [world.key() for _ in range(160)]
    served: dict[str, set[int]] = {}
    for caller in callers:
        for _ in range(3):
            served.setdefault(caller.key_id, set()).add(world.infer(caller).version)
    # Sticky: one version per caller for the whole canary.
    assert all(len(versions) == 1 for versions in served.values())
    in_canary = sum(versions == {two} for versions in served.values())
    sd = math.sqrt(160 * 0.3 * 0.7)
    assert abs(in_canary - 48) <= 5 * sd, in_canary
    # The split is the bucket's: exactly the callers whose bucket is under the share.
    expected = {c.key_id for c in callers if bucket(c.key_id, MODEL, "production", canary.id) < 30}
    assert {k for k, v in served.items() if v == {two}} == expected

    some = callers[0]
    # A request naming a version is never rerouted; one naming no label goes through the
    # canary of `production`, which defines the default.
    assert world.infer(some, label=None, version=str(one)).version == one
    assert world.infer(some, label=None).version == world.infer(some).version

    status = world.svc.canary_status(world.admin, MODEL)
    arms = {a["role"]: a for a in status[0]["versions"]}
    # (the call naming a version is not counted: it is not part of the canary)
    assert arms["canary"]["requests"] == 3 * in_canary + (2 if some.key_id in expected else 0)
    assert arms["canary"]["errors"] == 0
    assert arms["canary"]["p99_ms"] is not None
    world.svc.dataplane.watches.mirror.flush(10)
    status = world.svc.canary_status(world.admin, MODEL)
    arms = {a["role"]: a for a in status[0]["versions"]}
    # Canary callers' calls were run on the primary too, off the request path, and compared.
    assert arms["canary"]["compared"] > 0
    assert arms["canary"]["agreement"] is not None
    assert arms["canary"]["agreement"] > 0.8


def test_promote_moves_the_label_and_abort_returns_every_caller(world: World) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    caller = world.key()
    world.canary(two, 100)
    assert world.infer(caller).version == two
    world.svc.abort_canary(world.admin, MODEL, "production")
    assert world.infer(caller).version == one
    assert world.svc.canary_status(world.admin, MODEL)[0]["status"] == "aborted"

    world.canary(two, 100)
    version, change = world.svc.promote_canary(world.admin, MODEL, "production")
    assert (version, change) == (two, None)
    assert world.svc.get_model(world.admin, MODEL).labels["production"] == two
    assert world.svc.canary_status(world.admin, MODEL)[0]["status"] == "promoted"
    assert [m.kind for m in world.svc.label_history(world.admin, MODEL, "production")] == [
        "set",
        "promote",
    ]
    assert len(world.audit("canary.start")) == 2
    assert len(world.audit("canary.abort")) == 1
    assert len(world.audit("canary.promote")) == 1


def test_a_broken_canary_is_rolled_back_automatically_with_an_alert_and_an_audit_entry(
    world: World,
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    broken = world.push(build_flaky_onnx())
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.canary(broken, 100, max_error_rate=0.1, min_requests=30, window_s=600)
    caller = world.key()
    failed = 0
    for row in iris_rows(30):
        try:
            assert world.infer(caller, [row]).version == broken
        except ModelkeepError:
            failed += 1
    assert failed > 3  # the broken version fails on part of its inputs
    # Judged off the request path (the poller calls this after every poll).
    assert world.svc.canaries.check() != []

    status = world.svc.canary_status(world.admin, MODEL)[0]
    assert status["status"] == "rolled_back"
    assert status["ended_by"] == "server"
    assert status["reason"].startswith("error rate")
    assert world.infer(caller).version == one  # every caller is back on the approved version
    kinds = [kind for kind, _ in world.alerts.seen]
    assert "canary_rollback" in kinds
    (entry,) = world.audit("canary.rollback")
    assert entry.outcome == "success"
    assert entry.details["window_errors"] == failed
    assert entry.details["window_requests"] == 30
    assert entry.details["version"] == broken


def test_a_canary_version_that_will_not_load_is_rolled_back_too(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.canary(two, 100, max_error_rate=0.1, min_requests=10, window_s=600)
    loads = world.svc.core.session

    def session(version: Any) -> Any:
        if version.number == two:  # as a key service that no longer has the version's key
            raise Unavailable("the key service cannot unwrap this version's data key")
        return loads(version)

    monkeypatch.setattr(world.svc.core, "session", session)
    caller = world.key()
    for _ in range(10):
        with pytest.raises(Unavailable):
            world.infer(caller)
    assert world.svc.canaries.check() != []
    status = world.svc.canary_status(world.admin, MODEL)[0]
    assert status["status"] == "rolled_back"
    assert world.infer(caller).version == one
    (entry,) = world.audit("canary.rollback")
    assert entry.details["window_errors"] == 10


def test_the_poller_withdraws_a_broken_canary_without_being_asked(world: World) -> None:
    one = world.push(build_iris_onnx(seed=0))
    broken = world.push(build_flaky_onnx())
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.canary(broken, 100, max_error_rate=0.1, min_requests=30, window_s=600)
    caller = world.key()
    for row in iris_rows(30):
        with contextlib.suppress(ModelkeepError):
            world.infer(caller, [row])
    world.svc.start()  # the poller judges canaries after each poll of the store
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # The audit entry is written last (after the canary ended and the alert was sent).
        if world.audit("canary.rollback"):
            break
        threading.Event().wait(0.05)
    assert world.svc.canary_status(world.admin, MODEL)[0]["status"] == "rolled_back"
    assert len(world.audit("canary.rollback")) == 1


def test_a_healthy_canary_is_not_rolled_back_and_too_few_requests_are_not_judged(
    world: World,
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    broken = world.push(build_flaky_onnx())
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.canary(two, 100, max_error_rate=0.01, min_requests=10)
    caller = world.key()
    for row in iris_rows(20):
        world.infer(caller, [row])
    assert world.svc.canaries.check() == []
    world.canary(broken, 100, max_error_rate=0.01, min_requests=1000)
    for row in iris_rows(40):
        with contextlib.suppress(ModelkeepError):
            world.infer(caller, [row])
    assert world.svc.canaries.check() == []


def test_shadow_outputs_never_reach_a_client_and_never_touch_budgets(world: World) -> None:
    one = world.push(build_iris_onnx(seed=0))
    shadow = world.push(build_flaky_onnx())
    world.svc.set_label(world.admin, MODEL, "production", one)
    caller = world.key()
    rows = iris_rows(4)
    before = world.infer(caller, rows)
    assert before.budget is not None
    world.svc.start_shadow(world.admin, MODEL, "production", shadow, 100)
    answers = [world.infer(caller, rows) for _ in range(10)]
    world.svc.dataplane.watches.mirror.flush(10)

    for answer in answers:
        assert answer.version == one
        for name, value in before.outputs.items():
            assert answer.outputs[name].tolist() == value.tolist()
    # Only the caller's own rows count: 4 per call, the shadow's runs none.
    remaining = [a.budget.remaining for a in answers if a.budget is not None]
    assert remaining == [before.budget.remaining - 4 * (i + 1) for i in range(10)]
    status = world.svc.canary_status(world.admin, MODEL)[0]
    assert (status["mode"], status["status"]) == ("shadow", "active")
    arms = {a["role"]: a for a in status["versions"]}
    assert arms["primary"]["requests"] == 10
    assert arms["shadow"]["requests"] == 10  # every call mirrored (sample 100%)
    assert arms["shadow"]["compared"] + 4 * arms["shadow"]["errors"] == 40
    # The shadow fails on some rows: that is counted, never seen by the caller.
    assert arms["shadow"]["errors"] > 0 or arms["shadow"]["agreement"] is not None


def test_shadow_work_is_shed_first_when_the_server_is_busy(world: World) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.svc.start_shadow(world.admin, MODEL, "production", two, 100)
    caller = world.key()
    world.svc.dataplane.watches.busy = lambda: True
    assert world.infer(caller).version == one
    world.svc.dataplane.watches.mirror.flush(10)
    status = world.svc.canary_status(world.admin, MODEL)[0]
    arms = {a["role"]: a for a in status["versions"]}
    assert (status["shed"], arms["shadow"]["requests"]) == (1, 0)


def test_protected_canaries_start_and_promote_only_with_another_keys_approval(
    world: World,
) -> None:
    publisher = world.key("publisher")
    approver = world.key("approver")
    one = world.push(build_iris_onnx(seed=0), publisher)
    two = world.push(build_iris_onnx(seed=1), publisher)
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.svc.protect_label(world.admin, MODEL, "production", 1)
    caller = world.key()

    canary, change = world.svc.start_canary(publisher, MODEL, "production", two, 100, Thresholds())
    assert change is not None
    assert change.kind == "canary"
    assert canary.status == "pending"
    assert world.infer(caller).version == one  # not before the approval
    for who in (publisher, world.admin):  # the requester (and pusher), the admin alone
        with pytest.raises(Forbidden):
            world.svc.approve_change(who, change.id)
    assert world.svc.approve_change(approver, change.id).status == "applied"
    assert world.infer(caller).version == two

    version, move = world.svc.promote_canary(publisher, MODEL, "production")
    assert version == two
    assert move is not None
    assert move.kind == "set"
    for who in (publisher, world.admin):
        with pytest.raises(Forbidden):
            world.svc.approve_change(who, move.id)
    assert world.svc.get_model(world.admin, MODEL).labels["production"] == one
    # The admin's own promote request cannot be approved by the admin either.
    _, by_admin = world.svc.promote_canary(world.admin, MODEL, "production")
    assert by_admin is not None
    with pytest.raises(Forbidden):
        world.svc.approve_change(world.admin, by_admin.id)
    assert world.svc.approve_change(approver, move.id).status == "applied"
    assert world.svc.get_model(world.admin, MODEL).labels["production"] == two
    assert world.svc.canary_status(world.admin, MODEL)[0]["status"] == "promoted"


def test_abort_is_allowed_on_a_protected_label_and_withdraws_a_pending_request(
    world: World,
) -> None:
    publisher = world.key("publisher")
    one = world.push(build_iris_onnx(seed=0), publisher)
    two = world.push(build_iris_onnx(seed=1), publisher)
    world.svc.set_label(world.admin, MODEL, "production", one)
    world.svc.protect_label(world.admin, MODEL, "production", 1)
    _, change = world.svc.start_canary(publisher, MODEL, "production", two, 50, Thresholds())
    assert change is not None
    world.svc.abort_canary(publisher, MODEL, "production")
    assert world.svc.get_change(world.admin, change.id).status == "rejected"
    # A canary whose request was rejected holds nothing: its version may be deleted.
    _, again = world.svc.start_canary(publisher, MODEL, "production", two, 50, Thresholds())
    assert again is not None
    with pytest.raises(Conflict, match="canary or shadow"):
        world.svc.delete_version(world.admin, MODEL, str(two))
    approver = world.key("approver")
    world.svc.reject_change(approver, again.id, "not now")
    assert world.svc.canary_status(world.admin, MODEL)[0]["status"] == "rejected"
    world.svc.delete_version(world.admin, MODEL, str(two))


def test_a_version_under_a_canary_is_not_deleted_and_bad_canaries_are_refused(
    world: World,
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    with pytest.raises(ModelkeepError, match="has no label 'staging'"):
        world.canary(two, 10, label="staging")
    with pytest.raises(Conflict):
        world.canary(one, 10)
    with pytest.raises(InvalidInput):
        world.canary(two, 0)
    with pytest.raises(InvalidInput):
        world.canary(two, 10, max_error_rate=2.0)
    consumer = world.key()
    with pytest.raises(Forbidden):
        world.svc.start_canary(consumer, MODEL, "production", two, 10, Thresholds())
    world.canary(two, 10)
    with pytest.raises(Conflict, match="canary or shadow"):
        world.svc.delete_version(world.admin, MODEL, str(two))
    # Nor does a retention rule delete it (version 3 is the newest; 2 is older but in use).
    world.push(build_iris_onnx(seed=2))
    world.svc.set_retention(world.admin, MODEL, keep_versions=1, capture_days=None)
    world.svc.apply_retention(force=True)
    assert sorted(world.svc.get_model(world.admin, MODEL).versions) == [1, 2, 3]
    world.svc.abort_canary(world.admin, MODEL, "production")
    world.svc.delete_version(world.admin, MODEL, str(two))


def test_the_api_and_command_line_start_report_promote_and_abort_canaries(
    world: World, tmp_path: Path
) -> None:
    one = world.push(build_iris_onnx(seed=0))
    two = world.push(build_iris_onnx(seed=1))
    world.svc.set_label(world.admin, MODEL, "production", one)
    made = world.svc.create_key(world.admin, role="admin", models=None, expires_at=None)
    transport = SyncAppTransport(create_app(world.svc, manage_lifecycle=False))
    env = {"MODELKEEP_TOKEN": made.token, "MODELKEEP_URL": "http://127.0.0.1", "COLUMNS": "200"}

    def cli(*args: str) -> Any:
        overrides = ClientOverrides(transport=LentTransport(transport))
        return CliRunner().invoke(cli_app, list(args), obj=overrides, env=env)

    try:
        started = cli(
            "label",
            "set",
            MODEL,
            "production",
            str(two),
            "--canary",
            "100",
            "--max-error-rate",
            "0.2",
        )
        assert started.exit_code == 0, started.output
        assert f"canary on production -> version {two}, 100.0% of callers [active]" in (
            started.output
        )
        http = httpx.Client(transport=transport, base_url="http://127.0.0.1")
        answer = http.post(
            f"/v2/models/{MODEL}/infer",
            content=body(iris_rows(2)),
            headers={"Authorization": f"Bearer {made.token}", "Content-Type": "application/json"},
        )
        # V2 says which version answered: the canary's, for a request naming no version.
        assert (answer.status_code, answer.json()["model_version"]) == (200, str(two))
        status = cli("canary", "status", MODEL)
        assert status.exit_code == 0, status.output
        assert "AGREEMENT" in status.output
        assert "canary" in status.output
        listed = http.get(
            f"/api/v1/models/{MODEL}/canary", headers={"Authorization": f"Bearer {made.token}"}
        ).json()["canaries"]
        assert listed[0]["thresholds"]["max_error_rate"] == 0.2
        assert {a["role"]: a["requests"] for a in listed[0]["versions"]}["canary"] == 1
        shadow = cli("label", "set", MODEL, "production", "--shadow", str(two), "--sample", "5")
        assert shadow.exit_code == 0, shadow.output
        assert cli("canary", "abort", MODEL, "--shadow").exit_code == 0
        promoted = cli("canary", "promote", MODEL)
        assert promoted.exit_code == 0, promoted.output
        assert f"label production -> version {two} (canary promoted)" in promoted.output
        missing = cli("canary", "abort", MODEL)
        assert missing.exit_code != 0
        assert "has no canary" in missing.output
        refused = cli("label", "set", MODEL, "production", "1", "--canary", "150")
        assert refused.exit_code != 0
        # On a protected label the command line opens change requests the same key cannot
        # approve, for the canary and for its promotion.
        world.svc.protect_label(world.admin, MODEL, "production", 1)
        opened = cli("label", "set", MODEL, "production", "1", "--canary", "50", "--json")
        assert opened.exit_code == 0, opened.output
        change = json.loads(opened.output)
        assert (change["kind"], change["status"]) == ("canary", "pending")
        approved = cli("changes", "approve", change["id"])
        assert approved.exit_code != 0
        assert "cannot be approved by the key that made it" in approved.output
    finally:
        transport.close()
