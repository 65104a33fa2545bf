"""What every ``Service`` mixin may rely on: the attributes and helpers the core provides.

The core (``modelkeep.service.Service``) sets the attributes in ``__init__`` and defines the
methods; here they are only declared, so that each mixin type-checks on its own. The method
declarations exist for the type checker only and never shadow the core's at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from modelkeep.audit import AuditLog
from modelkeep.audit.capture import CaptureRecord, CaptureWriter
from modelkeep.audit.metrics import Metrics
from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput
from modelkeep.guard.drift import DriftMonitor
from modelkeep.guard.gate import InferenceGate
from modelkeep.guard.policy import CapturePolicy
from modelkeep.policy import Action, Authorizer
from modelkeep.registry.records import ModelRecord, Snapshot, VersionRecord, check_name
from modelkeep.registry.registry import Registry
from modelkeep.registry.store import CaptureStore, MetadataStore
from modelkeep.settings import Settings

if TYPE_CHECKING:
    from modelkeep.crypto.signing import TrustedKey
    from modelkeep.registry.lineage import Lineage
    from modelkeep.runtime.base import LoadedModel

# The core's logger: log records keep the name they had before the service was split up.
log = logging.getLogger("modelkeep.service")

K = TypeVar("K")
V = TypeVar("V")


class SnapshotMemo(Generic[K, V]):
    """Answers that hold for one snapshot: all dropped when the snapshot changes.

    ``table(snapshot)`` is the dict for ``snapshot``, a fresh one when it is not the snapshot
    last asked about. Callers read ``self._snapshot`` once and both look up and store in the
    table they got, so an answer worked out while another thread refreshes lands in the old
    table, never in the new snapshot's. ``remember`` clears a table that holds ``limit``
    answers: keys may come from clients.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._state: tuple[Snapshot | None, dict[K, V]] = (None, {})

    def table(self, snapshot: Snapshot) -> dict[K, V]:
        known, table = self._state  # one read: a pair written together
        if known is not snapshot:
            table = {}
            self._state = (snapshot, table)
        return table

    def remember(self, table: dict[K, V], key: K, value: V) -> None:
        if len(table) >= self._limit:
            table.clear()
        table[key] = value


class ServiceBase:
    """Declarations shared by the mixins; ``Service.__init__`` sets every attribute."""

    settings: Settings
    store: MetadataStore
    audit: AuditLog
    metrics: Metrics
    registry: Registry
    authorizer: Authorizer
    gate: InferenceGate
    captures: CaptureStore
    capture_writer: CaptureWriter[tuple[CaptureRecord, datetime]]
    capture_random: Callable[[], float]
    _clock: Callable[[], datetime]
    _snapshot: Snapshot
    _alarm_seen: dict[tuple[str, str, str], float]
    _last_capture_purge: float
    # Lifecycle (issue 16): loaded sessions, the drift monitor, the last retention run.
    _sessions: dict[tuple[str, int], LoadedModel]
    drift: DriftMonitor
    _last_retention: float

    if TYPE_CHECKING:

        def refresh(self) -> bool: ...

        def record(
            self,
            actor: str,
            action: str,
            target: str,
            outcome: str,
            details: dict[str, Any] | None = None,
        ) -> None: ...

        def _audited(
            self, principal: Principal, action: str, target: str, details: dict[str, Any]
        ) -> AbstractContextManager[dict[str, Any]]: ...

        def alert(self, kind: str, **fields: object) -> None: ...

        def _model(self, principal: Principal, action: Action, model: str) -> ModelRecord: ...

        def _version(self, record: ModelRecord, version: str | int | None) -> VersionRecord: ...

        def _session(self, version: VersionRecord) -> LoadedModel: ...

        @staticmethod
        def _trusted(model: ModelRecord | None) -> list[TrustedKey]: ...

        def _calibrate_drift(
            self, principal: Principal, model: str, rows: list[list[float]]
        ) -> None: ...

        @staticmethod
        def check_lineage(record: ModelRecord, lineage: Lineage) -> None: ...

        def _capture(
            self,
            principal: Principal,
            version: VersionRecord,
            capture: CapturePolicy,
            body: bytes,
            content: bytes,
        ) -> None: ...


def model_target(model: str) -> str:
    return f"model:{model}" if is_safe_name(model) else "model:?"


def is_safe_name(name: str) -> bool:
    try:
        check_name("model", name)
    except InvalidInput:
        return False
    return True
