"""The report's verdict rules and JSON, and ``modelkeep scan``: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save
from typer.testing import CliRunner

from modelkeep.cli import app
from modelkeep.scanning import (
    EXIT_CODES,
    Finding,
    ScanReport,
    Severity,
    Verdict,
    scan_bytes,
    scan_path,
)
from modelkeep.scanning.sarif import to_sarif


def finding(severity: Severity) -> Finding:
    return Finding(severity, "m", "text")


def test_exit_codes_are_the_documented_contract() -> None:
    expected = {"safe": 0, "malicious": 1, "unsafe-format": 2, "error": 3}
    assert expected == {verdict.value: code for verdict, code in EXIT_CODES.items()}


@pytest.mark.parametrize(
    ("severities", "verdict"),
    [
        ((), Verdict.SAFE),
        ((Severity.INFO, Severity.LOW), Verdict.SAFE),
        ((Severity.MEDIUM, Severity.INFO), Verdict.UNSAFE_FORMAT),
        ((Severity.MEDIUM, Severity.HIGH), Verdict.ERROR),
        ((Severity.HIGH, Severity.CRITICAL, Severity.MEDIUM), Verdict.MALICIOUS),
    ],
)
def test_verdict_is_the_worst_finding(severities: tuple[Severity, ...], verdict: Verdict) -> None:
    report = ScanReport.from_findings("pickle", [finding(s) for s in severities], ["m"])
    assert (verdict, EXIT_CODES[verdict]) == (report.verdict, report.exit_code)


def test_json_lists_worst_findings_first() -> None:
    findings = [finding(Severity.INFO), finding(Severity.CRITICAL), finding(Severity.MEDIUM)]
    data = ScanReport.from_findings("zip", findings, ["a", "a > b"]).to_json()
    assert [f["severity"] for f in data["findings"]] == ["critical", "medium", "info"]
    assert {"verdict", "exit_code", "format", "findings", "files", "trusted_types"} == set(data)
    assert (data["verdict"], data["exit_code"], data["files"]) == ("malicious", 1, ["a", "a > b"])


def test_findings_past_the_cap_keep_the_verdict(asm: ModuleType) -> None:
    # 300 distinct imports: only 200 findings are listed, the rest are counted.
    body = b"".join(asm.g(f"module{i}", "thing") + asm.POP for i in range(300))
    report = scan_bytes(asm.P2 + b"N" + body + asm.STOP)
    assert report.verdict == Verdict.MALICIOUS
    assert len(report.findings) == 201
    assert "more findings are not listed" in report.findings[-1].message


def test_hostile_names_cannot_forge_report_lines(asm: ModuleType) -> None:
    data = asm.zip_bytes({"a\nverdict: safe\x1b[2J": asm.os_system_p0()})
    locations = [f.location for f in scan_bytes(data).findings]
    assert all(location.isprintable() for location in locations)


@pytest.fixture
def files(tmp_path: Path, asm: ModuleType) -> dict[str, Path]:
    paths = {
        "safe": tmp_path / "m.safetensors",
        "malicious": tmp_path / "evil.bin",
        "unsafe-format": tmp_path / "data.pkl",
        "error": tmp_path / "blob.onnx",
    }
    paths["safe"].write_bytes(save({"w": np.ones(2, dtype=np.float32)}))
    paths["malicious"].write_bytes(asm.os_system_p0())
    paths["unsafe-format"].write_bytes(asm.pickle_dumps({"a": 1}))
    paths["error"].write_bytes(bytes(range(256)))
    return paths


@pytest.mark.parametrize("verdict", ["safe", "malicious", "unsafe-format", "error"])
def test_cli_exit_code_is_the_verdict_code(files: dict[str, Path], verdict: str) -> None:
    result = CliRunner().invoke(app, ["scan", str(files[verdict])])
    assert EXIT_CODES[Verdict(verdict)] == result.exit_code
    assert result.stdout.startswith(f"verdict: {verdict} (")
    assert f"exit code {result.exit_code}\n" == result.stdout.splitlines(keepends=True)[-1]


def test_cli_text_shows_severity_location_and_advice(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["scan", str(files["malicious"])])
    assert "CRITICAL  evil.bin @ opcode 0 (byte 0)" in result.stdout
    assert "Do not load it" in result.stdout


def test_cli_json_is_the_report(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["scan", "--json", str(files["unsafe-format"])])
    assert result.exit_code == 2
    assert scan_path(files["unsafe-format"]).to_json() == json.loads(result.stdout)


def test_cli_missing_path_is_exit_3_with_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "absent")])
    assert result.exit_code == 3
    assert f"error: {tmp_path / 'absent'}: no such file or directory\n" == result.stderr
    assert result.stdout == ""


def test_cli_malformed_command_line_is_exit_3_not_2() -> None:
    result = CliRunner().invoke(app, ["scan"])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: Missing argument")


# -- SARIF ------------------------------------------------------------------------------------

_LEVELS = {"none", "note", "warning", "error"}


def check_sarif_structure(log: dict[str, Any]) -> None:
    """The parts of the SARIF 2.1.0 schema a log must satisfy, checked field by field (the
    schema cannot be fetched at test time): required properties, their types and enums, and
    that every result points at a rule the driver declares."""
    assert {"version", "runs"} <= set(log)
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    assert isinstance(log["runs"], list)
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str)
        assert driver["name"]
        rules = driver["rules"]
        ids = [rule["id"] for rule in rules]
        assert len(set(ids)) == len(ids)
        for rule in rules:
            assert isinstance(rule["shortDescription"]["text"], str)
            assert rule["defaultConfiguration"]["level"] in _LEVELS
        for invocation in run["invocations"]:
            assert isinstance(invocation["executionSuccessful"], bool)
            assert isinstance(invocation["exitCode"], int)
        for result in run["results"]:
            assert isinstance(result["message"]["text"], str)
            assert result["level"] in _LEVELS
            assert ids[result["ruleIndex"]] == result["ruleId"]
            for location in result["locations"]:
                uri = location["physicalLocation"]["artifactLocation"]["uri"]
                assert isinstance(uri, str)
                assert " " not in uri
                for logical in location["logicalLocations"]:
                    assert isinstance(logical["fullyQualifiedName"], str)


@pytest.mark.parametrize("verdict", ["safe", "malicious", "unsafe-format", "error"])
def test_cli_sarif_is_valid_and_keeps_the_exit_code(files: dict[str, Path], verdict: str) -> None:
    result = CliRunner().invoke(app, ["scan", "--format", "sarif", str(files[verdict])])
    assert EXIT_CODES[Verdict(verdict)] == result.exit_code
    log = json.loads(result.stdout)
    check_sarif_structure(log)
    run = log["runs"][0]
    assert (verdict, result.exit_code) == (
        run["properties"]["verdict"],
        run["invocations"][0]["exitCode"],
    )


def test_sarif_results_name_rule_level_file_and_member(files: dict[str, Path]) -> None:
    log = to_sarif(scan_path(files["malicious"]), files["malicious"])
    results = log["runs"][0]["results"]
    malicious = [r for r in results if r["ruleId"] == "modelkeep/malicious"]
    assert malicious
    assert {"error"} == {r["level"] for r in malicious}
    location = malicious[0]["locations"][0]
    assert files["malicious"].as_uri() == location["physicalLocation"]["artifactLocation"]["uri"]
    assert location["logicalLocations"][0]["fullyQualifiedName"].startswith("evil.bin @ opcode")
    # info findings say what was checked, not what is wrong: a safe file has no results.
    assert to_sarif(scan_path(files["safe"]), files["safe"])["runs"][0]["results"] == []


def test_sarif_of_a_directory_points_at_each_file(tmp_path: Path, asm: ModuleType) -> None:
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "sub dir" / "evil.pkl").write_bytes(asm.os_system_p0())
    log = to_sarif(scan_path(tmp_path), tmp_path)
    check_sarif_structure(log)
    uris = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in log["runs"][0]["results"]
    }
    assert {(tmp_path / "sub dir" / "evil.pkl").as_uri()} == uris


def test_cli_json_and_sarif_together_is_exit_3(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["scan", "--json", "--format", "sarif", str(files["safe"])])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: --json and --format sarif")
