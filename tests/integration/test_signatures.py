"""Signed models over real HTTPS: what a push must prove, and what every load checks again."""

from __future__ import annotations

import base64
import io
import sqlite3
import tarfile
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import Server, ensure_model, init_server, publisher_key, push, sign_bytes
from safetensors.numpy import save

from modelkeep.crypto.signing import generate_signing_key, sign_path
from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration

OCTETS = {"Content-Type": "application/octet-stream"}


def infer(server: Server, model: str, version: int | None = None) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}]
    }
    with server.client(server.admin_key) as c:
        return c.post(path, json=body)


def raw_push(
    server: Server, model: str, data: bytes, bundle: bytes | None, **params: str
) -> httpx.Response:
    headers = dict(OCTETS)
    if bundle is not None:
        headers["Modelkeep-Signature"] = base64.b64encode(bundle).decode()
    with server.client(server.admin_key) as c:
        return c.post(
            f"/api/v1/models/{model}/versions",
            params={"filename": "model.onnx", **params},
            content=data,
            headers=headers,
        )


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def sign_directory(files: dict[str, bytes], key: Path | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "model"
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        sign_path(root, key or publisher_key()[0], Path(folder) / "model.sig")
        return (Path(folder) / "model.sig").read_bytes()


@pytest.fixture(scope="module")
def iris() -> bytes:
    return build_iris_onnx()


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("other-publisher")
    generate_signing_key(folder / "other.key", folder / "other.pub")
    return folder / "other.key"


def test_a_good_signature_is_accepted_and_its_signer_recorded(server: Server, iris: bytes) -> None:
    r = push(server, "good", iris)
    assert r.status_code == 201, r.text
    fingerprint = r.json()["signer"]
    assert fingerprint.startswith("sha256:")
    with server.client(server.admin_key) as c:
        model = c.get("/api/v1/models/good").json()
    assert (model["require_signature"], model["publishers"]) == (True, [fingerprint])
    assert infer(server, "good").status_code == 200


def test_an_unsigned_push_is_refused_by_default(server: Server, iris: bytes) -> None:
    ensure_model(server, "unsigned")
    r = raw_push(server, "unsigned", iris, None)
    assert r.status_code == 422, r.text
    assert "requires a signature" in r.json()["error"]


def test_a_model_without_publishers_refuses_every_push(server: Server, iris: bytes) -> None:
    with server.client(server.admin_key) as c:
        assert c.put("/api/v1/models/lonely", json={}).status_code == 201
    r = raw_push(server, "lonely", iris, sign_bytes(iris))
    assert r.status_code == 422, r.text
    assert "trusted" in r.json()["error"]


def test_a_push_to_a_missing_model_is_404(server: Server, iris: bytes) -> None:
    r = raw_push(server, "never-created", iris, sign_bytes(iris))
    assert r.status_code == 404, r.text


def test_a_signature_by_an_untrusted_key_is_refused(
    server: Server, iris: bytes, other_key: Path
) -> None:
    ensure_model(server, "wrongkey")
    r = raw_push(server, "wrongkey", iris, sign_bytes(iris, key=other_key))
    assert r.status_code == 422, r.text
    assert "versions" not in r.json()


def test_a_tampered_file_is_refused(server: Server, iris: bytes) -> None:
    ensure_model(server, "tampered")
    bundle = sign_bytes(iris)
    tampered = bytearray(iris)
    tampered[len(tampered) // 2] ^= 0x01
    r = raw_push(server, "tampered", bytes(tampered), bundle)
    assert r.status_code == 422, r.text


def test_a_signature_made_for_another_model_is_refused(server: Server, iris: bytes) -> None:
    ensure_model(server, "swapped")
    other = build_iris_onnx(seed=7)
    r = raw_push(server, "swapped", iris, sign_bytes(other))
    assert r.status_code == 422, r.text


def test_a_signed_directory_is_accepted(server: Server, iris: bytes) -> None:
    # Companion files must scan as safe too: here a safetensors file beside the ONNX model.
    companion = save({"scale": np.ones(4, dtype=np.float32)})
    files = {"model.onnx": iris, "extras/scale.safetensors": companion}
    ensure_model(server, "folder")
    r = raw_push(server, "folder", tar_of(files), sign_directory(files), layout="directory")
    assert r.status_code == 201, r.text
    assert (r.json()["layout"], r.json()["file_name"]) == ("directory", "model.onnx")
    assert infer(server, "folder").status_code == 200


def test_a_directory_with_an_unidentifiable_companion_is_refused(
    server: Server, iris: bytes
) -> None:
    files = {"model.onnx": iris, "README.txt": b"iris classifier\n"}
    ensure_model(server, "readme")
    r = raw_push(server, "readme", tar_of(files), sign_directory(files), layout="directory")
    assert r.status_code == 422, r.text
    assert "README.txt" in r.json()["error"]
    assert r.json()["report"]["verdict"] == "error"


def test_a_directory_with_an_extra_unsigned_file_is_refused(server: Server, iris: bytes) -> None:
    signed = {"model.onnx": iris}
    shipped = {**signed, "extra.txt": b"not signed"}
    ensure_model(server, "extra")
    r = raw_push(server, "extra", tar_of(shipped), sign_directory(signed), layout="directory")
    assert r.status_code == 422, r.text
    assert "extra.txt" in r.json()["error"]


def test_a_directory_with_a_symlink_is_refused(server: Server, iris: bytes) -> None:
    files = {"model.onnx": iris}
    ensure_model(server, "linked")
    data = tar_of(files, links={"passwd": "/etc/passwd"})
    r = raw_push(server, "linked", data, sign_directory(files), layout="directory")
    assert r.status_code == 422, r.text
    assert "link" in r.json()["error"]


def test_unsigned_pushes_when_an_admin_allows_them_are_flagged(server: Server, iris: bytes) -> None:
    with server.client(server.admin_key) as c:
        r = c.put("/api/v1/models/lax", json={"require_signature": False})
        assert r.status_code == 201, r.text
        assert c.get("/api/v1/models").json()["models"][0] is not None
        listed = {m["name"]: m for m in c.get("/api/v1/models").json()["models"]}
    assert listed["lax"]["require_signature"] is False
    r = raw_push(server, "lax", iris, None)
    assert (r.status_code, r.json()["signer"]) == (201, None)
    assert infer(server, "lax").status_code == 200


def _db(server: Server) -> sqlite3.Connection:
    return sqlite3.connect(server.data_dir / "modelkeep.db")


def test_a_blob_replaced_on_disk_is_refused_at_the_next_load(tmp_path: Path, iris: bytes) -> None:
    srv = init_server(tmp_path)
    srv.start()
    try:
        assert push(srv, "victim", iris).status_code == 201
        assert push(srv, "victim", build_iris_onnx(seed=3)).status_code == 201
        assert infer(srv, "victim", 1).status_code == 200
    finally:
        srv.stop()
    with _db(srv) as db:
        keys = dict(db.execute("SELECT number, blob_key FROM versions ORDER BY number").fetchall())
    blob = {n: srv.data_dir / "blobs" / k[:2] / k for n, k in keys.items()}
    blob[1].write_bytes(blob[2].read_bytes())  # version 2's sealed bytes under version 1's name
    srv.start()
    try:
        r = infer(srv, "victim", 1)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == (
            "model 'victim' version 1 failed integrity verification and will not be loaded"
        )
        assert infer(srv, "victim", 2).status_code == 200  # the others keep serving
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_a_database_row_changed_behind_the_servers_back_is_refused(
    tmp_path: Path, iris: bytes
) -> None:
    srv = init_server(tmp_path)
    srv.start()
    try:
        assert push(srv, "row", iris).status_code == 201
        assert push(srv, "row", build_iris_onnx(seed=4)).status_code == 201
    finally:
        srv.stop()
    with _db(srv) as db:
        # Strip version 1's signature, and give version 2 version 1's digest.
        db.execute("UPDATE versions SET bundle = NULL, signer = NULL WHERE number = 1")
        sha1 = db.execute("SELECT sha256 FROM versions WHERE number = 1").fetchone()[0]
        db.execute("UPDATE versions SET sha256 = ? WHERE number = 2", (sha1,))
    srv.start()
    try:
        r1, r2 = infer(srv, "row", 1), infer(srv, "row", 2)
        assert (r1.status_code, r2.status_code) == (503, 503), (r1.text, r2.text)
        assert "model 'row' version 1" in r1.json()["error"]
        assert "model 'row' version 2" in r2.json()["error"]
    finally:
        srv.stop()
