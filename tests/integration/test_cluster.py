"""Three replicas behind HAProxy on PostgreSQL and Redis (scripts/cluster.py, `make cluster-demo`).

- A key created through one replica is accepted by all three within a second, and once revoked
  through another, refused by all three within a second.
- A caller limited to N requests/s gets N/s in total across the replicas, not N per replica.
- While a client streams inference through the proxy, one replica is SIGKILLed and started
  again: no acknowledged write is lost, no request gets a 5xx, the only failures are requests
  in flight on the killed replica (at most one per client connection), and the audit chain
  verifies afterwards.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from harness import MODELKEEP, sign_bytes

from modelkeep.testing import build_iris_onnx, iris_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from cluster import Cluster

# Timing under load (a limit per second, a revocation within a second): run alone.
pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.serial]

REVOCATION_BOUND_S = 1.0
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)[0]}]}
)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_base_url: str, redis_url: str
) -> Iterator[Cluster]:
    schema = f"mk_cluster_{secrets.token_hex(6)}"
    admin = sa.create_engine(postgres_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    cluster = Cluster(
        tmp_path_factory.mktemp("cluster"),
        database_url=f"{postgres_base_url}?options=-csearch_path%3D{schema}",
        redis_url=redis_url,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _model(cluster: Cluster) -> str:
    """A model of its own (Redis counters are keyed by model), pushed signed, labelled."""
    import base64

    from harness import publisher_key

    name = f"iris-{secrets.token_hex(4)}"
    data = build_iris_onnx()
    with cluster.client(cluster.admin_key) as c:
        assert c.put(f"/api/v1/models/{name}", json={}).status_code == 201
        r = c.post(f"/api/v1/models/{name}/publishers", json={"public_key": publisher_key()[1]})
        assert r.status_code == 201, r.text
        r = c.post(
            f"/api/v1/models/{name}/versions",
            params={"filename": "model.onnx"},
            content=data,
            headers={
                "Content-Type": "application/octet-stream",
                "Modelkeep-Signature": base64.b64encode(sign_bytes(data)).decode(),
            },
        )
        assert r.status_code == 201, r.text
    return name


def _consumer_key(cluster: Cluster, model: str, url: str | None = None) -> str:
    with cluster.client(cluster.admin_key, url) as c:
        r = c.post("/api/v1/keys", json={"role": "consumer", "models": [model]})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


def _accepted_everywhere(cluster: Cluster, key: str) -> bool:
    for index in range(cluster.replicas):
        with cluster.client(key, cluster.replica_url(index)) as c:
            if c.get("/api/v1/whoami").status_code != 200:
                return False
    return True


def _refused_everywhere(cluster: Cluster, key: str) -> bool:
    for index in range(cluster.replicas):
        with cluster.client(key, cluster.replica_url(index)) as c:
            if c.get("/api/v1/whoami").status_code != 401:
                return False
    return True


def test_a_key_made_or_revoked_through_one_replica_applies_on_all_within_a_second(
    cluster: Cluster,
) -> None:
    model = _model(cluster)
    key = _consumer_key(cluster, model, cluster.replica_url(0))
    created_at = time.monotonic()
    while not _accepted_everywhere(cluster, key):
        assert time.monotonic() - created_at < REVOCATION_BOUND_S, "a new key is not accepted"
    key_id = key.split("_")[1]

    with cluster.client(cluster.admin_key, cluster.replica_url(1)) as c:
        assert c.delete(f"/api/v1/keys/{key_id}").status_code == 200
    revoked_at = time.monotonic()
    while not _refused_everywhere(cluster, key):
        assert time.monotonic() - revoked_at < 5, "still accepted after 5 s"
    assert time.monotonic() - revoked_at < REVOCATION_BOUND_S


def test_a_rate_limit_holds_across_replicas_not_per_replica(cluster: Cluster) -> None:
    model = _model(cluster)
    rate, seconds = 10, 3.0
    with cluster.client(cluster.admin_key) as c:
        r = c.put(f"/api/v1/models/{model}/policy", json={"limits": {"rate": f"{rate}/second"}})
        assert r.status_code == 200, r.text
    key = _consumer_key(cluster, model)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds + 0.5  # a moment for the policy to reach every replica

    def hammer(index: int) -> None:
        with cluster.client(key, cluster.replica_url(index)) as c:
            while time.monotonic() < end:
                status = c.post(f"/v2/models/{model}/infer", content=BODY).status_code
                with lock:
                    statuses[status] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(cluster.replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0, statuses
    # A moving window: at most `rate` in any second of the run, so at most rate x (run + 1)
    # in all; a per-replica limit would allow up to three times as many.
    assert statuses[200] <= rate * (seconds + 1.5), statuses
    assert statuses[200] >= rate * (seconds - 1), statuses


def test_killing_a_replica_under_load_loses_no_write_and_answers_no_5xx(
    cluster: Cluster,
) -> None:
    model = _model(cluster)
    with cluster.client(cluster.admin_key) as c:
        assert c.put(f"/api/v1/models/{model}/labels/production", json={"version": 1}).is_success
        # No rate limit or budget (a new model's defaults allow 100/s): this measures failover.
        policy = {"limits": {}, "output": "full", "detect": []}
        assert c.put(f"/api/v1/models/{model}/policy", json=policy).status_code == 200
    key = _consumer_key(cluster, model)
    connections = 4
    statuses: Counter[int] = Counter()
    transport_errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def stream() -> None:
        client = cluster.client(key)
        try:
            while not stop.is_set():
                try:
                    status = client.post(
                        f"/v2/models/{model}/versions/1/infer", content=BODY
                    ).status_code
                except httpx.TransportError as exc:
                    with lock:
                        transport_errors.append(type(exc).__name__)
                    client.close()
                    client = cluster.client(key)
                    continue
                with lock:
                    statuses[status] += 1
        finally:
            client.close()

    acknowledged: list[str] = []

    def write() -> None:
        # Acknowledged writes through the proxy while replicas die: keys created.
        with cluster.client(cluster.admin_key) as c:
            while not stop.is_set():
                description = f"k{len(acknowledged)}"
                try:
                    r = c.post(
                        "/api/v1/keys",
                        json={"role": "consumer", "models": [model], "description": description},
                    )
                except httpx.TransportError:
                    continue
                if r.status_code == 201:
                    acknowledged.append(r.json()["id"])
                time.sleep(0.05)

    workers = [threading.Thread(target=stream) for _ in range(connections)]
    workers.append(threading.Thread(target=write))
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        cluster.kill(0)
        time.sleep(2)
        cluster.restart(0)
        cluster.wait_in_rotation()
        time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    assert statuses[200] > 0
    assert {s for s in statuses if s >= 500} == set(), statuses
    assert set(statuses) == {200}, statuses
    # Only a request in flight on the killed replica can fail: one per connection at most.
    assert len(transport_errors) <= connections + 1, transport_errors
    with cluster.client(cluster.admin_key) as c:
        listed = {k["id"] for k in c.get("/api/v1/keys").json()["keys"]}
    assert acknowledged, "no write was acknowledged during the run"
    assert set(acknowledged) <= listed
    verify = subprocess.run(
        [*MODELKEEP, "audit", "verify", "--data-dir", str(cluster.data_dir)],
        env=cluster.replica_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_tour_through_the_proxy_on_every_back_end(cluster: Cluster) -> None:
    """PostgreSQL, Redis, S3 (SeaweedFS) and OpenBao behind three replicas: a signed push, a
    label, a consumer key and V2 inference with tritonclient through HAProxy; no key is 401."""
    import ssl

    import numpy as np
    import tritonclient.http as httpclient

    assert cluster.replica_env()["MODELKEEP_KEY_SERVICE"].startswith("openbao+https://")
    assert cluster.replica_env()["MODELKEEP_BLOB_URL"].startswith("s3://")
    model = _model(cluster)
    with cluster.client(cluster.admin_key) as c:
        r = c.put(f"/api/v1/models/{model}/labels/production", json={"version": 1})
        assert r.status_code == 200, r.text
        status = c.get("/api/v1/kek").json()
    assert status["key_service"] == "openbao"
    assert status["versions_to_rewrap"] == 0
    assert sum(status["versions_by_key"].values()) >= 1
    key = _consumer_key(cluster, model)
    with cluster.client() as anonymous:
        assert anonymous.post(f"/v2/models/{model}/infer", content=BODY).status_code == 401
    client = httpclient.InferenceServerClient(
        url=cluster.url.removeprefix("https://"),
        ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(cluster.ca)),
    )
    try:
        rows = np.asarray(iris_rows(4), dtype=np.float32)
        inp = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=True)
        result = client.infer(model, [inp], headers={"Authorization": f"Bearer {key}"})
        assert result.as_numpy("label").shape == (4,)
    finally:
        client.close()
