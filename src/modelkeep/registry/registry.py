"""The registry: seals, stores and records versions, and opens them again for loading.

A push is all or nothing. The sealed blob is written under a fresh random name first (temporary
file, fsync, rename); only then does one transaction record the version. A crash before the commit
leaves an unreferenced blob that ``collect_garbage`` removes; no half-made version is ever visible.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import BinaryIO

from modelkeep.crypto import KeyService, associated_data_for, new_data_key, seal, unseal
from modelkeep.errors import Conflict, IntegrityError, KeyServiceError
from modelkeep.registry.blobs import BlobStore, new_blob_key
from modelkeep.registry.records import VersionRecord, check_name
from modelkeep.registry.store import MetadataStore, NewVersion, VersionDetails, VersionTaken

log = logging.getLogger(__name__)

# Concurrent pushes of one model each lose the race at most this often before giving up.
_MAX_ATTEMPTS = 20
# Unreferenced blobs younger than this may belong to a push still in flight on another worker.
_GC_GRACE_S = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _seal_to(plaintext: bytes, key: bytes, associated_data: bytes, out: BinaryIO) -> int:
    return seal(plaintext, key, associated_data, out)


class Registry:
    """Models and their sealed versions, over a metadata store, a blob store and a key service."""

    def __init__(
        self,
        store: MetadataStore,
        blobs: BlobStore,
        keys: KeyService,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.keys = keys
        self._clock = clock

    def add_version(
        self,
        model: str,
        plaintext: bytes,
        details: VersionDetails,
        *,
        uploaded_by: str,
    ) -> int:
        """Seal ``plaintext`` as the next version of ``model`` and record it; returns its number.

        The caller has already checked that the artifact is acceptable; the model must exist.
        """
        check_name("model", model)
        digest = hashlib.sha256(plaintext).hexdigest()
        for _ in range(_MAX_ATTEMPTS):
            number = self.store.next_version_number(model)
            # 1. The associated data binds the ciphertext to (model, version, digest): a blob
            #    moved to another version, or a row pointing at another blob, will not open.
            associated_data = associated_data_for(model, number, digest)
            # 2. A fresh data key per version, wrapped by the key service under the same context.
            data_key = new_data_key()
            wrapped = self.keys.wrap(data_key, associated_data)
            blob_key = new_blob_key()
            self.blobs.put(blob_key, partial(_seal_to, plaintext, data_key, associated_data))
            # 3. Only now the version becomes visible, in one transaction.
            try:
                self.store.add_version(
                    NewVersion(
                        model=model,
                        number=number,
                        sha256=digest,
                        size=len(plaintext),
                        uploaded_by=uploaded_by,
                        created_at=self._clock(),
                        blob_key=blob_key,
                        wrapped_key=wrapped,
                        kek_id=self.keys.key_id,
                        details=details,
                    )
                )
            except VersionTaken:
                self.blobs.delete(blob_key)
                continue
            except BaseException:
                self.blobs.delete(blob_key)
                raise
            return number
        raise Conflict("too many concurrent pushes of this model; try again")

    def open_version(self, version: VersionRecord) -> bytes:
        """Decrypt a version into memory and check its digest; plaintext never touches disk.

        Raises IntegrityError naming the model and version when anything fails to verify, and
        KeyServiceError naming them when the key service cannot unwrap the data key (down,
        sealed, refusing, or no longer holding the KEK that wrapped it).
        """
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
            with self.blobs.open(version.blob_key) as src:
                plaintext = unseal(src, data_key, associated_data, expected_size=version.size)
            if hashlib.sha256(plaintext).hexdigest() != version.sha256:
                raise IntegrityError("digest mismatch")
        except IntegrityError as exc:
            log.error(
                "integrity check failed for model %s version %s", version.model, version.number
            )
            raise IntegrityError(
                f"model '{version.model}' version {version.number} failed integrity verification"
                " and will not be loaded"
            ) from exc
        return plaintext

    def collect_garbage(self, *, grace_s: float = _GC_GRACE_S) -> int:
        """Delete blobs no version references (left by a crash mid-push); returns how many."""
        referenced = self.store.blob_keys()
        removed = 0
        for key in list(self.blobs.keys(older_than_s=grace_s)):
            if key not in referenced:
                self.blobs.delete(key)
                removed += 1
        return removed
