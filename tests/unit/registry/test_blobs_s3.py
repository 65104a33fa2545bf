"""The S3 blob store without a server: selection, settings checks, part handling, errors.

The store's behaviour against a real S3 server is in tests/integration/test_s3_blobs.py; here a
recording client shows what the store asks of S3 and how it answers failures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ResponseStreamingError
from pydantic import ValidationError

from modelkeep.errors import ConfigError, IntegrityError, Unavailable
from modelkeep.registry._s3 import S3BlobStore, s3_blob_store
from modelkeep.registry.blobs import FileBlobStore, blob_store_from
from modelkeep.settings import Settings

MiB = 1 << 20
PART = 5 * MiB
KEY = "ab" * 16


class RecordingClient:
    """The few S3 calls the store makes, recorded; ``fail_part`` makes that part fail."""

    def __init__(self, fail_part: int | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_part = fail_part
        self.in_flight = 0
        self.most_in_flight = 0
        self.parts_done = 0
        self._lock = threading.Lock()

    def put_object(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("put_object", len(kw["Body"])))
        return {}

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("create", kw["Key"]))
        return {"UploadId": "u1"}

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.02)  # long enough for the writer to fill the next part meanwhile
        with self._lock:
            self.in_flight -= 1
            self.parts_done += 1
            self.calls.append(("part", (kw["PartNumber"], len(kw["Body"]))))
        if kw["PartNumber"] == self.fail_part:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return {"ETag": f'"e{kw["PartNumber"]}"'}

    def complete_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("complete", kw["MultipartUpload"]["Parts"]))
        return {}

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("abort", kw["UploadId"]))
        return {}

    def head_object(self, **kw: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")

    def delete_object(self, **kw: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObject")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def store_over(client: RecordingClient) -> S3BlobStore:
    return S3BlobStore(client, "bucket", "sealed", part_size=PART)  # type: ignore[arg-type]


def writes(
    total: int, piece: int = 3 * MiB + 1, client: RecordingClient | None = None
) -> Callable[[BinaryIO], None]:
    """Writes ``total`` bytes; with ``client``, records in ``held`` the most bytes written but
    not yet uploaded (what the store holds in memory)."""

    def write(out: BinaryIO) -> None:
        left = total
        while left:
            size = min(piece, left)
            assert out.write(b"\0" * size) == size
            left -= size
            if client is not None:
                held.append(total - left - client.parts_done * PART)

    held: list[int] = []
    write.held = held  # type: ignore[attr-defined]
    return write


def test_a_blob_smaller_than_a_part_is_one_put() -> None:
    client = RecordingClient()
    store_over(client).put(KEY, writes(PART - 1))
    assert client.calls == [("put_object", PART - 1)]


def test_a_larger_blob_goes_in_parts_holding_at_most_three_in_memory() -> None:
    client = RecordingClient()
    writer = writes(6 * PART + 10, client=client)
    store_over(client).put(KEY, writer)
    assert client.names()[0] == "create"
    assert sorted(p for name, p in client.calls if name == "part") == [
        *[(n, PART) for n in range(1, 7)],
        (7, 10),
    ]
    assert client.calls[-1] == (
        "complete",
        [{"ETag": f'"e{n}"', "PartNumber": n} for n in range(1, 8)],
    )
    assert client.most_in_flight == 2
    # Two parts uploading and one filling, never the whole blob.
    assert max(writer.held) <= 3 * PART  # type: ignore[attr-defined]
    assert ("create", f"sealed/{KEY}") in client.calls


def test_a_failed_part_aborts_the_upload_and_is_unavailable() -> None:
    client = RecordingClient(fail_part=2)
    with pytest.raises(Unavailable, match="the blob store is unavailable; try again later"):
        store_over(client).put(KEY, writes(6 * PART))
    assert client.names().count("abort") == 1
    assert "complete" not in client.names()


def test_a_failing_writer_aborts_the_upload() -> None:
    client = RecordingClient()

    def broken(out: BinaryIO) -> None:
        out.write(b"\0" * (2 * PART))
        raise RuntimeError("the sealer failed")

    with pytest.raises(RuntimeError, match="the sealer failed"):
        store_over(client).put(KEY, broken)
    assert client.names()[-1] == "abort"
    assert "complete" not in client.names()


def test_a_missing_object_is_an_integrity_error_and_a_refusal_is_unavailable() -> None:
    store = store_over(RecordingClient())
    with pytest.raises(IntegrityError, match="sealed artifact is missing"):
        store.open(KEY)
    with pytest.raises(Unavailable) as caught:
        store.delete(KEY)
    assert caught.value.retry_after is not None


def test_keys_are_checked_before_any_request() -> None:
    client = RecordingClient()
    with pytest.raises(ValueError, match="invalid blob key"):
        store_over(client).put("../etc/passwd", writes(1))
    assert client.calls == []


def test_the_local_directory_stays_the_default(tmp_path: Path) -> None:
    store = blob_store_from(Settings(data_dir=tmp_path), tmp_path / "blobs")
    assert isinstance(store, FileBlobStore)
    assert store.root == tmp_path / "blobs"


@pytest.mark.parametrize(
    "url", ["s3://", "s3://ab", "s3://Upper/x", "file:///tmp/x", "s3://bucket/a b", "http://b/x"]
)
def test_a_blob_url_that_names_no_bucket_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, blob_url=url)


def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, credentials: bool) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # No shared files and no instance metadata: only the environment can give credentials.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


@pytest.mark.parametrize(
    "endpoint", ["http://10.0.0.5:9000", "http://s3.example.com", "ftp://127.0.0.1", "https://"]
)
def test_plain_http_is_refused_off_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    aws(monkeypatch, tmp_path, credentials=True)
    settings = Settings(data_dir=tmp_path, blob_url="s3://bucket/x", blob_s3_endpoint_url=endpoint)
    with pytest.raises(ConfigError, match="https"):
        s3_blob_store(settings)


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:8333", "http://localhost:9000", "http://[::1]:9000", None]
)
def test_loopback_http_https_and_aws_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str | None
) -> None:
    aws(monkeypatch, tmp_path, credentials=True)
    settings = Settings(
        data_dir=tmp_path,
        blob_url="s3://my-bucket/models/prod",
        blob_s3_endpoint_url=endpoint,
        blob_s3_region="eu-west-1",
    )
    store = blob_store_from(settings, tmp_path / "blobs")
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == ("my-bucket", "models/prod/")


def test_no_credentials_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws(monkeypatch, tmp_path, credentials=False)
    settings = Settings(data_dir=tmp_path, blob_url="s3://bucket")
    with pytest.raises(ConfigError, match="no credentials"):
        s3_blob_store(settings)


def test_settings_hold_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws(monkeypatch, tmp_path, credentials=True)
    settings = Settings(data_dir=tmp_path, blob_url="s3://bucket/x")
    assert "wJalrXUtnFEMI" not in repr(settings)
    assert "AKIDEXAMPLE" not in settings.model_dump_json()


class FlakyBody:
    """An object body that breaks after ``breaks_after`` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, breaks_after: int | None) -> None:
        self.data = data
        self.at = 0
        self.breaks_after = breaks_after

    def read(self, amount: int) -> bytes:
        if self.breaks_after is not None and self.at >= self.breaks_after:
            raise ResponseStreamingError(error="connection reset")
        end = self.at + amount
        if self.breaks_after is not None:
            end = min(end, self.breaks_after)
        chunk = self.data[self.at : end]
        self.at += len(chunk)
        return chunk

    def close(self) -> None:
        pass


class ObjectClient:
    """One stored object; records every GET's range; the first body breaks midway."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[str, str]] = []

    def head_object(self, **kw: Any) -> dict[str, Any]:
        return {"ContentLength": len(self.data), "ETag": '"v1"'}

    def get_object(self, **kw: Any) -> dict[str, Any]:
        self.ranges.append((kw["Range"], kw["IfMatch"]))
        start = int(kw["Range"].removeprefix("bytes=").removesuffix("-"))
        breaks = 3 * MiB if len(self.ranges) == 1 else None
        return {"Body": FlakyBody(self.data[start:], breaks)}


def test_a_read_resumes_where_a_broken_body_stopped_and_seeks_are_ranged_gets() -> None:
    data = bytes(range(256)) * (20 * MiB // 256)
    client = ObjectClient(data)
    store = S3BlobStore(client, "bucket", part_size=PART)  # type: ignore[arg-type]
    with store.open(KEY) as blob:
        assert blob.seek(0, 2) == len(data)  # learning the size costs no GET
        blob.seek(0)
        assert blob.read() == data
        blob.seek(7 * MiB + 3)
        assert blob.read(5) == data[7 * MiB + 3 : 7 * MiB + 8]
    assert client.ranges == [
        ("bytes=0-", '"v1"'),
        (f"bytes={3 * MiB}-", '"v1"'),
        (f"bytes={7 * MiB + 3}-", '"v1"'),
    ]


class ChangedObjectClient(ObjectClient):
    def get_object(self, **kw: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "GetObject")


class ShortBodyClient(ObjectClient):
    def get_object(self, **kw: Any) -> dict[str, Any]:
        self.ranges.append((kw["Range"], kw["IfMatch"]))
        return {"Body": FlakyBody(b"", None)}


@pytest.mark.parametrize(("client_type", "gets"), [(ChangedObjectClient, 0), (ShortBodyClient, 3)])
def test_an_object_that_changed_or_keeps_ending_early_is_unavailable(
    client_type: type[ObjectClient], gets: int
) -> None:
    client = client_type(b"x" * MiB)
    store = S3BlobStore(client, "bucket", part_size=PART)  # type: ignore[arg-type]
    with store.open(KEY) as blob, pytest.raises(Unavailable):
        blob.read()
    assert len(client.ranges) == gets
