"""Lineage and bills of materials of versions: the ``Lineage`` part of the service.

The push records what the publisher declared (``registry/lineage.py``); here the server answers
with a CycloneDX document that adds what it established itself (``registry/bom.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput
from modelkeep.policy import Action
from modelkeep.registry.bom import version_bom
from modelkeep.registry.lineage import Lineage as DeclaredLineage
from modelkeep.registry.records import ModelRecord, VersionRecord
from modelkeep.service.core import Core, resolve_version

# What the server holds as evidence for a version: its metrics and its approvals.
Evidence = Callable[[VersionRecord], tuple[Mapping[str, float], list[Mapping[str, Any]]]]


def _number(text: str | int) -> int | None:
    value = str(text)
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


def check_lineage(record: ModelRecord, lineage: DeclaredLineage) -> None:
    """A declared parent must be a version of this model (deleted ones count)."""
    parent = lineage.parent_version
    if parent is not None and parent not in record.versions and parent not in record.deleted:
        raise InvalidInput(f"lineage parent_version {parent} is not a version of '{record.name}'")


class Lineage:
    """Version metadata including deleted versions, and BOM export."""

    def __init__(self, core: Core, evidence: Evidence | None = None) -> None:
        # The server's evaluation metrics and the approvals of a version (``Changes``).
        self._evidence = evidence
        self.refresh = core.refresh
        self._model = core.authorized_model
        self._clock = core.clock

    def version_record(self, principal: Principal, model: str, version: str) -> VersionRecord:
        """A version's metadata, also of a deleted version (then ``deleted_at`` is set)."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        number = _number(version)
        if number is not None and number in record.deleted:
            return record.deleted[number]
        return resolve_version(record, version)

    def all_versions(self, principal: Principal, model: str) -> list[VersionRecord]:
        """Every version of ``model``, deleted ones included, oldest first."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        merged = {**record.deleted, **record.versions}
        return [merged[n] for n in sorted(merged)]

    def version_bom(self, principal: Principal, model: str, version: str) -> str:
        """The CycloneDX BOM of a version (readers of the model); deleted versions too."""
        found = self.version_record(principal, model, version)
        metrics, approvals = self._bom_evidence(found)
        return version_bom(found, metrics=metrics, approvals=approvals, now=self._clock())

    def _bom_evidence(
        self, version: VersionRecord
    ) -> tuple[Mapping[str, float], list[Mapping[str, Any]]]:
        """The server's own evaluation metrics and the approvals of ``version`` (none without
        an evaluation set or approved change requests)."""
        if self._evidence is None:
            return {}, []
        return self._evidence(version)
