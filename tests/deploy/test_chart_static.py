"""The Dockerfile and the Helm chart, read by the tools a reviewer would run: hadolint, helm
lint, kubernetes-validate --strict, checkov, and the chart's own posture rules (checks.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from checks import load, restricted_problems
from tools import CHART, ROOT, helm, render, tool

PROFILES = {
    "default": (),
    "single": ("values-single.yaml",),
    "all-options": ("ci/all-options.yaml",),
}


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def _checkov_failures(*args: str) -> list[tuple[str, str]]:
    """(check id, file) of every failed checkov check."""
    proc = subprocess.run(
        [tool("checkov"), "--skip-download", "--quiet", "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    reports = yaml.safe_load(proc.stdout) if proc.stdout.strip() else []
    if isinstance(reports, dict):
        reports = [reports]
    return [
        (check["check_id"], Path(check["file_path"]).name)
        for report in reports
        for check in report.get("results", {}).get("failed_checks", [])
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, values in PROFILES.items():
        files[name] = folder / f"{name}.yaml"
        files[name].write_text(render(*values))
    return files


def test_hadolint_finds_nothing() -> None:
    _run(tool("hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile"))


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_is_clean(profile: str) -> None:
    args = [str(helm()), "lint", "--strict", str(CHART)]
    for values in PROFILES[profile]:
        args += ["-f", str(CHART / values)]
    out = _run(*args)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_chart_is_valid_kubernetes(profile: str, rendered: dict[str, Path]) -> None:
    out = _run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered[profile]))
    # Only the CRD kinds (cert-manager, prometheus-operator) have no schema to check against.
    for line in out.splitlines():
        assert "Couldn't find schema for kind Certificate" in line or (
            "Couldn't find schema for kind ServiceMonitor" in line
        ), line


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_chart_meets_the_restricted_posture(
    profile: str, rendered: dict[str, Path]
) -> None:
    assert restricted_problems(load(rendered[profile].read_text())) == []


def test_values_schema_refuses_a_weakened_security_context() -> None:
    proc = subprocess.run(
        [str(helm()), "template", "mk", str(CHART), "--set", "securityContext.privileged=true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "privileged" in proc.stderr


def _without(docs: list[dict[str, object]], field: str) -> list[dict[str, object]]:
    """The rendered docs with ``field`` removed from every container's securityContext."""
    for doc in docs:
        if doc.get("kind") in ("Deployment", "Job"):
            spec = doc["spec"]["template"]["spec"]  # type: ignore[index]
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                container["securityContext"].pop(field, None)
    return docs


@pytest.fixture(scope="module")
def weakened(rendered: dict[str, Path]) -> dict[str, list[dict[str, object]]]:
    """The default rendering with one protection removed, per name."""
    base = rendered["default"].read_text()
    return {
        "writable": _without(load(base), "readOnlyRootFilesystem"),
        "capable": _without(load(base), "capabilities"),
    }


@pytest.fixture(scope="module")
def checkov_failures(
    rendered: dict[str, Path],
    weakened: dict[str, list[dict[str, object]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[str, str]]:
    """One checkov run (it is slow) over the Dockerfile, the three renderings and the
    weakened ones."""
    folder = tmp_path_factory.mktemp("checkov")
    for path in rendered.values():
        shutil.copy(path, folder / path.name)
    for name, docs in weakened.items():
        (folder / f"weakened-{name}.yaml").write_text(yaml.safe_dump_all(docs))
    shutil.copy(ROOT / "Dockerfile", folder / "Dockerfile")
    return _checkov_failures("-d", str(folder), "--framework", "kubernetes", "dockerfile")


def test_checkov_passes_the_image_and_the_chart(
    checkov_failures: list[tuple[str, str]], tmp_path: Path
) -> None:
    """Zero failed checks; each check the chart skips is named in it with its reason."""
    assert [f for f in checkov_failures if not f[1].startswith("weakened-")] == []
    env_path = f"{helm().parent}:{Path(tool('checkov')).parent}:/usr/bin:/bin"
    args = ["--framework", "helm", "--config-file", str(CHART / ".checkov.yaml")]
    proc = subprocess.run(
        [
            tool("checkov"),
            "--skip-download",
            "--quiet",
            "--compact",
            "-d",
            str(CHART.parent),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": env_path, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Passed checks" in proc.stdout


def test_the_checks_fail_without_a_read_only_root_or_dropped_capabilities(
    weakened: dict[str, list[dict[str, object]]], checkov_failures: list[tuple[str, str]]
) -> None:
    assert any("readOnlyRootFilesystem" in p for p in restricted_problems(weakened["writable"]))
    assert any("drop: [ALL]" in p for p in restricted_problems(weakened["capable"]))
    assert ("CKV_K8S_22", "weakened-writable.yaml") in checkov_failures  # read-only root
    assert ("CKV_K8S_37", "weakened-capable.yaml") in checkov_failures  # capabilities


def test_the_checks_fail_without_the_network_policy(rendered: dict[str, Path]) -> None:
    docs = [d for d in load(rendered["default"].read_text()) if d["kind"] != "NetworkPolicy"]
    assert restricted_problems(docs) == [
        "Deployment/mk-modelkeep: no NetworkPolicy selects its pods"
    ]
    disabled = load(render(set_values=("networkPolicy.enabled=false",)))
    assert "Deployment/mk-modelkeep: no NetworkPolicy selects its pods" in restricted_problems(
        disabled
    )
