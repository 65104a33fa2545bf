"""The inference guard over real HTTPS: limits, budgets, hardening, detection, block/unblock."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from harness import Server, create_key, init_server, push

from modelkeep.testing import build_iris_onnx, build_slow_onnx, iris_rows

# Timing and per-process memory under load: run alone (`make test`), not beside another test.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


def body(rows: list[list[float]]) -> dict[str, object]:
    width = len(rows[0])
    return {
        "inputs": [{"name": "input", "shape": [len(rows), width], "datatype": "FP32", "data": rows}]
    }


@dataclass
class World:
    server: Server
    admin: httpx.Client

    def policy(self, model: str, **policy: object) -> dict[str, object]:
        r = self.admin.put(f"/api/v1/models/{model}/policy", json=policy)
        assert r.status_code == 200, r.text
        result: dict[str, object] = r.json()
        return result

    def consumer(self, model: str) -> tuple[str, httpx.Client]:
        key = create_key(self.server, "consumer", [model])
        return str(key["id"]), self.server.client(str(key["key"]))


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    iris = build_iris_onnx()
    for name in ("rated", "budgeted", "hardened", "watched", "sized"):
        assert push(server, name, iris).status_code == 201
    with server.client(server.admin_key) as admin:
        yield World(server, admin)


def test_policy_round_trips_and_bad_policies_are_400(world: World) -> None:
    shown = world.policy(
        "sized",
        limits={"rate": "100/second", "budget": "1000/day", "max_rows": 3},
        output="round=2",
        output_for={"admin": "full"},
        detect=["prada"],
        on_alarm="block",
    )
    assert shown["limits"]["max_rows"] == 3  # type: ignore[index]
    assert (shown["output"], shown["output_for"], shown["on_alarm"]) == (
        "round=2",
        {"admin": "full"},
        "block",
    )
    got = world.admin.get("/api/v1/models/sized/policy").json()
    assert (got["output"], got["detect"], got["restrictions"]) == ("round=2", ["prada"], [])
    for bad in (
        {"limits": {"rate": "lots"}},
        {"output": "top_k=-1"},
        {"on_alarm": "explode"},
        {"detect": ["psychic"]},
        {"output_for": {"root": "full"}},
        {"surprise": 1},
    ):
        r = world.admin.put("/api/v1/models/sized/policy", json=bad)
        assert r.status_code == 400, (bad, r.text)
        assert list(r.json()) == ["error"]


def test_max_rows_refuses_big_batches_before_running(world: World) -> None:
    world.policy("sized", limits={"max_rows": 3})
    _, client = world.consumer("sized")
    with client:
        assert client.post("/v2/models/sized/infer", json=body(iris_rows(3))).status_code == 200
        r = client.post("/v2/models/sized/infer", json=body(iris_rows(4)))
    assert (r.status_code, r.json()) == (413, {"error": "4 rows; the limit is 3"})


def test_rate_limit_under_concurrency_with_an_honest_retry_after(world: World) -> None:
    world.policy("rated", limits={"rate": "10/5second"})
    _, client = world.consumer("rated")
    barrier = threading.Barrier(20)

    def one(_: int) -> httpx.Response:
        barrier.wait(timeout=30)
        return client.post("/v2/models/rated/infer", json=body(iris_rows(1)))

    with client, ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(one, range(20)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 10 + [429] * 10
        refused = [r for r in responses if r.status_code == 429]
        waits = {int(r.headers["Retry-After"]) for r in refused}
        assert all(1 <= w <= 5 for w in waits), waits
        # Honest: after waiting what it said, a request passes.
        time.sleep(max(waits))
        assert client.post("/v2/models/rated/infer", json=body(iris_rows(1))).status_code == 200


def test_budget_counts_rows_shows_what_remains_and_can_be_reset(world: World) -> None:
    world.policy("budgeted", limits={"budget": "10/day"})
    key_id, client = world.consumer("budgeted")
    with client:
        r = client.post("/v2/models/budgeted/infer", json=body(iris_rows(4)))
        assert r.status_code == 200
        assert (r.headers["X-Budget-Limit"], r.headers["X-Budget-Remaining"]) == ("10", "6")
        r = client.post("/v2/models/budgeted/infer", json=body(iris_rows(6)))
        assert r.headers["X-Budget-Remaining"] == "0"
        r = client.post("/v2/models/budgeted/infer", json=body(iris_rows(1)))
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) > 0
        reset = world.admin.post(f"/api/v1/models/budgeted/budgets/{key_id}/reset")
        assert reset.status_code == 204, reset.text
        r = client.post("/v2/models/budgeted/infer", json=body(iris_rows(1)))
        assert (r.status_code, r.headers["X-Budget-Remaining"]) == (200, "9")


@pytest.mark.parametrize(
    ("output", "check"),
    [
        ("round=1", lambda p: np.allclose(p, np.round(p, 1))),
        ("top_k=1", lambda p: (np.count_nonzero(p, axis=1) == 1).all()),
        ("reverse_sigmoid", lambda p: np.allclose(p.sum(axis=1), 1.0, atol=1e-5)),
    ],
)
def test_output_hardening_keeps_the_label_and_valid_v2(
    world: World, output: str, check: object
) -> None:
    world.policy("hardened", output=output, output_for={"admin": "full"})
    _, client = world.consumer("hardened")
    rows = iris_rows(9)
    with client:
        hardened = client.post("/v2/models/hardened/infer", json=body(rows)).json()
    full = world.admin.post("/v2/models/hardened/infer", json=body(rows)).json()
    out = {o["name"]: o for o in hardened["outputs"]}
    ref = {o["name"]: o for o in full["outputs"]}
    assert out["label"]["data"] == ref["label"]["data"]
    probabilities = np.asarray(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probabilities.shape == (9, 3)
    assert list(np.argmax(probabilities, axis=1)) == ref["label"]["data"]
    assert check(probabilities)  # type: ignore[operator]
    assert probabilities.tolist() != np.asarray(ref["probabilities"]["data"]).reshape(9, 3).tolist()


def test_label_only_drops_scores(world: World) -> None:
    world.policy("hardened", output="label_only")
    _, client = world.consumer("hardened")
    with client:
        r = client.post("/v2/models/hardened/infer", json=body(iris_rows(2)))
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]


def _digits_model() -> tuple[bytes, np.ndarray, np.ndarray]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    train, attacker, benign = order[:700], order[700:900], order[900:]
    classifier = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    onnx_model = convert_sklearn(
        classifier,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return onnx_model.SerializeToString(), x[attacker], x[benign]


def test_a_boundary_prober_is_blocked_within_300_queries_and_can_be_unblocked(
    world: World,
) -> None:
    model_bytes, attacker_pool, benign_pool = _digits_model()
    assert push(world.server, "digits", model_bytes).status_code == 201
    world.policy("digits", detect=["prada"], on_alarm="block")
    benign_id, benign = world.consumer("digits")
    attacker_id, attacker = world.consumer("digits")
    with benign, attacker:
        # A benign caller replaying 300 natural rows, 1 to 8 a request, raises nothing.
        rng = np.random.default_rng(5)
        rows = benign_pool[rng.choice(len(benign_pool), 300, replace=False)]
        start = 0
        while start < 300:
            size = int(rng.integers(1, 9))
            r = benign.post(
                "/v2/models/digits/infer", json=body(rows[start : start + size].tolist())
            )
            assert r.status_code == 200, (start, r.text)
            start += size
        # A prober bisecting between rows the model labels differently, one query a request.
        labels = lambda q: benign.post(  # noqa: E731
            "/v2/models/digits/infer", json=body(q)
        ).json()["outputs"][0]["data"]
        pool_labels = labels(attacker_pool.tolist())
        sent, blocked_at = 0, None
        while sent < 300 and blocked_at is None:
            a, b = rng.choice(len(attacker_pool), 2, replace=False)
            if pool_labels[a] == pool_labels[b]:
                continue
            inside, outside = attacker_pool[a], attacker_pool[b]
            for _ in range(8):
                middle = (inside + outside) / 2
                r = attacker.post("/v2/models/digits/infer", json=body([middle.tolist()]))
                sent += 1
                if r.status_code == 403:
                    assert "suspended" in r.json()["error"]
                    blocked_at = sent
                    break
                assert r.status_code == 200, r.text
                if r.json()["outputs"][0]["data"][0] == pool_labels[a]:
                    inside = middle
                else:
                    outside = middle
        assert blocked_at is not None, "the prober was never blocked"
        assert blocked_at <= 300
        # Still blocked; the policy shows it; the benign caller is untouched.
        again = attacker.post("/v2/models/digits/infer", json=body([attacker_pool[0].tolist()]))
        assert again.status_code == 403
        shown = world.admin.get("/api/v1/models/digits/policy").json()
        assert [(x["key"], x["kind"]) for x in shown["restrictions"]] == [(attacker_id, "block")]
        assert benign_id not in [x["key"] for x in shown["restrictions"]]
        # An admin lifts it.
        lifted = world.admin.delete(f"/api/v1/models/digits/restrictions/{attacker_id}")
        assert lifted.status_code == 204, lifted.text
        ok = attacker.post("/v2/models/digits/infer", json=body([attacker_pool[0].tolist()]))
        assert ok.status_code == 200, ok.text


def test_calibration_sets_a_threshold_from_benign_rows(world: World) -> None:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    r = world.admin.post("/api/v1/models/digits/policy/calibrate", json={"rows": x[797:].tolist()})
    assert r.status_code == 200, r.text
    assert 0.0 < r.json()["prada_threshold"] < 1.0
    assert r.json()["ood_reference"] == {"fitted": True}
    too_few = world.admin.post(
        "/api/v1/models/digits/policy/calibrate", json={"rows": [[0.0] * 64]}
    )
    assert too_few.status_code == 400


def test_blocked_callers_and_policies_are_audited(world: World) -> None:
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "modelkeep")
    out = subprocess.run(
        [cli, "audit", "export", "--data-dir", str(world.server.data_dir), "--model", "digits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    actions = [line for line in out.splitlines() if line]
    assert any('"detector.alarm"' in a for a in actions)
    assert any('"policy.set"' in a for a in actions)
    assert any('"policy.unblock"' in a for a in actions)


# -- Redis: two server processes, one set of limits --------------------------------------------


def test_two_servers_sharing_redis_enforce_one_limit(tmp_path: object, redis_url: str) -> None:
    from pathlib import Path

    first = init_server(Path(str(tmp_path)))
    first.extra_env["MODELKEEP_LIMITS_STORAGE"] = redis_url
    first.start()
    second = Server(
        data_dir=first.data_dir,
        admin_key=first.admin_key,
        ca_cert=first.ca_cert,
        extra_env={"MODELKEEP_LIMITS_STORAGE": redis_url},
    )
    try:
        second.start()
        assert push(first, "shared", build_iris_onnx()).status_code == 201
        with first.client(first.admin_key) as admin:
            model = "shared"
            r = admin.put(f"/api/v1/models/{model}/policy", json={"limits": {"rate": "6/minute"}})
            assert r.status_code == 200, r.text
        key = create_key(first, "consumer", ["shared"])
        statuses = []
        for i in range(10):
            target = first if i % 2 == 0 else second
            with target.client(str(key["key"])) as c:
                statuses.append(
                    c.post("/v2/models/shared/infer", json=body(iris_rows(1))).status_code
                )
        assert sorted(statuses) == [200] * 6 + [429] * 4
        # Both servers admitted some: the limit is shared, not each server's own.
        assert 200 in statuses[1::2]
        assert 200 in statuses[0::2]
    finally:
        second.stop()
        first.stop()


def test_redis_down_means_refusal_not_unlimited(tmp_path: object) -> None:
    from pathlib import Path

    srv = init_server(Path(str(tmp_path)))
    srv.extra_env["MODELKEEP_LIMITS_STORAGE"] = "redis://127.0.0.1:1/0"  # nothing listens there
    # Never ready while its limits storage does not answer: wait for it to be live.
    srv.start(wait_for="/v2/health/live")
    try:
        with srv.client() as anonymous:
            deadline = time.monotonic() + 10
            while anonymous.get("/v2/health/ready").status_code != 503:
                assert time.monotonic() < deadline, "ready although Redis does not answer"
                time.sleep(0.1)
        assert push(srv, "closed", build_iris_onnx()).status_code == 201
        with srv.client(srv.admin_key) as c:
            policy = {"limits": {"rate": "100/second", "budget": "1000/day"}}
            assert c.put("/api/v1/models/closed/policy", json=policy).status_code == 200
            started = time.monotonic()
            r = c.post("/v2/models/closed/infer", json=body(iris_rows(1)))
            elapsed = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert "rate limit storage is unavailable" in r.json()["error"]
        assert elapsed < 2.0
    finally:
        srv.stop()


def test_overload_of_a_slow_model_is_shed_with_503_not_queued(tmp_path: object) -> None:
    from pathlib import Path

    srv = init_server(Path(str(tmp_path)))
    srv.extra_env["MODELKEEP_MAX_QUEUE"] = "2"
    srv.start()
    try:
        assert push(srv, "slow", build_slow_onnx()).status_code == 201
        rows = [[0.5, 0.5, 0.5, 0.5]] * 512  # tens of milliseconds a call
        with srv.client(srv.admin_key) as c:
            for _ in range(3):  # the server learns the model is slow: thread pool, bounded queue
                assert c.post("/v2/models/slow/infer", json=body(rows)).status_code == 200
        barrier = threading.Barrier(16)

        def one(_: int) -> httpx.Response:
            with srv.client(srv.admin_key) as c:
                assert c.get("/v2/health/live").status_code == 200
                barrier.wait(timeout=30)
                return c.post("/v2/models/slow/infer", json=body(rows))

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(one, range(16)))
        statuses = sorted(r.status_code for r in responses)
        shed = [r for r in responses if r.status_code == 503]
        assert set(statuses) == {200, 503}, statuses
        assert all(r.headers["Retry-After"] == "1" for r in shed)
        assert all("overloaded" in r.json()["error"] for r in shed)
        # The server is still serving afterwards.
        with srv.client(srv.admin_key) as c:
            assert c.post("/v2/models/slow/infer", json=body(rows)).status_code == 200
    finally:
        srv.stop()
