"""The registry: seals, stores and records versions, and opens them again for loading.

A push is all or nothing. The upload is re-sealed from its staged copy (see ``upload.py``) under
the version's own data key and written to the blob store under a fresh random name first; only
then does one transaction record the version, together with the caller's idempotency key if it
gave one. A crash before the commit leaves an unreferenced blob that ``collect_garbage`` removes;
no half-made version is ever visible, and a retried push finds the version its key made.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

from modelkeep.crypto import KeyService, associated_data_for, new_data_key
from modelkeep.crypto.sealed import SEGMENT_BUFFERS, Sealer, UnsealingReader, unseal_segments
from modelkeep.crypto.signing import TrustedKey, verify_digests
from modelkeep.errors import Conflict, IntegrityError, KeyServiceError, ModelRefused
from modelkeep.registry.blobs import BlobStore, ReadAhead, new_blob_key
from modelkeep.registry.intake import Writable, read_directory
from modelkeep.registry.records import VersionRecord, check_name
from modelkeep.registry.upload import Upload
from modelkeep.store.metadata import (
    MetadataStore,
    NewVersion,
    PushKey,
    PushKeyTaken,
    VersionDetails,
    VersionTaken,
)

log = logging.getLogger(__name__)

# Concurrent pushes of one model each lose the race at most this often before giving up.
_MAX_ATTEMPTS = 20
# Unreferenced blobs younger than this may belong to a push still in flight on another worker.
_GC_GRACE_S = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


_KEY_REUSED = (
    "this Idempotency-Key was already used for a different upload to this model; use a new key"
    " for a new push"
)
_CHUNK = 1 << 20


def _reseal(upload: Upload, key: bytes, associated_data: bytes, out: BinaryIO) -> int:
    """Copy the staged upload into ``out`` sealed under ``key``, one segment at a time."""
    sealer = Sealer(key, associated_data, out)
    reader = upload.reader()
    buffer = bytearray(_CHUNK)
    while count := reader.readinto(buffer):
        sealer.update(memoryview(buffer)[:count])
    return sealer.finish()


class Registry:
    """Models and their sealed versions, over a metadata store, a blob store and a key service."""

    def __init__(
        self,
        store: MetadataStore,
        blobs: BlobStore,
        keys: KeyService,
        *,
        clock: Callable[[], datetime] = _utcnow,
        staging_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.keys = keys
        self._clock = clock
        self.staging_dir = staging_dir

    def new_upload(self) -> Upload:
        """An empty upload staged in this registry's staging directory (see ``upload.py``)."""
        return Upload(self.staging_dir)

    def add_version(
        self,
        model: str,
        source: Upload | bytes,
        details: VersionDetails,
        *,
        uploaded_by: str,
        push_key: PushKey | None = None,
    ) -> int:
        """Seal ``source`` as the next version of ``model`` and record it; returns its number.

        The caller has already checked that the artifact is acceptable; the model must exist.
        With ``push_key``, a key already recorded for the same request returns the version it
        made (and this copy is dropped); for another request it raises Conflict.
        """
        check_name("model", model)
        if isinstance(source, bytes):
            with Upload.of(source, self.staging_dir) as upload:
                return self.add_version(
                    model, upload, details, uploaded_by=uploaded_by, push_key=push_key
                )
        upload = source
        digest = upload.sha256
        for _ in range(_MAX_ATTEMPTS):
            number = self.store.next_version_number(model)
            # 1. The associated data binds the ciphertext to (model, version, digest): a blob
            #    moved to another version, or a row pointing at another blob, will not open.
            associated_data = associated_data_for(model, number, digest)
            # 2. A fresh data key per version, wrapped by the key service under the same context.
            data_key = new_data_key()
            wrapped = self.keys.wrap(data_key, associated_data)
            blob_key = new_blob_key()
            self.blobs.put(blob_key, partial(_reseal, upload, data_key, associated_data))
            # 3. Only now the version becomes visible, in one transaction.
            try:
                self.store.add_version(
                    NewVersion(
                        model=model,
                        number=number,
                        sha256=digest,
                        size=upload.size,
                        uploaded_by=uploaded_by,
                        created_at=self._clock(),
                        blob_key=blob_key,
                        wrapped_key=wrapped,
                        kek_id=self.keys.key_id,
                        details=details,
                        push_key=push_key,
                    )
                )
            except VersionTaken:
                self.blobs.delete(blob_key)
                continue
            except PushKeyTaken as taken:
                # A concurrent or earlier push with this key committed first: its version
                # stands, this copy goes.
                self.blobs.delete(blob_key)
                assert push_key is not None
                if taken.request_sha256 != push_key.request_sha256:
                    raise Conflict(_KEY_REUSED) from None
                return taken.number
            except BaseException:
                self.blobs.delete(blob_key)
                raise
            return number
        raise Conflict("too many concurrent pushes of this model; try again")

    def pushed_with(self, model: str, push_key: PushKey) -> int | None:
        """The version an earlier push with this key made, if it is still remembered.

        Raises Conflict when that push sent a different request under the same key.
        """
        found = self.store.find_push(model, push_key.principal, push_key.key, now=self._clock())
        if found is None:
            return None
        number, request_sha256 = found
        if request_sha256 != push_key.request_sha256:
            raise Conflict(_KEY_REUSED)
        return number

    def open_version(self, version: VersionRecord) -> bytes:
        """Decrypt a version into memory and check its digest; plaintext never touches disk.

        Raises IntegrityError naming the model and version when anything fails to verify, and
        KeyServiceError naming them when the key service cannot unwrap the data key (down,
        sealed, refusing, or no longer holding the KEK that wrapped it).
        """
        whole = io.BytesIO()
        self._unseal(version, whole)
        # BytesIO grows its one buffer in place and hands it over without copying it.
        return whole.getvalue()

    def open_verified(
        self, version: VersionRecord, trusted: Sequence[TrustedKey], *, require_signature: bool
    ) -> bytes:
        """The bytes a runtime loads for ``version``, verified as if it had just been pushed
        (:meth:`read_verified` into memory)."""
        whole = io.BytesIO()
        self.read_verified(version, trusted, require_signature=require_signature, into=whole)
        return whole.getvalue()

    def read_verified(
        self,
        version: VersionRecord,
        trusted: Sequence[TrustedKey],
        *,
        require_signature: bool,
        into: Writable,
    ) -> None:
        """Write the bytes a runtime loads for ``version`` into ``into`` (a file of the model
        file's size, or one that grows), verified as if the version had just been pushed.

        ``trusted`` are the model's publisher keys as they are now, ``require_signature`` its
        rule now. What was written must not be used unless this returns. Raises IntegrityError
        (and KeyServiceError) as :meth:`open_version` does, and IntegrityError when the
        signature no longer verifies.
        """
        where = f"model '{version.model}' version {version.number}"
        # 1. Unwrap the data key, decrypt, and check the plaintext digest.
        if version.layout == "directory":
            digests = self._read_directory(version, into)
        else:
            self._unseal(version, into)
            # _unseal has just checked that the plaintext has this digest, so the signature
            # check below uses it instead of hashing the bytes a second time.
            digests = {version.file_name: version.sha256}
        # 2. The signature, against the model's trusted publishers as they are now: a row or
        #    blob changed behind the server's back does not verify.
        if version.bundle is not None:
            try:
                verified = verify_digests(digests, version.bundle, trusted)
            except ModelRefused as exc:
                log.error("%s: signature verification failed at load", where)
                raise IntegrityError(f"{where} failed signature verification at load") from exc
            if verified.signer != version.signer:
                raise IntegrityError(f"{where} is signed by a key other than the one recorded")
        elif require_signature:
            log.error("%s: no signature, but the model requires one", where)
            raise IntegrityError(f"{where} has no signature but its model requires one")

    def _unseal(self, version: VersionRecord, out: Writable) -> None:
        """Write the version's plaintext to ``out`` as it streams from the blob store, one
        verified segment at a time, and check its digest at the end (see :meth:`open_version`
        for what it raises)."""
        with self._opening(version) as (data_key, associated_data):
            # Each segment is hashed once, here; the signature check (read_verified) uses this
            # digest instead of hashing the plaintext again. SHA-256 and the write are the
            # costliest steps; each runs on a thread of its own (hashlib, and a write to a
            # tmpfs file, let go of the GIL), in order, while this one fetches and decrypts the
            # next segments. A segment's buffer is decrypted into again SEGMENT_BUFFERS
            # segments later, so both threads must be done with it by then: the wait below.
            digest = hashlib.sha256()
            in_flight: deque[tuple[Future[object], Future[object]]] = deque()
            with (
                self.blobs.open(version.blob_key) as stored,
                ReadAhead(stored) as src,
                ThreadPoolExecutor(1, thread_name_prefix="modelkeep-sha256") as hasher,
                ThreadPoolExecutor(1, thread_name_prefix="modelkeep-write") as writer,
            ):
                for segment in unseal_segments(
                    src, data_key, associated_data, expected_size=version.size
                ):
                    in_flight.append(
                        (hasher.submit(digest.update, segment), writer.submit(out.write, segment))
                    )
                    if len(in_flight) == SEGMENT_BUFFERS:
                        _finished(in_flight.popleft())
                while in_flight:
                    _finished(in_flight.popleft())
            if digest.hexdigest() != version.sha256:
                raise IntegrityError("digest mismatch")

    def _read_directory(self, version: VersionRecord, into: Writable) -> dict[str, str]:
        """The digest of each file of a directory version's tar, read as it streams from the
        blob store; the model file is written to ``into`` as it passes, the rest only hashed.
        The whole tar's digest is checked at its end (see :meth:`open_version`)."""
        with (
            self._opening(version) as (data_key, associated_data),
            self.blobs.open(version.blob_key) as stored,
            ReadAhead(stored) as src,
            _HashingReader(
                UnsealingReader(src, data_key, associated_data, expected_size=version.size)
            ) as plaintext,
            io.BufferedReader(plaintext, _CHUNK) as tar_stream,
        ):
            digests = read_directory(tar_stream, version.file_name, into)
            while tar_stream.read(_CHUNK):  # the tar's end, so the whole blob is verified
                pass
            if plaintext.hexdigest() != version.sha256:
                raise IntegrityError("digest mismatch")
        return digests

    @contextmanager
    def _opening(self, version: VersionRecord) -> Iterator[tuple[bytes, bytes]]:
        """The version's data key and associated data, for a block that reads its blob; an
        IntegrityError in it names the version (logged), a key service failure too."""
        associated_data = associated_data_for(version.model, version.number, version.sha256)
        try:
            try:
                data_key = self.keys.unwrap(version.wrapped_key, associated_data)
            except KeyServiceError as exc:
                raise KeyServiceError(
                    f"model '{version.model}' version {version.number} cannot be loaded: "
                    f"{exc.message}",
                    retry_after=exc.retry_after,
                ) from exc
            yield data_key, associated_data
        except IntegrityError as exc:
            log.error(
                "integrity check failed for model %s version %s", version.model, version.number
            )
            raise IntegrityError(
                f"model '{version.model}' version {version.number} failed integrity verification"
                " and will not be loaded"
            ) from exc

    def collect_garbage(self, *, grace_s: float = _GC_GRACE_S) -> int:
        """Delete blobs no version references (left by a crash mid-push); returns how many."""
        referenced = self.store.blob_keys()
        removed = 0
        for key in list(self.blobs.keys(older_than_s=grace_s)):
            if key not in referenced:
                self.blobs.delete(key)
                removed += 1
        return removed


def _finished(jobs: tuple[Future[object], ...]) -> None:
    for job in jobs:
        job.result()


class _HashingReader(io.RawIOBase):
    """A sequential reader that hashes (SHA-256) everything read through it."""

    def __init__(self, src: io.RawIOBase) -> None:
        super().__init__()
        self._src = src
        self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._src.readinto(buffer) or 0
        self._digest.update(memoryview(buffer)[:count])
        return count

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._src.close()
        super().close()
