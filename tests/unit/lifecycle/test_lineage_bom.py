"""Lineage at push and the CycloneDX ML-BOM: validated, size-limited, stored; the exported
document validates against the CycloneDX 1.6 schema and carries digest, signer, metrics in the
model's hashes and model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from conftest import Env
from modelkeep.crypto.signing import generate_signing_key, sign_path
from modelkeep.errors import InvalidInput
from modelkeep.registry.lineage import MAX_LINEAGE_BYTES, parse_lineage, parse_lineage_header
from modelkeep.testing import build_iris_onnx

DATA_DIGEST = "sha256:" + "ab" * 32
LINEAGE = {
    "training_data": [{"name": "iris-train", "digest": DATA_DIGEST, "uri": "s3://data/iris.csv"}],
    "code_revision": "4f2a9c1",
    "code_uri": "https://git.example.com/ml/iris",
    "frameworks": {"scikit-learn": "1.5.2", "onnx": "1.16.0"},
    "tags": {"team": "risk"},
    "metrics": {"accuracy": 0.97, "f1": 0.96},
}


def properties(bom: dict[str, object]) -> dict[str, str]:
    component = bom["metadata"]["component"]  # type: ignore[index]
    return {p["name"]: p["value"] for p in component["properties"]}


def card_properties(bom: dict[str, Any]) -> dict[str, str]:
    card = bom["metadata"]["component"]["modelCard"]
    return {p["name"]: p["value"] for p in card["properties"]}


def performance(bom: dict[str, Any]) -> dict[str, str]:
    analysis = bom["metadata"]["component"]["modelCard"]["quantitativeAnalysis"]
    return {m["type"]: m["value"] for m in analysis["performanceMetrics"]}


def test_a_signed_push_with_lineage_exports_a_valid_bom(env: Env, tmp_path: Path) -> None:
    svc = env.service
    key = generate_signing_key(tmp_path / "publisher.pem", tmp_path / "publisher.pub")
    svc.add_publisher(env.admin, "iris", key.pem)
    model_file = tmp_path / "iris.onnx"
    model_file.write_bytes(build_iris_onnx())
    sign_path(model_file, tmp_path / "publisher.pem", tmp_path / "iris.sig")
    bundle = (tmp_path / "iris.sig").read_bytes()
    svc.push(env.admin, "iris", build_iris_onnx(seed=3), file_name="other.onnx")
    pushed = svc.push(
        env.admin,
        "iris",
        model_file.read_bytes(),
        file_name="iris.onnx",
        bundle=bundle,
        lineage=parse_lineage(json.dumps({**LINEAGE, "parent_version": 1})),
    )

    text = svc.version_bom(env.admin, "iris", str(pushed.number))

    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    subject = bom["metadata"]["component"]
    assert (subject["name"], subject["version"]) == ("iris", "2")
    assert subject["hashes"] == [{"alg": "SHA-256", "content": pushed.sha256}]
    props = properties(bom)
    assert pushed.signer == key.fingerprint
    assert props["modelkeep:signature:identity"] == key.fingerprint
    assert props["modelkeep:scan:verdict"] == "safe"
    assert props["modelkeep:declared:metric:accuracy"] == "0.97"
    assert props["modelkeep:declared:code_revision"] == "4f2a9c1"
    assert subject["pedigree"]["ancestors"][0]["version"] == "1"
    components = {c["name"]: c for c in bom["components"]}
    assert components["iris-train"]["hashes"][0]["content"] == "ab" * 32
    assert components["onnx"]["version"] == "1.16.0"
    [dependency] = [d for d in bom["dependencies"] if d["ref"] == subject["bom-ref"]]
    assert len(dependency["dependsOn"]) == 3
    [entry] = [e for e in svc.audit.entries(action="model.push") if e.details.get("version") == 2]
    assert len(entry.details["lineage_sha256"]) == 64


def test_server_metrics_appear_in_the_bom(env: Env) -> None:
    """The server's own evaluation metrics (from the version record, when present) are
    exported apart from the declared ones."""
    svc = env.service
    svc.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    version = svc.snapshot.models["iris"].versions[1]
    metrics, approvals = svc.lineage._bom_evidence(version)
    assert (dict(metrics), approvals) == ({}, [])
    from modelkeep.registry.bom import version_bom

    text = version_bom(version, metrics={"accuracy": 0.91}, approvals=[{"by": "k2"}])
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    assert performance(json.loads(text)) == {"accuracy": "0.91"}
    assert card_properties(json.loads(text))["modelkeep:signature:signed"] == "False"
    assert "modelkeep:signature:identity" not in card_properties(json.loads(text))
    props = properties(json.loads(text))
    assert (props["modelkeep:metric:accuracy"], props["modelkeep:approval"]) == (
        "0.91",
        '{"by": "k2"}',
    )
    assert props["modelkeep:signature:signed"] == "False"


def test_the_validator_checks_the_model_card(env: Env) -> None:
    """The 1.6 schema the BOM is checked against covers the model card the library does not
    model: a metric value that is not a string, or an unknown card field, fails validation."""
    svc = env.service
    svc.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    from modelkeep.registry.bom import version_bom

    bom = json.loads(version_bom(svc.snapshot.models["iris"].versions[1], metrics={"f1": 0.5}))
    validator = JsonStrictValidator(SchemaVersion.V1_6)
    assert validator.validate_str(json.dumps(bom)) is None
    card = bom["metadata"]["component"]["modelCard"]
    card["quantitativeAnalysis"]["performanceMetrics"][0]["value"] = 0.5
    assert validator.validate_str(json.dumps(bom)) is not None
    card["quantitativeAnalysis"]["performanceMetrics"][0]["value"] = "0.5"
    card["accuracy"] = "0.5"
    assert validator.validate_str(json.dumps(bom)) is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "must be a JSON object"),
        ("{", "not valid JSON"),
        ('{"unknown": 1}', "Extra inputs"),
        ('{"training_data": [{}]}', "needs a digest"),
        ('{"training_data": [{"digest": "md5:abc"}]}', "training_data.0.digest"),
        ('{"training_data": [{"uri": "javascript:alert(1)"}]}', "training_data.0.uri"),
        ('{"parent_version": 0}', "parent_version"),
        ('{"parent_version": "1"}', "parent_version"),
        ('{"metrics": {"accuracy": "high"}}', "metrics.accuracy"),
        ('{"metrics": {"accuracy": Infinity}}', "finite"),
        ('{"tags": {"bad key!": "x"}}', "tags"),
        ('{"tags": {"k": "' + "x" * 300 + '"}}', "tags.k"),
        ('{"frameworks": {' + ",".join(f'"f{i}": "1"' for i in range(33)) + "}}", "frameworks"),
        ('{"code_revision": "' + "x" * (MAX_LINEAGE_BYTES + 1) + '"}', "larger than 8 KiB"),
        ('{"code_uri": "file:///etc/passwd"}', "code_uri"),
    ],
)
def test_malformed_or_oversized_lineage_is_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=r"lineage|invalid") as info:
        parse_lineage(text)
    assert message in info.value.message


def test_the_lineage_header_must_be_base64(env: Env) -> None:
    with pytest.raises(InvalidInput, match="base64"):
        parse_lineage_header("not base64 !!")
    with pytest.raises(InvalidInput, match="larger than"):
        parse_lineage_header("A" * 20_000)


def test_a_parent_that_is_not_a_version_is_refused_and_nothing_is_stored(env: Env) -> None:
    svc = env.service
    with pytest.raises(InvalidInput, match="parent_version 7"):
        svc.push(
            env.admin,
            "iris",
            build_iris_onnx(),
            file_name="iris.onnx",
            lineage=parse_lineage('{"parent_version": 7}'),
        )
    assert dict(svc.snapshot.models["iris"].versions) == {}


def test_an_idempotency_key_reused_with_other_lineage_is_a_conflict(env: Env) -> None:
    from modelkeep.errors import Conflict

    svc = env.service
    key = "3f1c7a52-9b8e-4c1d-a2f0-5e6d7c8b9a01"
    model = build_iris_onnx()
    first = parse_lineage('{"code_revision": "a"}')
    made = svc.push(
        env.admin, "iris", model, file_name="m.onnx", idempotency_key=key, lineage=first
    )
    again = svc.push(
        env.admin, "iris", model, file_name="m.onnx", idempotency_key=key, lineage=first
    )
    assert again.number == made.number == 1
    with pytest.raises(Conflict):
        svc.push(
            env.admin,
            "iris",
            model,
            file_name="m.onnx",
            idempotency_key=key,
            lineage=parse_lineage('{"code_revision": "b"}'),
        )
