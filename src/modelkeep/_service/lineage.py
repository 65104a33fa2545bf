"""Lineage and bills of materials of versions, in ``Service``.

The push records what the publisher declared (``registry/lineage.py``); here the server answers
with a CycloneDX document that adds what it established itself (``registry/bom.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelkeep._service._base import ServiceBase
from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput
from modelkeep.policy import Action
from modelkeep.registry.bom import version_bom
from modelkeep.registry.lineage import Lineage
from modelkeep.registry.records import ModelRecord, VersionRecord


def _number(text: str | int) -> int | None:
    value = str(text)
    return int(value) if value.isdigit() and len(value) <= 9 else None


class LineageMixin(ServiceBase):
    """Version metadata including deleted versions, lineage checks and BOM export."""

    def version_record(self, principal: Principal, model: str, version: str) -> VersionRecord:
        """A version's metadata, also of a deleted version (then ``deleted_at`` is set)."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        number = _number(version)
        if number is not None and number in record.deleted:
            return record.deleted[number]
        return self._version(record, version)

    def all_versions(self, principal: Principal, model: str) -> list[VersionRecord]:
        """Every version of ``model``, deleted ones included, oldest first."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        merged = {**record.deleted, **record.versions}
        return [merged[n] for n in sorted(merged)]

    @staticmethod
    def check_lineage(record: ModelRecord, lineage: Lineage) -> None:
        """A declared parent must be a version of this model (deleted ones count)."""
        parent = lineage.parent_version
        if parent is not None and parent not in record.versions and parent not in record.deleted:
            raise InvalidInput(
                f"lineage parent_version {parent} is not a version of '{record.name}'"
            )

    def version_bom(self, principal: Principal, model: str, version: str) -> str:
        """The CycloneDX BOM of a version (readers of the model); deleted versions too."""
        found = self.version_record(principal, model, version)
        metrics, approvals = self._bom_evidence(found)
        return version_bom(found, metrics=metrics, approvals=approvals, now=self._clock())

    def _bom_evidence(
        self, version: VersionRecord
    ) -> tuple[Mapping[str, float], list[Mapping[str, Any]]]:
        """The server's own evaluation metrics and the approvals of ``version``.

        Merge point: evaluation gates and approvals (issue 16 items 1-2) record these with the
        version; until they do, the server holds none and the BOM shows the declared ones only.
        """
        metrics = getattr(version, "metrics", None)
        approvals = getattr(version, "approvals", None)
        if not isinstance(metrics, Mapping):
            metrics = {}
        return metrics, list(approvals) if isinstance(approvals, list | tuple) else []
