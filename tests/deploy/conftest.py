"""Fixtures for the image and chart tests: the image, built once per session as `make image`
builds it, and podman with the project's containers.conf."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The integration harness (push, keys, servers) is shared with these tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from tools import ROOT, podman_env

IMAGE = "localhost/modelkeep:test"


def _missing(tool: str) -> None:
    """Under CI the project's scripts must have installed it: fail; elsewhere skip."""
    message = f"{tool} is not installed (make system-deps installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def podman_available() -> None:
    for tool in ("podman", "runc", "mmdebstrap", "slirp4netns"):
        if shutil.which(tool) is None:
            _missing(tool)


@pytest.fixture(scope="session")
def image(podman_available: None) -> str:
    """The image, built by scripts/build-image.sh (cached base and layers make reruns fast)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh")],
        capture_output=True,
        text=True,
        env={**podman_env(), "IMAGE": IMAGE},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"image (\w+) size (\d+) bytes", proc.stdout)
    assert match, proc.stdout
    return IMAGE
