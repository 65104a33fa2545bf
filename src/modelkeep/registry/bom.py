"""A CycloneDX 1.6 ML-BOM for one model version (``modelkeep versions bom``).

The document is built with cyclonedx-python-lib and describes the version as the BOM's subject
(``metadata.component``), a ``machine-learning-model`` component: its SHA-256 as the component's
hash, and a ``modelCard`` whose quantitative analysis lists the server's evaluation metrics
(type ``accuracy``...) and the publisher's declared ones (type ``declared:accuracy``...), whose
model parameters name the training datasets, and whose properties carry the format, the
publisher key that signed the version and the scanner's verdict. The same facts, the approvals
its promotions received and the rest of the record stay ``modelkeep:*`` properties of the
component. What the publisher declared at push time (``registry/lineage.py``) becomes
components the version depends on (training data as ``data`` components with their digest and
location, frameworks), its parent version as pedigree, and ``modelkeep:declared:*``
properties: declared, not verified.

cyclonedx-python-lib (11.x) writes and validates CycloneDX 1.6 but has no model for
``modelCard`` or a component's ``data`` yet (CycloneDX/cyclonedx-python-lib#912, #913): those
two are added to the library's JSON here, and the whole document is then checked against the
1.6 schema by the library's strict validator before it is returned.
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
    XsUri,
)
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType, Pedigree
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from modelkeep import __version__
from modelkeep.errors import InternalError
from modelkeep.registry.lineage import Lineage, parse_lineage
from modelkeep.registry.records import VersionRecord

__all__ = ["BOM_MEDIA_TYPE", "version_bom"]

BOM_MEDIA_TYPE = "application/vnd.cyclonedx+json; version=1.6"
_SCHEMA = SchemaVersion.V1_6


def _ref(model: str, number: int) -> str:
    return f"modelkeep:{model}@{number}"


def _props(pairs: Iterable[tuple[str, object]]) -> list[Property]:
    return [Property(name=name, value=str(value)) for name, value in pairs if value is not None]


def _model_card(
    version: VersionRecord,
    lineage: Lineage,
    metrics: Mapping[str, float],
    verdict: object,
    datasets: Mapping[str, object],
) -> dict[str, Any]:
    """The subject's CycloneDX 1.6 ``modelCard``: datasets, metrics, format, signer, verdict."""
    performance = [
        {"type": name, "value": repr(float(value))} for name, value in sorted(metrics.items())
    ]
    performance += [
        {"type": f"declared:{name}", "value": repr(declared)}
        for name, declared in sorted(lineage.metrics.items())
    ]
    card: dict[str, Any] = {"bom-ref": f"{_ref(version.model, version.number)}:model-card"}
    if datasets:
        card["modelParameters"] = {"datasets": [{"ref": ref} for ref in datasets]}
    if performance:
        card["quantitativeAnalysis"] = {"performanceMetrics": performance}
    card["properties"] = [
        {"name": p.name, "value": p.value}
        for p in _props(
            [
                ("modelkeep:format", version.format),
                ("modelkeep:signature:signed", version.signer is not None),
                ("modelkeep:signature:identity", version.signer),
                ("modelkeep:scan:verdict", verdict),
            ]
            + [(f"modelkeep:framework:{n}", v) for n, v in sorted(lineage.frameworks.items())]
        )
    ]
    return card


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
            type=ComponentType.MACHINE_LEARNING_MODEL,
            bom_ref=_ref(version.model, lineage.parent_version) + ":parent",
        )
        pedigree = Pedigree(ancestors=[parent])
    subject = Component(
        name=version.model,
        version=str(version.number),
        type=ComponentType.MACHINE_LEARNING_MODEL,
        bom_ref=_ref(version.model, version.number),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=version.sha256)],
        properties=properties,
        external_references=references,
        pedigree=pedigree,
    )
    bom = Bom()
    bom.metadata.component = subject
    bom.metadata.tools.components.add(
        Component(type=ComponentType.APPLICATION, name="modelkeep", version=__version__)
    )
    if now is not None:
        bom.metadata.timestamp = now
    dependencies: list[Component] = []
    datasets: dict[str, dict[str, Any]] = {}
    for index, data in enumerate(lineage.training_data):
        hashes = []
        if data.digest is not None:
            hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=data.digest.split(":", 1)[1]))
        refs = []
        if data.uri is not None:
            refs.append(
                ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(data.uri))
            )
        name = data.name or f"training-data-{index + 1}"
        bom_ref = f"{_ref(version.model, version.number)}:data:{index + 1}"
        dataset: dict[str, Any] = {"type": "dataset", "name": name}
        if data.uri is not None:
            dataset["contents"] = {"url": data.uri}
        datasets[bom_ref] = dataset
        dependencies.append(
            Component(
                name=name,
                type=ComponentType.DATA,
                bom_ref=bom_ref,
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
        document: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    # The two ML-BOM fields the library does not model yet (see the module's docstring).
    document["metadata"]["component"]["modelCard"] = _model_card(
        version, lineage, metrics or {}, verdict, datasets
    )
    for component in document.get("components", []):
        if component.get("bom-ref") in datasets:
            component["data"] = [datasets[component["bom-ref"]]]
    text = json.dumps(document, indent=2)
    # Never hand out a document that does not validate: that is a bug, not bad input.
    problem = JsonStrictValidator(_SCHEMA).validate_str(text)
    if problem is not None:
        raise InternalError("the bill of materials did not validate")
    return text
