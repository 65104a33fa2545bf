"""The image, run for real as a hardened container against the host's PostgreSQL and Redis.

The container gets a read-only root filesystem (and no tmpfs but /tmp), no capabilities, no new
privileges and the image's fixed UID; its data directory is a volume that `modelkeep init`,
run in the same image, fills. It reaches the host's loopback PostgreSQL and Redis through
slirp4netns' host gateway (10.0.2.2) and is reached through a port published on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from harness import Server, create_key, free_port, push
from tools import podman

from modelkeep.testing import iris_rows

# The first module to use the image builds it: from scratch that takes minutes.
pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(1500)]

UID = "10001"
HOST_GATEWAY = "10.0.2.2"  # slirp4netns' address for the host's loopback
DRAIN_DELAY_S = 2
GRACE_S = 10
HARDENED = [
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs",
    "/tmp:rw,size=64m,mode=1777",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--user",
    f"{UID}:{UID}",
    "--network",
    "slirp4netns:allow_host_loopback=true",
]


@pytest.fixture(scope="module")
def database(postgres_base_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for this module, by the URL the container uses."""
    schema = f"mk_container_{secrets.token_hex(6)}"
    admin = sa.create_engine(postgres_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{postgres_base_url}?options=-csearch_path%3D{schema}"
        yield url.replace("127.0.0.1", HOST_GATEWAY)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def container(
    image: str, database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    """`modelkeep init` into a volume, then `modelkeep serve` from it: (name, server)."""
    volume = tmp_path_factory.mktemp("volume")
    os.chown(volume, int(UID), int(UID))
    os.chmod(volume, 0o700)
    env = ["-e", f"MODELKEEP_DATABASE_URL={database}"]
    init = podman(
        "run",
        "--rm",
        *HARDENED,
        "-v",
        f"{volume}:/var/lib/modelkeep",
        *env,
        image,
        "init",
        "--json",
    )
    admin_key = json.loads(init.stdout)["admin_key"]
    name = f"mk-test-{secrets.token_hex(4)}"
    port = free_port()
    env += ["-e", f"MODELKEEP_LIMITS_STORAGE={redis_url.replace('127.0.0.1', HOST_GATEWAY)}"]
    env += ["-e", f"MODELKEEP_SHUTDOWN_DELAY_S={DRAIN_DELAY_S}"]
    env += ["-e", f"MODELKEEP_SHUTDOWN_GRACE_S={GRACE_S}"]
    podman(
        "run", "-d", "--name", name, *HARDENED, "-p", f"127.0.0.1:{port}:8443",
        "-v", f"{volume}:/var/lib/modelkeep", *env, image,
    )  # fmt: skip
    data_dir = volume / "data"
    server = Server(data_dir=data_dir, admin_key=admin_key, ca_cert=data_dir / "tls" / "ca.pem")
    server.port = port
    try:
        _wait_ready(name, server)
        yield name, server
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def _wait_ready(name: str, server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", verify=server.tls()).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", podman("logs", name).stdout[-3000:]
        time.sleep(0.5)
    raise AssertionError(podman("logs", name, check=False).stdout[-3000:])


def _exec(name: str, script: str) -> str:
    return podman("exec", name, "/bin/sh", "-c", script).stdout


def test_the_processes_have_no_capabilities_and_no_new_privileges(
    container: tuple[str, Server],
) -> None:
    name, _ = container
    # PID 1 is tini; its child is modelkeep (the shell of `podman exec` is left out).
    status = _exec(name, "for f in /proc/[0-9]*/status; do cat $f; echo; done")
    processes = []
    for block in status.split("\n\n"):
        fields = dict(line.split(":\t", 1) for line in block.splitlines() if ":\t" in line)
        if fields and fields["PPid"].strip() in ("0", "1") and fields["Name"] not in ("sh", "cat"):
            processes.append(fields)
    assert sorted((p["Name"], p["PPid"]) for p in processes) == [("modelkeep", "1"), ("tini", "0")]
    for fields in processes:
        for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(fields[key], 16) == 0, (fields["Name"], key)
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["Uid"].split()[0] == UID


def test_only_the_configured_paths_are_writable(container: tuple[str, Server]) -> None:
    name, _ = container
    writable = _exec(
        name,
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o "
        "-type d -writable -print 2>/dev/null || true",
    ).split()
    assert writable
    assert [p for p in writable if not p.startswith(("/tmp", "/var/lib/modelkeep"))] == []


def test_the_tour_through_the_published_port(
    container: tuple[str, Server], iris_onnx: bytes
) -> None:
    import tritonclient.http as httpclient

    _, server = container
    r = push(server, "iris", iris_onnx)  # signed by the session's publisher key
    assert r.status_code == 201, r.text
    consumer = create_key(server, "consumer", ["iris"])
    client = httpclient.InferenceServerClient(
        url=server.url.removeprefix("https://"),
        ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(server.ca_cert)),
    )
    try:
        headers = {"Authorization": f"Bearer {consumer['key']}"}
        rows = np.asarray(iris_rows(4), dtype=np.float32)
        infer_input = httpclient.InferInput("input", list(rows.shape), "FP32")
        infer_input.set_data_from_numpy(rows, binary_data=True)
        result = client.infer("iris", [infer_input], headers=headers)
        labels = result.as_numpy("label")
        assert labels is not None
        assert labels.shape == (4,)
    finally:
        client.close()
    with server.client() as anonymous:
        r = anonymous.post("/v2/models/iris/infer", json={"inputs": []})
    assert (r.status_code, r.json()) == (401, {"error": "missing credentials"})


def test_the_logs_are_json_lines(container: tuple[str, Server]) -> None:
    name, _ = container
    lines = podman("logs", name).stdout.splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert "access" in events


# httpcore leaves the socket of a TLS handshake that failed (a connection reset as the listener
# closed, counted as refused) for the garbage collector to close.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
def test_sigterm_drains_loses_no_accepted_request_and_exits_0(
    container: tuple[str, Server], iris_onnx: bytes
) -> None:
    """Not ready at once, still serving during the delay, every accepted request answered,
    keep-alive clients told Connection: close, access lines flushed, exit status 0 within
    delay + grace."""
    name, server = container
    # No rate limit or budget (a new model's defaults allow 100/s): this measures the drain.
    with server.client(server.admin_key) as admin:
        if admin.get("/api/v1/models/iris/versions").status_code != 200:
            assert push(server, "iris", iris_onnx).status_code == 201  # run without the tour
        policy = {"limits": {}, "output": "full", "detect": []}
        assert admin.put("/api/v1/models/iris/policy", json=policy).status_code == 200
    key = create_key(server, "consumer", ["iris"])
    consumer = str(key["key"])
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [iris_rows(1)[0]]}
        ]
    }
    outcomes: Counter[str] = Counter()
    readiness: list[tuple[float, int]] = []
    closes: list[float] = []  # when a keep-alive client was told Connection: close
    stop = threading.Event()
    tls = server.tls()

    def stream(keep_alive: bool) -> None:
        # A new connection per request, or one kept alive across requests until the server
        # says Connection: close. A refused connect is a request never accepted (with TLS the
        # request is sent only once the handshake is done).
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
        headers = {"Authorization": f"Bearer {consumer}"}
        with httpx.Client(verify=tls, timeout=30, limits=limits, headers=headers) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{server.url}/v2/models/iris/infer", json=body)
                    outcomes[f"status {r.status_code}"] += 1
                    if keep_alive and r.headers.get("connection") == "close":
                        closes.append(time.monotonic())
                except httpx.ConnectError:
                    outcomes["refused"] += 1
                    time.sleep(0.05)
                except httpx.HTTPError as exc:
                    outcomes[f"lost {type(exc).__name__}"] += 1

    def probe() -> None:
        while not stop.is_set():
            try:
                r = httpx.get(f"{server.url}/v2/health/ready", verify=tls, timeout=5)
                readiness.append((time.monotonic(), r.status_code))
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    threads = [threading.Thread(target=stream, args=(i % 2 == 0,)) for i in range(4)]
    threads.append(threading.Thread(target=probe))
    for thread in threads:
        thread.start()
    try:
        while outcomes["status 200"] < 20:
            time.sleep(0.05)
        before = outcomes["status 200"]
        signalled = time.monotonic()
        podman("kill", "--signal", "TERM", name)
        exit_code = podman("wait", name, timeout=60).stdout.strip()
        stopped = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert exit_code == "0"
    assert stopped - signalled < DRAIN_DELAY_S + GRACE_S
    assert [k for k in outcomes if k.startswith("lost")] == [], outcomes
    assert set(outcomes) <= {"status 200", "refused"}, outcomes
    assert outcomes["status 200"] > before  # served on during the delay
    assert closes  # keep-alive clients were sent elsewhere
    assert min(closes) > signalled  # and only once the drain began
    after = [status for when, status in readiness if when > signalled + 0.5]
    assert 503 in after, readiness[-10:]
    assert 200 not in after
    # Every answered request has its access line: the log was flushed before exit.
    lines = [json.loads(line) for line in podman("logs", name).stdout.splitlines()]
    infer_lines = [
        line for line in lines if line["event"] == "access" and line.get("principal") == key["id"]
    ]
    assert len(infer_lines) == outcomes["status 200"]
