"""A blob store on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Ceph, R2...).

The store sees only sealed bytes under random names (``new_blob_key``): object names, sizes and
timestamps are all it can learn. Guarantees, as for the directory store:

- **All or nothing.** A blob becomes visible in one step: one ``PutObject`` for a blob smaller
  than a part, otherwise ``CompleteMultipartUpload``. A failed write aborts its multipart upload;
  one that a crash left behind is aborted by ``sweep_temporary`` when a server starts.
- **Streamed both ways.** A write holds at most a few parts in memory, never the whole blob; a
  read streams the object body and seeks with ranged GETs pinned to the object's ETag.
- **Fail closed.** Every client error is translated where it enters: a missing object is an
  IntegrityError (as a missing file is), anything else from the store (unreachable, refused,
  throttled, timed out) is Unavailable (503) with details only in the log.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, BinaryIO, NoReturn, cast
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from modelkeep.errors import ConfigError, IntegrityError, TooLarge, Unavailable
from modelkeep.registry.blobs import KEY_PATTERN, Writer, check_key

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from modelkeep.settings import Settings

__all__ = ["S3BlobStore", "s3_blob_store"]

log = logging.getLogger(__name__)

MiB = 1 << 20
# 16 MiB parts allow blobs up to 156 GiB within S3's 10,000 parts, and keep few requests per GiB.
PART_SIZE = 16 * MiB
_MAX_PARTS = 10_000
# S3's smallest part (but the last).
_MIN_PART_SIZE = 5 * MiB
# Parts uploading while the next one fills: memory is (in flight + 1) parts per write.
_PARTS_IN_FLIGHT = 2
# A read that breaks mid-body is resumed from where it stopped this many times.
_READ_ATTEMPTS = 3
_RETRY_AFTER_S = 5.0
_UNAVAILABLE = "the blob store is unavailable; try again later"
_MISSING = "sealed artifact is missing"


def s3_blob_store(settings: Settings) -> S3BlobStore:
    """The store ``settings.blob_url`` names; ConfigError if the settings cannot work."""
    import boto3
    from botocore.config import Config

    assert settings.blob_url is not None
    where = urlsplit(settings.blob_url)
    endpoint = settings.blob_s3_endpoint_url
    if endpoint is not None:
        _check_endpoint(endpoint)
    session = boto3.session.Session(region_name=settings.blob_s3_region)
    # Checked now so that a missing credential is a clear start-up error, not a 503 later.
    if session.get_credentials() is None:
        raise ConfigError(
            "the S3 blob store has no credentials: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the process a role"
        )
    client = session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=16,
            s3={"addressing_style": settings.blob_s3_addressing_style},
            # Every sealed segment is authenticated (AES-GCM) and its digest checked at load:
            # the store's own checksums would cost CPU and protect nothing more.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    return S3BlobStore(client, where.netloc, where.path.strip("/"))


def _check_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ConfigError(
        "the S3 endpoint must be an https:// URL (plain http is accepted only on loopback)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _store_errors(action: str) -> Iterator[None]:
    """Translate what the S3 client raises into the error tree: fail closed, say little."""
    try:
        yield
    except ClientError as exc:
        _raise_unavailable(action, exc)
    except BotoCoreError as exc:
        _raise_unavailable(action, exc)


def _raise_unavailable(action: str, exc: Exception) -> NoReturn:
    detail = _error_code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    log.error("blob store: %s failed (%s)", action, detail)
    raise Unavailable(_UNAVAILABLE, retry_after=_RETRY_AFTER_S) from exc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")


class S3BlobStore:
    """Sealed blobs as objects named ``<prefix>/<key>`` in one bucket."""

    def __init__(
        self, client: S3Client, bucket: str, prefix: str = "", *, part_size: int = PART_SIZE
    ) -> None:
        if part_size < _MIN_PART_SIZE:
            raise ValueError("part_size must be at least 5 MiB")
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, write: Writer) -> None:
        """Store what ``write`` produces; visible only once wholly stored (see module doc)."""
        with _PartWriter(self, self._name(key)) as out:
            # A raw stream that accepts every byte it is given: all a writer needs of BinaryIO.
            write(cast(BinaryIO, out))

    def open(self, key: str) -> io.BufferedIOBase:
        """A buffered, seekable reader over the object; IntegrityError if it is missing."""
        name = self._name(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                raise IntegrityError(_MISSING) from exc
            _raise_unavailable("open", exc)
        except BotoCoreError as exc:
            _raise_unavailable("open", exc)
        raw = _ObjectReader(self, name, head["ContentLength"], head["ETag"])
        return io.BufferedReader(raw, buffer_size=MiB)

    def delete(self, key: str) -> None:
        """Remove a blob; deleting a missing one is not an error (S3 semantics)."""
        with _store_errors("delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def keys(self, *, older_than_s: float = 0.0) -> Iterator[str]:
        """Blob keys under the prefix last written at least ``older_than_s`` seconds ago."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        with _store_errors("list"):
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    if KEY_PATTERN.fullmatch(key) and item["LastModified"] <= cutoff:
                        yield key

    def sweep_temporary(self, *, older_than_s: float) -> int:
        """Abort multipart uploads begun ``older_than_s`` ago or earlier; returns how many.

        A crash mid-push leaves its parts stored (and billed) but never visible; this removes
        them. Call it with a bound longer than any push can take.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        aborted = 0
        with _store_errors("sweep"):
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] <= cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted


class _PartWriter(io.RawIOBase):
    """A writable stream that uploads every ``part_size`` bytes as one part of a multipart upload.

    Hand-written because the blob store's writer pushes bytes into a stream while boto3's
    managed transfers (``upload_fileobj``) pull them from a readable one; bridging the two would
    take a pipe and a thread per write and hide when a part is uploaded.
    """

    def __init__(self, store: S3BlobStore, name: str) -> None:
        super().__init__()
        self._store = store
        self._name = name
        self._buffer = bytearray(store.part_size)
        self._filled = 0
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[Future[CompletedPartTypeDef]] = []
        self._pool: ThreadPoolExecutor | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            size = min(len(view) - done, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + size] = view[done : done + size]
            self._filled += size
            done += size
            if self._filled == len(self._buffer):
                self._send_part()
        self._written += done
        return done

    def _send_part(self) -> None:
        if self._upload_id is None:
            with _store_errors("upload"):
                created = self._store.client.create_multipart_upload(
                    Bucket=self._store.bucket, Key=self._name
                )
            self._upload_id = created["UploadId"]
            self._pool = ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix="modelkeep-s3")
        # Keep at most _PARTS_IN_FLIGHT uploads running: this is what bounds memory.
        running = [part for part in self._parts if not part.done()]
        if len(running) >= _PARTS_IN_FLIGHT:
            wait(running[:1])
        for part in self._parts:
            if part.done():
                part.result()  # a failed part fails the write now, not at the end
        body, self._buffer = self._buffer, bytearray(self._store.part_size)
        self._filled = 0
        self._submit(body)

    def _submit(self, body: bytes | bytearray) -> None:
        assert self._pool is not None
        number = len(self._parts) + 1
        if number > _MAX_PARTS:
            raise TooLarge("the artifact is larger than the blob store accepts")
        self._parts.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytes | bytearray) -> CompletedPartTypeDef:
        assert self._upload_id is not None
        with _store_errors("upload"):
            sent = self._store.client.upload_part(
                Bucket=self._store.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                PartNumber=number,
                # botocore takes a bytearray as it is (validate.py); the stubs say only bytes.
                Body=cast(bytes, body),
            )
        return {"ETag": sent["ETag"], "PartNumber": number}

    def _commit(self) -> None:
        """Make the object visible: one PutObject, or the last part and the completion."""
        client, bucket = self._store.client, self._store.bucket
        if self._upload_id is None:
            with _store_errors("upload"):
                client.put_object(Bucket=bucket, Key=self._name, Body=self._rest())
            return
        if self._filled:
            self._submit(self._rest())
        parts = [part.result() for part in self._parts]
        with _store_errors("upload"):
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._name,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )

    def _rest(self) -> bytes:
        return bytes(memoryview(self._buffer)[: self._filled])

    def _abort(self) -> None:
        """Drop every uploaded part: after an abort nothing of this write is stored."""
        if self._upload_id is None:
            return
        # Parts still uploading could land after the abort; S3 asks to wait for them first.
        wait(self._parts)
        with suppress(ClientError, BotoCoreError):
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._name, UploadId=self._upload_id
            )

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            if kind is None:
                self._commit()
        except BaseException:
            self._abort()
            raise
        else:
            if kind is not None:
                self._abort()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._buffer = bytearray()
            super().close()


class _ObjectReader(io.RawIOBase):
    """A seekable raw stream over one object: sequential reads share one streaming GET.

    Seeking only moves the position; the next read opens a ranged GET from there, pinned to the
    ETag seen at open (a changed object answers 412 and reads as unavailable, never as a mix).
    """

    def __init__(self, store: S3BlobStore, name: str, size: int, etag: str) -> None:
        super().__init__()
        self._store = store
        self._name = name
        self._size = size
        self._etag = etag
        self._position = 0
        self._body: StreamingBody | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError("negative seek position")
        if position != self._position:
            self._drop_body()
            self._position = position
        return position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        for attempt in range(1, _READ_ATTEMPTS + 1):
            try:
                data = self._open_body().read(wanted)
            except ClientError as exc:  # refused (or the object changed): retrying won't help
                self._drop_body()
                _raise_unavailable("read", exc)
            except BotoCoreError as exc:  # the connection broke: resume from the position
                self._drop_body()
                if attempt == _READ_ATTEMPTS:
                    _raise_unavailable("read", exc)
                time.sleep(0.1 * attempt)
                continue
            if not data:  # the body ended before the object's size: resume from here
                self._drop_body()
                continue
            buffer[: len(data)] = data
            self._position += len(data)
            return len(data)
        log.error("blob store: read failed (body ended early)")
        raise Unavailable(_UNAVAILABLE, retry_after=_RETRY_AFTER_S)

    def _open_body(self) -> StreamingBody:
        if self._body is None:
            response = self._store.client.get_object(
                Bucket=self._store.bucket,
                Key=self._name,
                Range=f"bytes={self._position}-",
                IfMatch=self._etag,
            )
            self._body = response["Body"]
        return self._body

    def _drop_body(self) -> None:
        if self._body is not None:
            with suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()
