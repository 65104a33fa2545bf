"""The S3 blob store against a real S3 server (SeaweedFS, started here on free loopback ports).

Put, read (streamed and seeking), delete, list; multipart for blobs over the part size; an
interrupted upload leaves no object and no pending upload; garbage collection; an unreachable
or refusing store is a clear 503-class error; and a real `modelkeep serve` keeping its sealed
models in the bucket across a restart, with no model plaintext in any object.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest
from harness import MODELKEEP, Server, free_port, init_server, push

from modelkeep.crypto import InMemoryKeyService
from modelkeep.errors import IntegrityError, Unavailable
from modelkeep.registry._s3 import S3BlobStore, s3_blob_store
from modelkeep.registry.registry import Registry
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.settings import Settings
from modelkeep.store.metadata import MetadataStore, VersionDetails
from modelkeep.testing import iris_rows
from modelkeep.testing_seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration

BUCKET = "modelkeep-test"
MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part: multipart tests stay small


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server (master, volume, filer, S3) and its bucket for the whole session."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def prefix() -> str:
    """Each test keeps its blobs under a prefix of its own (a new bucket takes seconds)."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def aws_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS chain as a deployment would set it: credentials in the environment only."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def settings_for(seaweedfs: SeaweedFS, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        blob_url=f"s3://{BUCKET}/{prefix}",
        blob_s3_endpoint_url=seaweedfs.endpoint_url,
        blob_s3_addressing_style="path",
    )


@pytest.fixture
def store(seaweedfs: SeaweedFS, prefix: str, tmp_path: Path, aws_env: None) -> S3BlobStore:
    built = s3_blob_store(settings_for(seaweedfs, prefix, tmp_path))
    return S3BlobStore(built.client, built.bucket, prefix, part_size=PART)


def pending_uploads(store: S3BlobStore) -> list[str]:
    listed = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


def write_bytes(data: bytes, piece: int = 100_000) -> Callable[[BinaryIO], None]:
    """A writer that hands ``data`` over in uneven pieces, as a streaming sealer would."""

    def write(out: BinaryIO) -> None:
        for start in range(0, len(data), piece):
            out.write(data[start : start + piece])

    return write


def test_put_open_delete_and_list(store: S3BlobStore) -> None:
    key = "a1" * 16
    store.put(key, write_bytes(b"sealed bytes " * 1000))
    with store.open(key) as blob:
        assert blob.read() == b"sealed bytes " * 1000
    assert list(store.keys()) == [key]
    # Stored under the prefix, as the key alone.
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    assert [item["Key"] for item in listed["Contents"]] == [f"{store.prefix}{key}"]
    store.delete(key)
    store.delete(key)  # deleting a missing blob is not an error
    assert list(store.keys()) == []
    with pytest.raises(IntegrityError, match="sealed artifact is missing"):
        store.open(key)


def test_keys_skips_blobs_younger_than_the_bound(store: S3BlobStore) -> None:
    store.put("b2" * 16, write_bytes(b"x"))
    assert list(store.keys(older_than_s=3600)) == []
    assert list(store.keys(older_than_s=0)) == ["b2" * 16]


def test_a_blob_over_the_part_size_is_a_multipart_upload_read_back_streaming(
    store: S3BlobStore,
) -> None:
    data = os.urandom(2 * PART + 12345)
    key = "c3" * 16
    store.put(key, write_bytes(data, piece=MiB + 7))
    head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
    # S3 names a multipart object's ETag "<md5 of part md5s>-<parts>": three parts were sent.
    assert (head["ContentLength"], head["ETag"].strip('"').rsplit("-", 1)[1]) == (len(data), "3")
    with store.open(key) as blob:
        assert blob.seekable()
        assert blob.seek(0, io.SEEK_END) == len(data)
        assert blob.seek(PART - 10) == PART - 10
        assert blob.read(20) == data[PART - 10 : PART + 10]  # across a part boundary
        blob.seek(0)
        digest = hashlib.sha256()
        while chunk := blob.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert pending_uploads(store) == []


def test_a_blob_of_exactly_one_part_round_trips(store: S3BlobStore) -> None:
    data = os.urandom(PART)
    store.put("d4" * 16, write_bytes(data, piece=PART))
    with store.open("d4" * 16) as blob:
        assert blob.read() == data


class Interrupted(Exception):
    pass


def test_an_interrupted_upload_leaves_nothing_visible_and_nothing_pending(
    store: S3BlobStore,
) -> None:
    def fails_midway(out: BinaryIO) -> None:
        for _ in range(12):  # two parts sent, a third filling
            out.write(os.urandom(MiB))
        raise Interrupted

    with pytest.raises(Interrupted):
        store.put("e5" * 16, fails_midway)
    with pytest.raises(IntegrityError):
        store.open("e5" * 16)
    assert list(store.keys()) == []
    assert pending_uploads(store) == []


def test_the_sweep_aborts_uploads_a_crash_left_behind(store: S3BlobStore) -> None:
    # What a process killed mid-push leaves: an upload begun, a part sent, never completed.
    name = store.prefix + "f6" * 16
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=name)
    store.client.upload_part(
        Bucket=store.bucket, Key=name, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 100
    )
    assert store.sweep_temporary(older_than_s=3600) == 0  # may still be a push in flight
    assert pending_uploads(store) == [name]
    assert store.sweep_temporary(older_than_s=0) == 1
    assert pending_uploads(store) == []
    assert list(store.keys()) == []


def test_garbage_collection_removes_only_unreferenced_blobs(
    store: S3BlobStore, tmp_path: Path
) -> None:
    metadata = MetadataStore(f"sqlite:///{tmp_path / 'modelkeep.db'}")
    metadata.migrate()
    registry = Registry(metadata, store, InMemoryKeyService())
    metadata.put_model("iris", actor="k1", now=datetime.now(UTC))
    signature = ModelSignature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "INT64", (-1,)),),
    )
    registry.add_version(
        "iris", b"model bytes", VersionDetails("onnx", signature), uploaded_by="k1"
    )
    stray = "0a" * 16  # a crash between storing the blob and recording the version
    store.put(stray, write_bytes(b"orphan"))
    assert registry.collect_garbage(grace_s=0) == 1
    (kept,) = store.keys()
    assert kept == metadata.snapshot().models["iris"].versions[1].blob_key
    assert registry.open_version(metadata.snapshot().models["iris"].versions[1]) == b"model bytes"
    metadata.close()


def test_an_unreachable_store_is_a_clear_unavailable_error(
    tmp_path: Path, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, blob_url="s3://nowhere/x", blob_s3_endpoint_url=closed)
    store = s3_blob_store(settings)
    for attempt in (
        lambda: store.put("ab" * 16, write_bytes(b"x")),
        lambda: store.open("ab" * 16),
        lambda: list(store.keys()),
        lambda: store.delete("ab" * 16),
    ):
        with pytest.raises(Unavailable) as caught:
            attempt()
        assert caught.value.message == "the blob store is unavailable; try again later"
        assert caught.value.retry_after is not None
    assert "EndpointConnectionError" in caplog.text


def test_wrong_credentials_are_refused_as_unavailable(
    seaweedfs: SeaweedFS, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = s3_blob_store(settings_for(seaweedfs, prefix, tmp_path))
    with pytest.raises(Unavailable):
        store.put("ab" * 16, write_bytes(b"x"))


def test_serve_refuses_to_start_when_the_store_is_unreachable(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    server = init_server(tmp_path)
    env = {
        **os.environ,
        **seaweedfs.env,
        "MODELKEEP_BLOB_URL": f"s3://{BUCKET}/x",
        "MODELKEEP_BLOB_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }
    args = ["serve", "--data-dir", str(server.data_dir), "--port", str(free_port())]
    proc = subprocess.run(
        [*MODELKEEP, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "error: the blob store is unavailable; try again later" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# -- a real server on the object store -------------------------------------------------------


@pytest.fixture
def s3_server(seaweedfs: SeaweedFS, prefix: str, tmp_path: Path) -> Iterator[Server]:
    server = init_server(tmp_path)
    server.extra_env = {
        **seaweedfs.env,
        "MODELKEEP_BLOB_URL": f"s3://{BUCKET}/{prefix}",
        "MODELKEEP_BLOB_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        "MODELKEEP_BLOB_S3_ADDRESSING_STYLE": "path",
    }
    server.start()
    try:
        yield server
    finally:
        server.stop()


def infer(server: Server) -> list[int]:
    body = {
        "inputs": [{"name": "input", "shape": [4, 4], "datatype": "FP32", "data": iris_rows(4)}]
    }
    with server.client(server.admin_key) as c:
        r = c.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200, r.text
    labels: list[int] = r.json()["outputs"][0]["data"]
    return labels


def test_a_server_keeps_its_sealed_models_in_the_bucket_across_a_restart(
    s3_server: Server, seaweedfs: SeaweedFS, prefix: str, iris_onnx: bytes
) -> None:
    r = push(s3_server, "iris", iris_onnx)
    assert r.status_code == 201, r.text
    labels = infer(s3_server)
    s3_server.stop()
    s3_server.start()
    assert infer(s3_server) == labels
    # The prefix holds the one sealed blob, under a random name; the data dir holds none.
    client = seaweedfs.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    names = [item["Key"] for item in listed["Contents"]]
    assert len(names) == 1
    assert re.fullmatch(f"{prefix}/[0-9a-f]{{32}}", names[0])
    assert [p for p in (s3_server.data_dir / "blobs").rglob("*") if p.is_file()] == []
    # No object holds any of the model's plaintext: take a distinctive slice of it.
    middle = len(iris_onnx) // 2
    needle = iris_onnx[middle : middle + 32]
    assert iris_onnx.count(needle) == 1
    for name in names:
        stored = client.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        assert len(stored) > len(iris_onnx)
        assert needle not in stored


def test_a_push_while_the_store_is_down_is_503_and_loaded_models_keep_serving(
    tmp_path: Path, iris_onnx: bytes
) -> None:
    from modelkeep.testing import build_iris_onnx

    # A store of its own, to stop: the session's serves the other tests.
    with SeaweedFS(tmp_path / "seaweedfs") as own:
        own.create_bucket("down")
        (tmp_path / "mk").mkdir()
        server = init_server(tmp_path / "mk")
        server.extra_env = {
            **own.env,
            "MODELKEEP_BLOB_URL": "s3://down/x",
            "MODELKEEP_BLOB_S3_ENDPOINT_URL": own.endpoint_url,
            "MODELKEEP_BLOB_S3_ADDRESSING_STYLE": "path",
        }
        server.start()
        try:
            assert push(server, "iris", iris_onnx).status_code == 201
            labels = infer(server)
            own.stop()
            r = push(server, "iris", build_iris_onnx(seed=1))
            assert (r.status_code, r.json()) == (
                503,
                {"error": "the blob store is unavailable; try again later"},
            )
            assert r.headers["Retry-After"] == "5"
            assert infer(server) == labels  # inference never touches the object store
            with server.client(server.admin_key) as c:
                listed = c.get("/api/v1/models/iris/versions").json()["versions"]
            assert [v["version"] for v in listed] == [1]
            assert "Traceback" not in server.log()
        finally:
            server.stop()


def test_a_port_taken_before_seaweedfs_binds_it_is_a_retry_on_fresh_ports(tmp_path: Path) -> None:
    # What failed CI once: a port chosen free was taken (there by a connection) before weed bound
    # it, and weed exited. Take one of the chosen ports on purpose, between choosing and starting.
    own = SeaweedFS(tmp_path / "seaweedfs")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own.ports["master.port.grpc"]))
        squatter.listen()
        squatted = squatter.getsockname()[1]
        with own:
            assert own.ports["master.port.grpc"] != squatted
            own.create_bucket("retried")
            assert "retried" in {b["Name"] for b in own.client().list_buckets()["Buckets"]}
