"""Every file of the generated corpus gets exactly the verdict its manifest states."""

from __future__ import annotations

import json
from pathlib import Path

from modelkeep.scanning import Verdict, scan_path


def test_corpus_file_gets_its_manifest_verdict(corpus_entry: tuple[Path, str]) -> None:
    path, expected = corpus_entry
    report = scan_path(path)
    details = [(f.severity.value, f.location, f.message) for f in report.findings]
    assert expected == report.verdict.value, details


def test_corpus_covers_every_verdict_and_family(corpus: Path) -> None:
    manifest: dict[str, str] = json.loads((corpus / "manifest.json").read_text())
    families = {name.split("/", 1)[0] for name in manifest}
    expected_families = {
        "pickle", "joblib", "numpy", "torch", "archive", "onnx", "safetensors", "keras", "gguf",
        "skops", "xgboost", "lightgbm", "misc",
    }  # fmt: skip
    assert expected_families == families
    assert {v.value for v in Verdict} == set(manifest.values())
    # Benign files of every family are present: each family has a safe or unsafe-format file.
    benign = {
        name.split("/", 1)[0] for name, v in manifest.items() if v in ("safe", "unsafe-format")
    }
    assert expected_families - {"misc"} == benign
