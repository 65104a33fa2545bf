"""A CycloneDX bill of materials for one model version (``modelkeep versions bom``).

The document is built with cyclonedx-python-lib and describes the version as the BOM's subject
(``metadata.component``): its SHA-256, size, format, the publisher key that signed it, the
scanner's verdict, and the metrics and approvals the server holds for it, as ``modelkeep:*``
properties. What the publisher declared at push time (``registry/lineage.py``) becomes
components the version depends on (training data with its digest or location, frameworks),
its parent version as pedigree, and ``modelkeep:declared:*`` properties: declared, not verified.

Schema version: CycloneDX 1.4, the newest the pinned cyclonedx-python-lib (5.2.0, held there by
checkov's exact pin) writes and validates. 1.4 has no ``machine-learning-model`` component
type, so the version is a ``file`` component carrying ``modelkeep:kind=machine-learning-model``;
with cyclonedx-python-lib 6 or later, ``_SCHEMA`` and ``_MODEL_TYPE`` move to 1.5/1.6 and
``MACHINE_LEARNING_MODEL``, and training data to the ``data`` type.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    Tool,
    XsUri,
)
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType, Pedigree
from cyclonedx.output.json import JsonV1Dot4
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from modelkeep import __version__
from modelkeep.errors import InternalError
from modelkeep.registry.lineage import Lineage, parse_lineage
from modelkeep.registry.records import VersionRecord

__all__ = ["BOM_MEDIA_TYPE", "version_bom"]

BOM_MEDIA_TYPE = "application/vnd.cyclonedx+json; version=1.4"
_SCHEMA = SchemaVersion.V1_4
_MODEL_TYPE = ComponentType.FILE
_DATA_TYPE = ComponentType.FILE


def _ref(model: str, number: int) -> str:
    return f"modelkeep:{model}@{number}"


def _props(pairs: Iterable[tuple[str, object]]) -> list[Property]:
    return [Property(name=name, value=str(value)) for name, value in pairs if value is not None]


def version_bom(
    version: VersionRecord,
    *,
    metrics: Mapping[str, float] | None = None,
    approvals: Iterable[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> str:
    """The CycloneDX JSON of ``version``, checked against the schema before it is returned.

    ``metrics`` are the server's evaluation of the version, ``approvals`` the approvals its
    promotions received (who, when), when the server holds them.
    """
    lineage = parse_lineage(version.lineage) if version.lineage else Lineage()
    scan = json.loads(version.scan_report) if version.scan_report else {}
    verdict = scan.get("verdict") if isinstance(scan, dict) else None
    properties = _props(
        [
            ("modelkeep:kind", "machine-learning-model"),
            ("modelkeep:format", version.format),
            ("modelkeep:size", version.size),
            ("modelkeep:layout", version.layout),
            ("modelkeep:file_name", version.file_name),
            ("modelkeep:uploaded_by", version.uploaded_by),
            ("modelkeep:created_at", version.created_at.isoformat()),
            ("modelkeep:signature:signed", version.signer is not None),
            ("modelkeep:signature:identity", version.signer),
            ("modelkeep:scan:verdict", verdict),
            (
                "modelkeep:deleted_at",
                version.deleted_at.isoformat() if version.deleted_at else None,
            ),
            ("modelkeep:deleted_by", version.deleted_by),
            ("modelkeep:declared:code_revision", lineage.code_revision),
        ]
    )
    for name, value in sorted((metrics or {}).items()):
        properties.append(Property(name=f"modelkeep:metric:{name}", value=repr(float(value))))
    for name, declared in sorted(lineage.metrics.items()):
        properties.append(Property(name=f"modelkeep:declared:metric:{name}", value=repr(declared)))
    for approval in approvals:
        properties.append(
            Property(
                name="modelkeep:approval",
                value=json.dumps(dict(approval), sort_keys=True, default=str),
            )
        )
    for name, tag in sorted(lineage.tags.items()):
        properties.append(Property(name=f"modelkeep:declared:tag:{name}", value=tag))
    references = []
    if lineage.code_uri is not None:
        references.append(
            ExternalReference(
                type=ExternalReferenceType.SCM,
                url=XsUri(lineage.code_uri),
                comment=lineage.code_revision,
            )
        )
    pedigree = None
    if lineage.parent_version is not None:
        parent = Component(
            name=version.model,
            version=str(lineage.parent_version),
            type=_MODEL_TYPE,
            bom_ref=_ref(version.model, lineage.parent_version) + ":parent",
        )
        pedigree = Pedigree(ancestors=[parent])
    subject = Component(
        name=version.model,
        version=str(version.number),
        type=_MODEL_TYPE,
        bom_ref=_ref(version.model, version.number),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=version.sha256)],
        properties=properties,
        external_references=references,
        pedigree=pedigree,
    )
    bom = Bom()
    bom.metadata.component = subject
    bom.metadata.tools.add(Tool(vendor="modelkeep", name="modelkeep", version=__version__))
    if now is not None:
        bom.metadata.timestamp = now
    dependencies: list[Component] = []
    for index, data in enumerate(lineage.training_data):
        hashes = []
        if data.digest is not None:
            hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=data.digest.split(":", 1)[1]))
        refs = []
        if data.uri is not None:
            refs.append(
                ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(data.uri))
            )
        dependencies.append(
            Component(
                name=data.name or f"training-data-{index + 1}",
                type=_DATA_TYPE,
                bom_ref=f"{_ref(version.model, version.number)}:data:{index + 1}",
                hashes=hashes,
                external_references=refs,
                properties=_props([("modelkeep:kind", "training-data")]),
            )
        )
    for name, framework_version in sorted(lineage.frameworks.items()):
        dependencies.append(
            Component(
                name=name,
                version=framework_version,
                type=ComponentType.FRAMEWORK,
                bom_ref=f"{_ref(version.model, version.number)}:framework:{name}",
            )
        )
    for component in dependencies:
        bom.components.add(component)
    bom.register_dependency(subject, dependencies)
    with warnings.catch_warnings():
        # A version declared without data or frameworks has no dependencies, and the library
        # warns that the graph is "incomplete": it is complete, there is nothing to add.
        warnings.filterwarnings("ignore", message=".*no defined dependencies.*")
        text: str = JsonV1Dot4(bom).output_as_string()
    # Never hand out a document that does not validate: that is a bug, not bad input.
    problem = JsonStrictValidator(_SCHEMA).validate_str(text)
    if problem is not None:
        raise InternalError("the bill of materials did not validate")
    return text
