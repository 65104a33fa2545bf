"""The integration harness: real `modelkeep` server processes over HTTPS on free loopback ports.

A module of its own, not conftest.py: test files import it by a name no other test directory
uses, so the import does not depend on the order pytest loads conftest files in.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from modelkeep.testing import free_port

MODELKEEP = [str(Path(sys.executable).parent / "modelkeep")]


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [*MODELKEEP, *args], capture_output=True, text=True, env=full_env, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"modelkeep {args[0]} failed: {proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Server:
    data_dir: Path
    admin_key: str
    ca_cert: Path
    port: int = 0
    workers: int = 1
    database_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url,
            verify=self.tls(),
            headers=headers,
            timeout=60,
            **kw,  # type: ignore[arg-type]
        )

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        return {
            "MODELKEEP_URL": self.url,
            "MODELKEEP_TOKEN": token or self.admin_key,
            "MODELKEEP_CACERT": str(self.ca_cert),
        }

    def start(self, timeout: float = 60, wait_for: str = "/v2/health/ready") -> None:
        """Start ``modelkeep serve`` and wait until ``wait_for`` answers 200."""
        self.port = free_port()
        args = ["serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        args += ["--workers", str(self.workers)]
        if self.database_url:
            args += ["--database-url", self.database_url]
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*MODELKEEP, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.extra_env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}{wait_for}", verify=self.tls(), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self.stop(signal.SIGKILL)


def init_server(tmp: Path, **kw: object) -> Server:
    data_dir = tmp / "data"
    args = ["init", "--data-dir", str(data_dir), "--json"]
    if kw.get("database_url"):
        args += ["--database-url", str(kw["database_url"])]
    out = json.loads(run_cli(*args).stdout)
    return Server(data_dir=data_dir, admin_key=out["admin_key"], ca_cert=Path(out["ca_cert"]), **kw)  # type: ignore[arg-type]


@functools.cache
def publisher_key() -> tuple[Path, str]:
    """One EC P-256 publisher key for the test session: (private key path, public PEM)."""
    from modelkeep.crypto.signing import generate_signing_key

    folder = Path(tempfile.mkdtemp(prefix="mk-publisher-"))
    trusted = generate_signing_key(folder / "publisher.key", folder / "publisher.pub")
    return folder / "publisher.key", trusted.pem


def sign_bytes(data: bytes, file_name: str = "model.onnx", key: Path | None = None) -> bytes:
    """A model-signing bundle for ``data`` as the file ``file_name``, made client-side."""
    from modelkeep.crypto.signing import sign_path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / file_name
        path.write_bytes(data)
        sign_path(path, key or publisher_key()[0], Path(folder) / "bundle.sig")
        return (Path(folder) / "bundle.sig").read_bytes()


def ensure_model(server: Server, model: str, *, publisher_pem: str | None = None) -> None:
    """Create ``model`` (idempotent) and trust the session's publisher key for it."""
    with server.client(server.admin_key) as c:
        r = c.put(f"/api/v1/models/{model}", json={})
        assert r.status_code in (200, 201), r.text
        r = c.post(
            f"/api/v1/models/{model}/publishers",
            json={"public_key": publisher_pem or publisher_key()[1]},
        )
        assert r.status_code == 201, r.text


def push(
    server: Server,
    model: str,
    data: bytes,
    token: str | None = None,
    *,
    signed: bool = True,
    file_name: str = "model.onnx",
    setup: bool = True,
) -> httpx.Response:
    """Push ``data`` as a new version, signed by the session's publisher key.

    With ``setup`` the admin first creates the model and trusts that key (idempotent), so
    the status reflects the push itself.
    """
    if setup:
        ensure_model(server, model)
    headers = {"Content-Type": "application/octet-stream"}
    if signed:
        headers["Modelkeep-Signature"] = base64.b64encode(sign_bytes(data, file_name)).decode()
    with server.client(token or server.admin_key) as c:
        return c.post(
            f"/api/v1/models/{model}/versions",
            params={"filename": file_name},
            content=data,
            headers=headers,
        )


def create_key(
    server: Server, role: str, models: list[str] | None = None, **extra: object
) -> dict[str, object]:
    with server.client(server.admin_key) as c:
        r = c.post("/api/v1/keys", json={"role": role, "models": models, **extra})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body
