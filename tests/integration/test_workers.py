"""One node, several worker processes: every change made through one worker reaches all of them.

Each worker keeps its own in-memory snapshot of keys, models and labels, refreshed by polling the
metadata store's change counter. These tests make a change through one request, wait the one
second the design promises, then ask every worker. A worker is reached for certain by a kept-alive
connection whose server end was found, through /proc, to belong to that worker's process; fresh
connections are added on top, as a client would make them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from harness import Server, create_key, init_server, push

from modelkeep.testing import build_iris_onnx, iris_rows

# Timing and per-process memory under load: run alone (`make test`), not beside another test.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

# The design's bound for a change (revocation, new key, label move) to reach every worker.
PROPAGATION_S = 1.0
FRESH_REQUESTS = 40


# -- which worker answered -------------------------------------------------------------------


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the server-side TCP socket 127.0.0.1:local_port <-> 127.0.0.1:remote_port."""
    local, remote = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return fields[9]
    return None


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        # Field 5 is the process group; the command name before it may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def serving_pid(server: Server, response: httpx.Response) -> int:
    """The pid of the server process holding the (still open) connection that answered."""
    assert server.proc is not None
    _host, client_port = response.extensions["network_stream"].get_extra_info("client_addr")
    inode = _socket_inode(server.port, client_port)
    assert inode is not None, "the connection is not open any more"
    target = f"socket:[{inode}]"
    for pid in _group_pids(server.proc.pid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:
                continue
    raise AssertionError("no server process holds the connection")


def pin_workers(server: Server, stack: ExitStack) -> list[httpx.Client]:
    """One open keep-alive connection per worker process, each known to reach a different one.

    Use them within uvicorn's 5 s keep-alive timeout, or the server closes them.
    """
    pinned: dict[int, httpx.Client] = {}
    for _ in range(200):
        client = stack.enter_context(server.client(server.admin_key))
        r = client.get("/v2/health/live")
        assert r.status_code == 200
        pid = serving_pid(server, r)
        if pid not in pinned:
            pinned[pid] = client
        if len(pinned) == server.workers:
            return list(pinned.values())
    raise AssertionError(f"only {len(pinned)} of {server.workers} workers accepted connections")


def ask_everywhere(
    server: Server, pinned: list[httpx.Client], method: str, path: str, token: str, **kw: object
) -> list[httpx.Response]:
    """The same request on every pinned worker, then on FRESH_REQUESTS new connections."""
    headers = {"Authorization": f"Bearer {token}"}
    answers = [c.request(method, path, headers=headers, **kw) for c in pinned]  # type: ignore[arg-type]
    for _ in range(FRESH_REQUESTS):
        with server.client(token) as fresh:
            answers.append(fresh.request(method, path, **kw))  # type: ignore[arg-type]
    return answers


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = init_server(tmp_path_factory.mktemp("workers"), workers=2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def v2_body() -> dict[str, object]:
    rows = iris_rows(2)
    return {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows}]}


# -- tests -----------------------------------------------------------------------------------


def test_the_server_runs_two_workers_that_both_accept_connections(multi: Server) -> None:
    with ExitStack() as stack:
        pinned = pin_workers(multi, stack)
        pids = {serving_pid(multi, c.get("/v2/health/live")) for c in pinned}
    assert len(pids) == 2


def test_a_revoked_key_is_refused_by_every_worker_within_a_second(multi: Server) -> None:
    consumer = create_key(multi, "consumer", ["iris"])
    token, key_id = str(consumer["key"]), str(consumer["id"])
    # A new key, too, reaches the other worker only on its next refresh.
    time.sleep(PROPAGATION_S)
    with ExitStack() as stack:
        pinned = pin_workers(multi, stack)
        before = ask_everywhere(multi, pinned, "GET", "/api/v1/whoami", token)
        assert [r.status_code for r in before] == [200] * len(before)
        with multi.client(multi.admin_key) as admin:
            assert admin.delete(f"/api/v1/keys/{key_id}").status_code == 200
        time.sleep(PROPAGATION_S)
        after = ask_everywhere(multi, pinned, "GET", "/api/v1/whoami", token)
    expected = [(401, {"error": "API key revoked"})] * len(after)
    assert [(r.status_code, r.json()) for r in after] == expected


def test_a_new_key_works_on_every_worker_within_a_second(multi: Server) -> None:
    with ExitStack() as stack:
        pinned = pin_workers(multi, stack)
        # Pinned before the key exists, so every worker's snapshot predates it; the key is
        # created through yet another connection.
        created = create_key(multi, "consumer", ["iris"])
        time.sleep(PROPAGATION_S)
        answers = ask_everywhere(multi, pinned, "GET", "/api/v1/whoami", str(created["key"]))
    assert [(r.status_code, r.json().get("id")) for r in answers] == [(200, created["id"])] * len(
        answers
    )


def test_concurrent_pushes_of_one_model_get_versions_1_to_12(multi: Server) -> None:
    models = [build_iris_onnx(seed=i) for i in range(12)]
    assert len({hashlib.sha256(m).hexdigest() for m in models}) == 12
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda data: push(multi, "concurrent", data), models))
    assert [r.status_code for r in responses] == [201] * 12, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 13))
    # Each push got the version that holds its own bytes.
    for data, r in zip(models, responses, strict=True):
        assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    # Every worker lists exactly those versions once the change has reached it.
    time.sleep(PROPAGATION_S)
    pushed = [(r.json()["version"], r.json()["sha256"]) for r in responses]
    with ExitStack() as stack:
        for c in pin_workers(multi, stack):
            listed = c.get("/api/v1/models/concurrent/versions").json()["versions"]
            assert [(v["version"], v["sha256"]) for v in listed] == sorted(pushed)


def test_a_label_move_is_seen_by_every_worker_within_a_second(multi: Server) -> None:
    for seed, expected_version in ((0, 1), (1, 2)):
        r = push(multi, "labelled", build_iris_onnx(seed=seed))
        assert (r.status_code, r.json()["version"]) == (201, expected_version)
    time.sleep(PROPAGATION_S)  # every worker knows both versions before the label names one
    # Create (1 is not the latest), move, move back: every step changes the answer.
    for version in (1, 2, 1):
        with ExitStack() as stack:
            pinned = pin_workers(multi, stack)
            with multi.client(multi.admin_key) as admin:
                r = admin.put(
                    "/api/v1/models/labelled/labels/production", json={"version": version}
                )
                assert r.status_code == 200, r.text
            time.sleep(PROPAGATION_S)
            answers = ask_everywhere(
                multi, pinned, "POST", "/v2/models/labelled/infer", multi.admin_key, json=v2_body()
            )
        assert [(r.status_code, r.json().get("model_version")) for r in answers] == [
            (200, str(version))
        ] * len(answers)


def test_a_client_with_a_few_connections_reaches_every_worker(multi: Server) -> None:
    """Each worker listens on its own socket (SO_REUSEPORT): the kernel spreads connections.

    With one shared socket, the worker already awake took every connection of a client that
    opened them in a burst. 16 connections all hashed to one of 2 workers: odds 2 in 65,536.
    """
    connections = 16
    with ExitStack() as stack:
        clients = [stack.enter_context(multi.client(multi.admin_key)) for _ in range(connections)]
        # All at once, as a load generator opens them.
        with ThreadPoolExecutor(connections) as pool:
            answers = list(pool.map(lambda c: c.get("/v2/health/live"), clients))
        assert [200] * connections == [r.status_code for r in answers]
        pids = Counter(serving_pid(multi, r) for r in answers)
    assert multi.workers == len(pids), pids
