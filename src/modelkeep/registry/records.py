"""Immutable records of the registry, as held in memory by every worker."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from modelkeep.auth.apikeys import KeyRecord
from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import ModelSignature

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid model or label name, else raise InvalidInput."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidInput(
            f"invalid {kind} name: use 1-63 characters from a-z, 0-9, '.', '_', '-',"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One immutable version of a model."""

    model: str
    number: int
    sha256: str
    size: int
    format: str
    signature: ModelSignature
    uploaded_by: str
    created_at: datetime
    blob_key: str
    wrapped_key: bytes = field(repr=False)
    kek_id: str
    layout: str = "file"  # "file", or "directory" when the blob is a tar of the signed files
    file_name: str = "model"  # the served file's name, as the signed manifest records it
    signer: str | None = None  # fingerprint of the publisher key that signed it; None if unsigned
    bundle: bytes | None = field(default=None, repr=False)
    scan_report: str | None = field(default=None, repr=False)  # JSON
    trusted_types: tuple[str, ...] = ()
    lineage: str | None = field(default=None, repr=False)  # JSON (registry/lineage.py)
    # Set once crypto-shredded: the wrapped key is empty and the blob gone (never served).
    deleted_at: datetime | None = None
    deleted_by: str | None = None


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary (a share of a label's callers served by another version) or shadow (a sample of
    its requests mirrored to another version, never answered from), as stored: running, waiting
    for approval, or ended (and how). A snapshot holds the running ones."""

    id: str
    model: str
    label: str
    mode: str  # "canary" or "shadow"
    version: int
    share: float  # percent of callers (canary) or of requests (shadow), in (0, 100]
    thresholds: str  # JSON (modelkeep.lifecycle.canary.Thresholds)
    status: str  # pending, active, promoted, aborted, rolled_back, ended
    change_id: str | None
    started_by: str
    started_at: datetime
    ended_by: str | None = None
    ended_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model with its versions (ascending) and labels (label -> version number)."""

    name: str
    description: str
    created_by: str
    created_at: datetime
    versions: MappingProxyType[int, VersionRecord]
    labels: MappingProxyType[str, int]
    require_signature: bool = True
    publishers: MappingProxyType[str, str] = field(
        default_factory=lambda: MappingProxyType({})
    )  # fingerprint -> PEM public key
    policy: str | None = None  # the guard policy as JSON (modelkeep.guard.policy); None = defaults
    restrictions: MappingProxyType[str, tuple[str, str]] = field(
        default_factory=lambda: MappingProxyType({})
    )  # key id -> (kind "block" | "throttle", reason)
    # Crypto-shredded versions, kept apart from ``versions`` so nothing that serves can reach
    # them; only metadata (digest, who, when) remains.
    deleted: MappingProxyType[int, VersionRecord] = field(
        default_factory=lambda: MappingProxyType({})
    )
    drift: str | None = None  # the drift monitoring config as JSON (modelkeep.guard.drift)
    # Active canaries and shadows, by the label they split or mirror.
    canaries: MappingProxyType[str, Canary] = field(default_factory=lambda: MappingProxyType({}))
    shadows: MappingProxyType[str, Canary] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def latest_version(self) -> int | None:
        return max(self.versions) if self.versions else None

    def default_version(self) -> int | None:
        """The version served when none is named: the `production` label, else the newest."""
        production = self.labels.get("production")
        return production if production is not None else self.latest_version


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the hot path needs, loaded at once and swapped atomically on change."""

    generation: int
    keys: MappingProxyType[str, KeyRecord]
    models: MappingProxyType[str, ModelRecord]


def empty_snapshot() -> Snapshot:
    return Snapshot(-1, MappingProxyType({}), MappingProxyType({}))
