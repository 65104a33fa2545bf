"""Signed checkpoints of the audit chain, and the Ed25519 key that signs them.

A hash chain alone shows edits, insertions and deletions in the middle, but not a cut tail: the
shortened log is still a valid chain. A checkpoint is a signed statement "entry ``seq`` is the
head and its hash is ``head_hash``"; with the public key, a verifier notices a log that ends
before a checkpoint or disagrees with it.

The private key lives in a file made by ``modelkeep init`` (``audit-signing.key``, PKCS#8 PEM,
mode 0600); the public key is written beside it as ``audit-signing.key.pub`` (SubjectPublicKeyInfo
PEM) and is what auditors keep, ideally somewhere the server cannot write.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from modelkeep.audit._chain import checkpoint_message
from modelkeep.crypto.keyfiles import fsync_directory, write_new_file
from modelkeep.errors import ConfigError

__all__ = [
    "KEY_FILE",
    "Checkpoint",
    "CheckpointSigner",
    "key_id_for",
    "load_public_key",
    "public_key_path",
    "verify_checkpoint",
]

#: Name of the private key file in a data directory (``modelkeep init`` creates it).
KEY_FILE = "audit-signing.key"
_KEY_ID_DOMAIN = b"modelkeep/audit-key-id/v1"
_MAX_KEY_FILE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signature over the chain head ``seq`` / ``head_hash`` made at ``time`` by ``key_id``."""

    seq: int
    head_hash: str
    time: datetime
    signature: bytes
    key_id: str


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """A short, stable, non-secret name of a checkpoint key (16 hex characters)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(_KEY_ID_DOMAIN + raw).hexdigest()[:16]


def public_key_path(private_key_path: Path) -> Path:
    """Where the public key of ``private_key_path`` is kept: the same name plus ``.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def verify_checkpoint(checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> bool:
    """True only if ``checkpoint`` was signed, exactly as it reads, by ``public_key``'s owner."""
    if checkpoint.key_id != key_id_for(public_key):
        return False
    message = checkpoint_message(
        seq=checkpoint.seq,
        head_hash=checkpoint.head_hash,
        time=checkpoint.time,
        key_id=checkpoint.key_id,
    )
    try:
        public_key.verify(checkpoint.signature, message)
    except InvalidSignature:
        return False
    return True


class CheckpointSigner:
    """Signs audit checkpoints with an Ed25519 private key held in memory."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.key_id: str = key_id_for(self.public_key)

    @classmethod
    def generate(cls) -> CheckpointSigner:
        """A signer with a fresh key that exists only in this process; for tests."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def create(cls, path: Path) -> CheckpointSigner:
        """Create a new key at ``path`` (0600) and its public key beside it, durably.

        Refuses to overwrite either file (ConfigError): replacing the key would make every
        existing checkpoint unverifiable with the key auditors hold.
        """
        private_key = Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pub_path = public_key_path(path)
        if pub_path.exists():
            raise ConfigError("the audit public key file already exists; refusing to overwrite it")
        write_new_file(path, pem, 0o600, "audit signing key file")
        try:
            write_new_file(pub_path, public_pem, 0o644, "audit public key file")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent, "audit signing key")
        return cls(private_key)

    @classmethod
    def load(cls, path: Path) -> CheckpointSigner:
        """Load the key at ``path``.

        ConfigError if the file is missing, not an Ed25519 private key, readable or writable by
        group or others, or if the public key beside it belongs to another key (auditors would
        then hold a key that verifies nothing). Messages never contain the path.
        """
        data = _read_key_file(path, private=True)
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError("the audit signing key file is damaged or encrypted") from exc
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError("the audit signing key is not an Ed25519 key")
        signer = cls(private_key)
        pub_path = public_key_path(path)
        if pub_path.exists() and key_id_for(load_public_key(pub_path)) != signer.key_id:
            raise ConfigError("the audit public key file does not match the audit signing key")
        return signer

    def sign(self, *, seq: int, head_hash: str, time: datetime) -> Checkpoint:
        """A checkpoint stating that entry ``seq`` is the head and its hash is ``head_hash``."""
        message = checkpoint_message(seq=seq, head_hash=head_hash, time=time, key_id=self.key_id)
        return Checkpoint(
            seq=seq,
            head_hash=head_hash,
            time=time,
            signature=self._private_key.sign(message),
            key_id=self.key_id,
        )

    def __repr__(self) -> str:
        return f"CheckpointSigner(key_id={self.key_id!r})"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file ``path``; ConfigError if absent or not one."""
    data = _read_key_file(path, private=False)
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError("the audit public key file is damaged") from exc
    if not isinstance(public_key, Ed25519PublicKey):
        raise ConfigError("the audit public key is not an Ed25519 key")
    return public_key


def _read_key_file(path: Path, *, private: bool) -> bytes:
    what = "audit signing key" if private else "audit public key"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"the {what} file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the {what} file") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the {what} file is not a regular file")
        # A private key others can read is leaked; one others can write can be swapped.
        if private and info.st_mode & 0o077:
            raise ConfigError(f"the {what} file must be accessible by its owner only (chmod 600)")
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file") from exc
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"the {what} file is too large to be a key")
    return data
