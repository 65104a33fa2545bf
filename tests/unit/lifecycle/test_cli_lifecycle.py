"""The lifecycle commands end to end: the real CLI against the real app in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from typer.testing import CliRunner, Result

from conftest import Env
from modelkeep.api.app import create_app
from modelkeep.cli import app
from modelkeep.cli._client import ClientOverrides
from modelkeep.testing import LentTransport, SyncAppTransport, build_iris_onnx


@pytest.fixture
def cli(env: Env) -> Iterator[tuple[Env, object]]:
    token = env.service.create_key(env.admin, role="admin", models=None, expires_at=None).token
    transport = SyncAppTransport(create_app(env.service, manage_lifecycle=False))
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(
            app,
            list(args),
            env={"COLUMNS": "200", "MODELKEEP_TOKEN": token},
            obj=ClientOverrides(transport=LentTransport(transport)),
        )

    yield env, run
    transport.close()


def test_push_with_lineage_bom_and_delete(cli: tuple[Env, object], tmp_path: Path) -> None:
    env, run = cli
    model = tmp_path / "iris.onnx"
    model.write_bytes(build_iris_onnx())
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"code_revision": "deadbeef", "metrics": {"accuracy": 0.95}}))
    pushed = run("push", "iris", str(model), "--lineage", str(lineage))  # type: ignore[operator]
    assert pushed.exit_code == 0, pushed.output
    assert run("push", "iris", str(model)).exit_code == 0  # type: ignore[operator]

    out_file = tmp_path / "bom.json"
    bom = run("versions", "bom", "iris", "1", "-o", str(out_file))  # type: ignore[operator]
    assert bom.exit_code == 0, bom.output
    text = out_file.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    props = {p["name"]: p["value"] for p in json.loads(text)["metadata"]["component"]["properties"]}
    assert props["modelkeep:declared:code_revision"] == "deadbeef"
    subject = json.loads(text)["metadata"]["component"]
    assert subject["type"] == "machine-learning-model"
    assert subject["modelCard"]["quantitativeAnalysis"]["performanceMetrics"] == [
        {"type": "declared:accuracy", "value": "0.95"}
    ]

    refused = run("versions", "delete", "iris", "1")  # type: ignore[operator]
    assert refused.exit_code == 2
    assert "--yes" in refused.output
    deleted = run("versions", "delete", "iris", "1", "--yes")  # type: ignore[operator]
    assert deleted.exit_code == 0, deleted.output
    assert "data key destroyed" in deleted.stdout
    listed = run("versions", "ls", "iris")  # type: ignore[operator]
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line[:1].isdigit()}
    assert "(deleted)" in rows["1"]
    assert "(deleted)" not in rows["2"]
    missing = run("versions", "delete", "iris", "9", "--yes")  # type: ignore[operator]
    assert missing.exit_code == 5
    assert sorted(env.service.snapshot.models["iris"].deleted) == [1]


def test_a_bad_lineage_file_is_refused_before_anything_is_sent(
    cli: tuple[Env, object], tmp_path: Path
) -> None:
    env, run = cli
    model = tmp_path / "iris.onnx"
    model.write_bytes(build_iris_onnx())
    lineage = tmp_path / "lineage.json"
    lineage.write_text('{"parent_version": "one"}')
    result = run("push", "iris", str(model), "--lineage", str(lineage))  # type: ignore[operator]
    # Exit 1: a malformed request, as the server would have answered (400).
    assert result.exit_code == 1, result.output
    assert "invalid lineage: parent_version" in result.output
    assert dict(env.service.snapshot.models["iris"].versions) == {}


def test_retention_and_drift_commands(cli: tuple[Env, object], tmp_path: Path) -> None:
    env, run = cli
    env.service.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    assert run("retention", "set", "iris").exit_code == 2  # type: ignore[operator]
    rule = run("retention", "set", "iris", "--keep-versions", "3", "--json")  # type: ignore[operator]
    assert rule.exit_code == 0, rule.output
    assert json.loads(rule.stdout)["keep_versions"] == 3
    assert run("retention", "set", "iris", "--keep-versions", "0").exit_code == 2  # type: ignore[operator]
    shown = run("retention", "show", "iris")  # type: ignore[operator]
    assert "keep_versions: 3" in shown.stdout
    benign = tmp_path / "benign.npy"
    np.save(benign, np.random.default_rng(0).normal(size=(200, 4)))
    drift = run("drift", "set", "iris", "--benign", str(benign), "--window", "100")  # type: ignore[operator]
    assert drift.exit_code == 0, drift.output
    assert "window: 100" in drift.stdout
    assert "no full window yet" in drift.stdout
    assert run("models", "delete", "iris", "--yes").exit_code == 0  # type: ignore[operator]
    assert "iris" not in env.service.snapshot.models


@pytest.mark.parametrize(
    "command",
    [
        ["versions", "bom"],
        ["versions", "delete"],
        ["models", "delete"],
        ["retention", "show"],
        ["retention", "set"],
        ["drift", "show"],
        ["drift", "set"],
    ],
)
def test_help_works_and_lists_exit_codes(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert f"Usage: modelkeep {' '.join(command)}" in result.stdout
    assert "Exit codes" in result.stdout


def test_lineage_flags_add_to_the_file(cli: tuple[Env, object], tmp_path: Path) -> None:
    env, run = cli
    model = tmp_path / "iris.onnx"
    model.write_bytes(build_iris_onnx())
    assert run("push", "iris", str(model)).exit_code == 0  # type: ignore[operator]
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"tags": {"team": "risk"}, "code_revision": "old"}))
    digest = "sha256:" + "cd" * 32
    pushed = run(  # type: ignore[operator]
        "push",
        "iris",
        str(model),
        "--lineage",
        str(lineage),
        "--code-revision",
        "new",
        "--parent-version",
        "1",
        "--training-data",
        digest,
        "--training-data",
        "s3://data/iris.csv",
        "--framework",
        "onnx=1.16",
        "--tag",
        "stage=dev",
    )
    assert pushed.exit_code == 0, pushed.output
    recorded = json.loads(env.service.snapshot.models["iris"].versions[2].lineage or "{}")
    assert recorded == {
        "code_revision": "new",
        "parent_version": 1,
        "training_data": [{"digest": digest}, {"uri": "s3://data/iris.csv"}],
        "frameworks": {"onnx": "1.16"},
        "tags": {"team": "risk", "stage": "dev"},
    }
    bad = run("push", "iris", str(model), "--tag", "no-equals-sign")  # type: ignore[operator]
    assert bad.exit_code == 2
    assert "KEY=VALUE" in bad.output
    wrong = run("push", "iris", str(model), "--training-data", "sha256:xyz")  # type: ignore[operator]
    assert wrong.exit_code == 1
    assert "training_data.0.digest" in wrong.output
    assert sorted(env.service.snapshot.models["iris"].versions) == [1, 2]
