"""Killed and retried pushes on a real `modelkeep serve`: no leftovers, no duplicate versions.

A push's bytes are staged sealed in a file without a name, so a SIGKILL at any moment leaves at
most the final blob's temporary file, which the next start removes before workers run. A push
sent with an Idempotency-Key and retried after the connection broke, even when the server had
already recorded the version and died before answering, gets that version back, not a second.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import Server, ensure_model, init_server, run_cli, sign_bytes

from modelkeep.testing import build_big_onnx, build_iris_onnx

pytestmark = pytest.mark.integration

MODEL = "m"
BIG_BYTES = 96 * 1024 * 1024


@pytest.fixture(scope="module")
def big() -> tuple[bytes, bytes]:
    data = build_big_onnx(BIG_BYTES)
    return data, sign_bytes(data)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = init_server(tmp_path_factory.mktemp("retries"))
    server.start()
    try:
        ensure_model(server, MODEL)
        yield server
    finally:
        server.stop()


def post(
    url: str,
    server: Server,
    data: bytes,
    bundle: bytes,
    key: str | None,
    *,
    timeout: float = 120,
) -> httpx.Response:
    headers = {
        "Content-Type": "application/octet-stream",
        "Modelkeep-Signature": base64.b64encode(bundle).decode(),
    }
    if key is not None:
        headers["Idempotency-Key"] = key
    with httpx.Client(base_url=url, verify=server.tls(), timeout=timeout) as c:
        return c.post(
            f"/api/v1/models/{MODEL}/versions",
            params={"filename": "model.onnx"},
            content=data,
            headers={**headers, "Authorization": f"Bearer {server.admin_key}"},
        )


def versions(server: Server) -> dict[int, str]:
    with server.client(server.admin_key) as c:
        r = c.get(f"/api/v1/models/{MODEL}/versions")
    assert r.status_code == 200, r.text
    return {v["version"]: v["sha256"] for v in r.json()["versions"]}


def recorded_versions(server: Server) -> int:
    with sqlite3.connect(server.data_dir / "modelkeep.db", timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM versions").fetchone()[0])


def referenced_blobs(server: Server) -> set[str]:
    with sqlite3.connect(server.data_dir / "modelkeep.db", timeout=30) as db:
        return {row[0] for row in db.execute("SELECT blob_key FROM versions")}


def temporary_files(server: Server) -> list[Path]:
    """Everything in the temp areas: the upload staging dir and the blob store's .tmp."""
    areas = (server.data_dir / "uploads", server.data_dir / "blobs" / ".tmp")
    return sorted(path for area in areas for path in area.iterdir())


def stored_blobs(server: Server) -> set[str]:
    return {path.name for path in (server.data_dir / "blobs").glob("??/*")}


def assert_no_leftovers(server: Server) -> None:
    assert temporary_files(server) == []
    assert stored_blobs(server) == referenced_blobs(server)


class ReplyDroppingProxy:
    """A TCP relay to the server that passes the TLS handshake both ways, then, once the client
    has sent ``request_bytes``, throws away every byte of the answer: for the client, the
    server dies before it replies."""

    def __init__(self, port: int, request_bytes: int) -> None:
        self._target = port
        self._request_bytes = request_bytes
        self._sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        client, _ = self._listener.accept()
        with client, socket.create_connection(("127.0.0.1", self._target)) as upstream:
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            pump.start()
            try:
                while chunk := upstream.recv(1 << 16):
                    if self._sent < self._request_bytes:
                        client.sendall(chunk)
            except OSError:
                pass
            client.shutdown(socket.SHUT_RDWR)
            pump.join(timeout=10)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while chunk := client.recv(1 << 16):
                upstream.sendall(chunk)
                self._sent += len(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._listener.close()


def test_a_kill_while_the_upload_streams_in_leaves_an_empty_temp_area(
    srv: Server, big: tuple[bytes, bytes]
) -> None:
    data, bundle = big
    before = versions(srv)
    half = len(data) // 2

    def body() -> Iterator[bytes]:
        yield data[:half]
        srv.kill()
        yield data[half:]

    with pytest.raises(httpx.TransportError), srv.client(srv.admin_key) as c:
        c.post(
            f"/api/v1/models/{MODEL}/versions",
            content=body(),
            headers={
                "Content-Type": "application/octet-stream",
                "Modelkeep-Signature": base64.b64encode(bundle).decode(),
            },
        )
    srv.start()
    assert versions(srv) == before
    assert_no_leftovers(srv)


def test_a_kill_while_the_blob_is_written_leaves_nothing_after_a_restart(
    srv: Server, big: tuple[bytes, bytes]
) -> None:
    data, bundle = big
    before = versions(srv)
    tmp = srv.data_dir / "blobs" / ".tmp"
    with ThreadPoolExecutor(1) as pool:
        pushed = pool.submit(post, srv.url, srv, data, bundle, "kill-while-sealing-1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not pushed.done():
            if any(p.stat().st_size >= 1 << 20 for p in tmp.iterdir()):
                break
            time.sleep(0.002)
        # The server is killed with the final blob half written.
        assert not pushed.done(), "the push finished before its blob was seen being written"
        assert list(tmp.iterdir()) != []
        srv.kill()
        with pytest.raises(httpx.TransportError):
            pushed.result(timeout=60)
    srv.start()
    assert versions(srv) == before
    assert_no_leftovers(srv)


def test_a_retry_after_a_kill_between_commit_and_reply_gets_the_version_made_before(
    srv: Server, big: tuple[bytes, bytes]
) -> None:
    data, bundle = big
    before = versions(srv)
    key = "kill-after-commit-0001"
    proxy = ReplyDroppingProxy(srv.port, len(data))
    try:
        with ThreadPoolExecutor(1) as pool:
            pushed = pool.submit(post, f"https://127.0.0.1:{proxy.port}", srv, data, bundle, key)
            deadline = time.monotonic() + 120
            while recorded_versions(srv) == len(before) and time.monotonic() < deadline:
                time.sleep(0.01)
            srv.kill()  # the version is committed; its answer never reached the client
            with pytest.raises(httpx.TransportError):
                pushed.result(timeout=60)
    finally:
        proxy.close()
    srv.start()
    made = versions(srv)
    assert len(made) == len(before) + 1
    number = max(made)

    retried = post(srv.url, srv, data, bundle, key)

    assert retried.status_code == 201, retried.text
    expected = (number, hashlib.sha256(data).hexdigest())
    assert (retried.json()["version"], retried.json()["sha256"]) == expected
    assert versions(srv) == made  # no duplicate
    assert_no_leftovers(srv)


def test_a_repeated_key_with_a_different_body_is_refused(srv: Server) -> None:
    key = "reused-key-0001"
    first = build_iris_onnx(seed=11)
    assert post(srv.url, srv, first, sign_bytes(first), key).status_code == 201
    before = versions(srv)
    other = build_iris_onnx(seed=12)

    r = post(srv.url, srv, other, sign_bytes(other), key)

    assert r.status_code == 409
    assert "Idempotency-Key was already used for a different upload" in r.json()["error"]
    assert versions(srv) == before


def test_concurrent_pushes_with_one_key_make_exactly_one_version(srv: Server) -> None:
    data = build_iris_onnx(seed=13)
    bundle = sign_bytes(data)
    before = versions(srv)
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda _: post(srv.url, srv, data, bundle, "concurrent-key-0001"), range(4))
        )
    assert [r.status_code for r in answers] == [201] * 4
    assert len({(r.json()["version"], r.json()["sha256"]) for r in answers}) == 1
    assert len(versions(srv)) == len(before) + 1


def test_the_cli_push_sends_a_key_and_its_version_is_listed_once(
    srv: Server, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(build_iris_onnx(seed=14))
    before = versions(srv)
    env = srv.cli_env()
    sign = tmp_path / "model.onnx.sig"
    sign.write_bytes(sign_bytes(path.read_bytes()))
    out = run_cli("push", MODEL, str(path), "--signature", str(sign), "--json", env=env)
    assert '"version"' in out.stdout
    assert len(versions(srv)) == len(before) + 1
