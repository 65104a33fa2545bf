"""The server on PostgreSQL with two workers: the same behaviour as on SQLite, and it lasts.

Each test gets a fresh PostgreSQL schema (the `postgres_url` fixture), runs `modelkeep init` and
`modelkeep serve --database-url ... --workers 2` against it, and asks every worker through
connections pinned to each worker process (see test_workers.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from harness import Server, create_key, init_server, push
from test_workers import PROPAGATION_S, ask_everywhere, pin_workers

from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def pg(tmp_path: Path, postgres_url: str) -> Iterator[Server]:
    srv = init_server(tmp_path, database_url=postgres_url, workers=2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def v2_body() -> dict[str, object]:
    return {
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": iris_rows(2)}]
    }


def state(server: Server) -> dict[str, Any]:
    """Everything the management API shows: models with labels, their versions, the keys."""
    with server.client(server.admin_key) as c:
        models = c.get("/api/v1/models").json()["models"]
        versions = {
            m["name"]: c.get(f"/api/v1/models/{m['name']}/versions").json()["versions"]
            for m in models
        }
        keys = c.get("/api/v1/keys").json()["keys"]
    return {"models": models, "versions": versions, "keys": keys}


def test_push_label_and_infer_reach_every_worker(pg: Server) -> None:
    for seed, number in ((0, 1), (1, 2)):
        r = push(pg, "iris", build_iris_onnx(seed=seed))
        assert (r.status_code, r.json()["version"]) == (201, number), r.text
    time.sleep(PROPAGATION_S)
    with ExitStack() as stack:
        pinned = pin_workers(pg, stack)
        latest = ask_everywhere(
            pg, pinned, "POST", "/v2/models/iris/infer", pg.admin_key, json=v2_body()
        )
        with pg.client(pg.admin_key) as admin:
            r = admin.put("/api/v1/models/iris/labels/production", json={"version": 1})
            assert r.status_code == 200, r.text
        time.sleep(PROPAGATION_S)
        labelled = ask_everywhere(
            pg, pinned, "POST", "/v2/models/iris/infer", pg.admin_key, json=v2_body()
        )
    assert [(r.status_code, r.json().get("model_version")) for r in latest] == [(200, "2")] * len(
        latest
    )
    assert [(r.status_code, r.json().get("model_version")) for r in labelled] == [(200, "1")] * len(
        labelled
    )


def test_key_create_and_revoke_reach_every_worker(pg: Server) -> None:
    with ExitStack() as stack:
        pinned = pin_workers(pg, stack)
        created = create_key(pg, "consumer", ["iris"])
        token = str(created["key"])
        time.sleep(PROPAGATION_S)
        usable = ask_everywhere(pg, pinned, "GET", "/api/v1/whoami", token)
        with pg.client(pg.admin_key) as admin:
            assert admin.delete(f"/api/v1/keys/{created['id']}").status_code == 200
        time.sleep(PROPAGATION_S)
        refused = ask_everywhere(pg, pinned, "GET", "/api/v1/whoami", token)
    assert [(r.status_code, r.json().get("id")) for r in usable] == [(200, created["id"])] * len(
        usable
    )
    assert [(r.status_code, r.json()) for r in refused] == [
        (401, {"error": "API key revoked"})
    ] * len(refused)


def test_concurrent_pushes_get_gapless_versions(pg: Server) -> None:
    models = [build_iris_onnx(seed=i) for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda data: push(pg, "concurrent", data), models))
    assert [r.status_code for r in responses] == [201] * 12, [r.text for r in responses]
    pushed = sorted((r.json()["version"], r.json()["sha256"]) for r in responses)
    assert [number for number, _ in pushed] == list(range(1, 13))
    assert {sha for _, sha in pushed} == {hashlib.sha256(m).hexdigest() for m in models}
    time.sleep(PROPAGATION_S)
    with ExitStack() as stack:
        for c in pin_workers(pg, stack):
            listed = c.get("/api/v1/models/concurrent/versions").json()["versions"]
            assert [(v["version"], v["sha256"]) for v in listed] == pushed


def test_a_restart_shows_the_same_models_labels_and_keys(pg: Server) -> None:
    for seed in (0, 1):
        assert push(pg, "iris", build_iris_onnx(seed=seed)).status_code == 201
    with ThreadPoolExecutor(max_workers=4) as pool:
        pushed = list(pool.map(lambda s: push(pg, "other", build_iris_onnx(seed=s)), range(4)))
    assert sorted(r.json()["version"] for r in pushed) == [1, 2, 3, 4]
    with pg.client(pg.admin_key) as admin:
        r = admin.put("/api/v1/models/iris/labels/production", json={"version": 1})
        assert r.status_code == 200, r.text
    live = create_key(pg, "consumer", ["iris"])
    revoked = create_key(pg, "consumer", ["iris"])
    with pg.client(pg.admin_key) as admin:
        assert admin.delete(f"/api/v1/keys/{revoked['id']}").status_code == 200
    time.sleep(PROPAGATION_S)
    before = state(pg)
    assert [m["name"] for m in before["models"]] == ["iris", "other"]

    for restart in (pg.stop, pg.kill):  # a clean shutdown, then a crash
        restart()
        pg.start()
        assert state(pg) == before, restart.__name__
        with ExitStack() as stack:
            pinned = pin_workers(pg, stack)
            inferred = ask_everywhere(
                pg, pinned, "POST", "/v2/models/iris/infer", str(live["key"]), json=v2_body()
            )
            refused = ask_everywhere(pg, pinned, "GET", "/api/v1/whoami", str(revoked["key"]))
        assert [(r.status_code, r.json().get("model_version")) for r in inferred] == [
            (200, "1")
        ] * len(inferred)
        assert {r.status_code for r in refused} == {401}


def test_two_server_processes_on_one_postgresql_keep_one_valid_audit_chain(
    pg: Server, postgres_url: str
) -> None:
    # A second, separate server process (with its own two workers) on the same database and
    # data dir: four processes append to one audit log at once.
    other = Server(
        data_dir=pg.data_dir,
        admin_key=pg.admin_key,
        ca_cert=pg.ca_cert,
        workers=2,
        database_url=postgres_url,
    )
    other.start()
    try:

        def churn(server: Server, n: int) -> None:
            for i in range(n):
                key = create_key(server, "consumer", None, description=f"{server.port}-{i}")
                with server.client(server.admin_key) as c:
                    assert c.delete(f"/api/v1/keys/{key['id']}").status_code == 200

        with ThreadPoolExecutor(max_workers=4) as pool:
            jobs = [pool.submit(churn, s, 10) for s in (pg, other, pg, other)]
            for job in jobs:
                job.result()
        with pg.client(pg.admin_key) as c:
            verdict = c.get("/api/v1/audit/verify").json()
            entries = c.get("/api/v1/audit/entries", params={"limit": "10000"}).json()["entries"]
    finally:
        other.stop()
    assert verdict["ok"] is True, verdict
    seqs = sorted(e["seq"] for e in entries)
    assert seqs == list(range(1, len(seqs) + 1))
    assert sum(1 for e in entries if e["action"] == "key.create") == 40
    assert sum(1 for e in entries if e["action"] == "key.revoke") == 40
