"""The key-encryption key (KEK), behind a small interface.

Data keys never reach storage in the clear: they are wrapped by a :class:`KeyService`. The
embedded default is :class:`LocalKeyService`, a 32-byte key file made by ``modelkeep init``;
OpenBao/Vault Transit (``crypto._openbao``) and AWS KMS (``crypto._awskms``) implement the same
protocol, and :func:`open_key_service` picks one from the settings. Rotating the KEK re-wraps
data keys (``rewrap``) and never touches blobs.

Every adapter fails closed: an unreachable, sealed or refusing key service raises
:class:`~modelkeep.errors.KeyServiceError`, never a fallback to another key.

Local wrapping is AES-256-GCM with a random 12-byte nonce and the caller's ``context`` as
associated data::

    wrapped = 0x01 (format version) || nonce (12) || ciphertext || tag (16)

(the key file's service puts the KEK's key id after a 0x02 instead, see LocalKeyService). A
wrapped key only unwraps under the same KEK and the same context; anything else raises one
opaque :class:`~modelkeep.errors.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelkeep.crypto.keyfiles import fsync_directory, write_new_file
from modelkeep.errors import ConfigError, IntegrityError, InvalidInput, KeyServiceError

if TYPE_CHECKING:
    from modelkeep.settings import Settings

__all__ = ["InMemoryKeyService", "KeyService", "LocalKeyService", "open_key_service"]

KEK_SIZE = 32
_FORMAT = b"\x01"
_NONCE_SIZE = 12
_TAG_SIZE = 16
_KEY_ID_DOMAIN = b"modelkeep/kek-id/v1"
_KEY_ID_BYTES = 8
_RING_FORMAT = b"\x02"
# Retired key files live in this folder next to the key file, named by key id.
_RETIRED_DIR = "kek.retired"
_FAILED = "data key failed verification"


@runtime_checkable
class KeyService(Protocol):
    """Wraps and unwraps data keys under a key-encryption key the caller never sees."""

    @property
    def key_id(self) -> str:
        """A stable, non-secret name of the KEK, recorded next to every wrapped key.

        Right after ``wrap`` or ``rewrap`` it names the KEK that call used, in that thread.
        """
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt and authenticate ``data_key``, bound to ``context``."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key, only if ``wrapped`` verifies under this KEK and ``context``."""
        ...

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """``wrapped`` wrapped again under the current KEK, bound to the same ``context``.

        KeyServiceError (``retry_after`` None) if the KEK that wrapped it is gone.
        """
        ...

    def rotate(self, *, new_key: bool) -> str:
        """Make the newest KEK current, creating a new one first if ``new_key``; its key id.

        InvalidInput if this key service cannot make a new KEK itself.
        """
        ...

    def close(self) -> None:
        """Release connections to the key service; nothing is wrapped or unwrapped after."""
        ...


class _AesGcmKeyService:
    """Wrapping with a KEK held in this process's memory."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_SIZE:
            raise ValueError("key-encryption key must be 32 bytes")
        self._aead = AESGCM(kek)
        self._key_id = hashlib.sha256(_KEY_ID_DOMAIN + kek).hexdigest()[:16]

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 over a domain tag and the KEK; reveals nothing."""
        return self._key_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """AES-256-GCM under the KEK, fresh random nonce, ``context`` as associated data."""
        nonce = os.urandom(_NONCE_SIZE)
        return _FORMAT + nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; IntegrityError if the KEK, the context or any byte does not match."""
        if len(wrapped) < 1 + _NONCE_SIZE + _TAG_SIZE or wrapped[:1] != _FORMAT:
            raise IntegrityError(_FAILED)
        nonce = wrapped[1 : 1 + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, wrapped[1 + _NONCE_SIZE :], context)
        except InvalidTag:
            raise IntegrityError(_FAILED) from None

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """One KEK only: a fresh wrap under the same KEK (new nonce), after verifying the old."""
        return self.wrap(self.unwrap(wrapped, context), context)

    def rotate(self, *, new_key: bool) -> str:
        """The one KEK is always current; a new one needs a key file (InvalidInput)."""
        if new_key:
            raise InvalidInput("a key-encryption key held only in memory cannot be rotated")
        return self._key_id

    def close(self) -> None:
        """Nothing to release: the KEK is in memory."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"


class LocalKeyService:
    """The KEK in a local file made by ``modelkeep init`` (32 raw bytes, 0600), and older ones.

    ``rotate(new_key=True)`` moves the current KEK to ``kek.retired/<key id>.key`` next to the
    key file and writes a new one in its place (each step durable), so versions not re-wrapped
    yet still open. Wrapped keys name the KEK that made them::

        wrapped = 0x02 || key id (8 bytes) || nonce (12) || ciphertext || tag

    so a data key whose retired KEK file was deleted is refused clearly (KeyServiceError), not
    taken for tampering. Wraps made before rotation existed (0x01, no key id) are tried against
    every KEK held. Other worker processes on the host pick a rotation up from the files: before
    a wrap when the key file changed, and before giving up on a key id they do not hold.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._kek = b""
        self._current = _AesGcmKeyService(os.urandom(KEK_SIZE))
        self._ring: dict[str, _AesGcmKeyService] = {}
        self._stamp: tuple[int, int] | None = None
        self._reload()

    @classmethod
    def create(cls, path: Path) -> LocalKeyService:
        """Create a new random KEK at ``path``, owner-only (0600), durably.

        Refuses to overwrite an existing file (ConfigError): losing a KEK loses every model.
        """
        write_new_file(path, os.urandom(KEK_SIZE), 0o600, "key file")
        fsync_directory(path.parent, "key file")
        return cls(path)

    @classmethod
    def load(cls, path: Path) -> LocalKeyService:
        """Load the KEK at ``path`` and the retired ones beside it.

        ConfigError if a file is missing, not exactly 32 bytes, or grants any permission to
        group or others (a key others can read is a leaked key; one others can write can be
        swapped). Messages never contain the path.
        """
        return cls(path)

    @property
    def key_id(self) -> str:
        """The current KEK's id (see ``_AesGcmKeyService.key_id``)."""
        return self._current.key_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """AES-256-GCM under the current KEK, whose key id leads the wrapped bytes."""
        self._reload_if_changed()
        current = self._current
        return _RING_FORMAT + bytes.fromhex(current.key_id) + current.wrap(data_key, context)[1:]

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; KeyServiceError if the KEK that wrapped it is gone, else IntegrityError."""
        if wrapped[:1] == _RING_FORMAT and len(wrapped) > 1 + _KEY_ID_BYTES:
            key_id = wrapped[1 : 1 + _KEY_ID_BYTES].hex()
            kek = self._ring.get(key_id)
            if kek is None:
                self._reload()
                kek = self._ring.get(key_id)
            if kek is None:
                raise KeyServiceError(
                    f"the key file {key_id} that wrapped this data key is no longer kept "
                    "(retired key files must stay until `modelkeep kek status` shows no "
                    "version under them)"
                )
            return kek.unwrap(_FORMAT + wrapped[1 + _KEY_ID_BYTES :], context)
        for kek in list(self._ring.values()):
            try:
                return kek.unwrap(wrapped, context)
            except IntegrityError:
                continue
        raise IntegrityError(_FAILED)

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Unwrapped and wrapped again under the current KEK, in this process's memory."""
        return self.wrap(self.unwrap(wrapped, context), context)

    def rotate(self, *, new_key: bool) -> str:
        """With ``new_key``: retire the current KEK file and write a new one; the current id."""
        if not new_key:
            self._reload_if_changed()
            return self.key_id
        with self._lock:
            self._reload()
            retired = self._path.parent / _RETIRED_DIR
            retired.mkdir(mode=0o700, exist_ok=True)
            kept = retired / f"{self._current.key_id}.key"
            # 1. The current KEK is kept first: a crash after this step loses nothing.
            if not kept.exists():
                write_new_file(kept, self._kek, 0o600, "retired key file")
                fsync_directory(retired, "retired key file")
            # 2. The new KEK replaces the key file atomically (rename), durably.
            fresh = self._path.with_name(self._path.name + ".new")
            fresh.unlink(missing_ok=True)
            write_new_file(fresh, os.urandom(KEK_SIZE), 0o600, "key file")
            os.replace(fresh, self._path)
            fsync_directory(self._path.parent, "key file")
            self._reload()
        return self.key_id

    def close(self) -> None:
        """Nothing to release: the KEKs are in memory."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id!r}, retired={len(self._ring) - 1})"

    def _reload_if_changed(self) -> None:
        try:
            info = os.stat(self._path)
        except OSError:
            return  # the next reload reports it
        if (info.st_ino, info.st_mtime_ns) != self._stamp:
            self._reload()

    def _reload(self) -> None:
        kek, stamp = _read_kek(self._path, "key file")
        current = _AesGcmKeyService(kek)
        ring = {current.key_id: current}
        retired = self._path.parent / _RETIRED_DIR
        for path in sorted(retired.glob("*.key")) if retired.is_dir() else []:
            old = _AesGcmKeyService(_read_kek(path, "retired key file")[0])
            ring.setdefault(old.key_id, old)
        self._kek, self._current, self._ring, self._stamp = kek, current, ring, stamp


def _read_kek(path: Path, what: str) -> tuple[bytes, tuple[int, int]]:
    """32 bytes from an owner-only regular file, and its (inode, mtime) to notice changes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"the {what} does not exist; run `modelkeep init`") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the {what}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the {what} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"the {what} must be accessible by its owner only (chmod 600 it)")
        kek = os.read(fd, KEK_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}") from exc
    finally:
        os.close(fd)
    if len(kek) != KEK_SIZE:
        raise ConfigError(f"the {what} is damaged: it must hold exactly 32 bytes")
    return kek, (info.st_ino, info.st_mtime_ns)


class InMemoryKeyService(_AesGcmKeyService):
    """A KEK that lives only in this process; for tests. A random one unless ``kek`` is given."""

    def __init__(self, kek: bytes | None = None) -> None:
        super().__init__(os.urandom(KEK_SIZE) if kek is None else kek)


def open_key_service(settings: Settings, local_key_file: Path) -> KeyService:
    """The key service the settings name; ConfigError if they are incomplete or unsafe.

    Building it contacts nothing: a replica starts while the key service is down, and every
    load fails closed with KeyServiceError until it is back.
    """
    kind = settings.key_service
    if kind == "local":
        return LocalKeyService.load(local_key_file)
    if kind == "openbao" or kind.startswith("openbao+"):
        from modelkeep.crypto._openbao import TransitKeyService

        return TransitKeyService.from_settings(settings)
    if kind == "awskms" or kind.startswith("awskms:"):
        from modelkeep.crypto._awskms import KmsKeyService

        return KmsKeyService.from_settings(settings)
    raise ConfigError(
        "MODELKEEP_KEY_SERVICE must be local, openbao, awskms, "
        "openbao+https://HOST:PORT/MOUNT/keys/NAME or awskms:KEY"
    )
