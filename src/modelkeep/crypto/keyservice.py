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

A wrapped key only unwraps under the same KEK and the same context; anything else raises one
opaque :class:`~modelkeep.errors.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelkeep.crypto.keyfiles import fsync_directory, write_new_file
from modelkeep.errors import ConfigError, IntegrityError, InvalidInput
from modelkeep.settings import Settings

__all__ = ["InMemoryKeyService", "KeyService", "LocalKeyService", "open_key_service"]

KEK_SIZE = 32
_FORMAT = b"\x01"
_NONCE_SIZE = 12
_TAG_SIZE = 16
_KEY_ID_DOMAIN = b"modelkeep/kek-id/v1"
_FAILED = "data key failed verification"


@runtime_checkable
class KeyService(Protocol):
    """Wraps and unwraps data keys under a key-encryption key the caller never sees."""

    @property
    def key_id(self) -> str:
        """A stable, non-secret name of the KEK, recorded next to every wrapped key."""
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
        """The one KEK is always current; a new one needs a key service (InvalidInput)."""
        if new_key:
            raise InvalidInput(
                "the local key file cannot be rotated in place; use a key service "
                "(OpenBao/Vault Transit or AWS KMS, see docs/scale-out.md)"
            )
        return self._key_id

    def close(self) -> None:
        """Nothing to release: the KEK is in memory."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"


class LocalKeyService(_AesGcmKeyService):
    """The KEK in a local file made by ``modelkeep init``: 32 raw bytes, mode 0600."""

    @classmethod
    def create(cls, path: Path) -> LocalKeyService:
        """Create a new random KEK at ``path``, owner-only (0600), durably.

        Refuses to overwrite an existing file (ConfigError): losing a KEK loses every model.
        """
        kek = os.urandom(KEK_SIZE)
        write_new_file(path, kek, 0o600, "key file")
        fsync_directory(path.parent, "key file")
        return cls(kek)

    @classmethod
    def load(cls, path: Path) -> LocalKeyService:
        """Load the KEK at ``path``.

        ConfigError if the file is missing, not exactly 32 bytes, or grants any permission to
        group or others (a key others can read is a leaked key; one others can write can be
        swapped). Messages never contain the path.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ConfigError("the key file does not exist; run `modelkeep init`") from None
        except OSError as exc:
            raise ConfigError("cannot open the key file") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError("the key file is not a regular file")
            if info.st_mode & 0o077:
                raise ConfigError(
                    "the key file must be accessible by its owner only (chmod 600 it)"
                )
            kek = os.read(fd, KEK_SIZE + 1)
        except OSError as exc:
            raise ConfigError("cannot read the key file") from exc
        finally:
            os.close(fd)
        if len(kek) != KEK_SIZE:
            raise ConfigError("the key file is damaged: it must hold exactly 32 bytes")
        return cls(kek)


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
