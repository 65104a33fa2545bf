"""The scanner's corpus, built once per session from scripts/make_scan_corpus.py.

The corpus is written to a temporary directory the first time a test asks for it (at
collection, because the manifest names the parametrized cases) and removed at the end of the
session. Nothing in it is ever loaded with a real loader.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_scan_corpus.py"


def load_corpus_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_scan_corpus", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_root(config: pytest.Config) -> Path:
    """Build the corpus on first use in this session; later calls return the same directory."""
    root: Path | None = getattr(config, "_modelkeep_scan_corpus", None)
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="modelkeep-scan-corpus-"))
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
        load_corpus_script().build(root)
        config._modelkeep_scan_corpus = root  # type: ignore[attr-defined]
    return root


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "corpus_entry" in metafunc.fixturenames:
        root = corpus_root(metafunc.config)
        manifest = json.loads((root / "manifest.json").read_text())
        entries = sorted(manifest.items())
        metafunc.parametrize(
            "corpus_entry",
            [(root / name, verdict) for name, verdict in entries],
            ids=[f"{name} -> {verdict}" for name, verdict in entries],
        )


@pytest.fixture
def corpus(pytestconfig: pytest.Config) -> Path:
    """The corpus directory (manifest.json inside)."""
    return corpus_root(pytestconfig)


@pytest.fixture(scope="session")
def asm() -> ModuleType:
    """The corpus script as a module: its tiny pickle assembler (g, u, x, k, REDUCE...)."""
    return load_corpus_script()
