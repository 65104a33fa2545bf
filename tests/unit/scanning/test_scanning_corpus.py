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


#: Every format the scanner knows, each of which the real-library files must reach.
REAL_FORMATS = {
    "pickle", "joblib", "pytorch-zip", "pytorch-legacy", "numpy", "npz", "safetensors", "onnx",
    "skops", "keras", "keras-h5", "gguf", "xgboost-json", "xgboost-ubj", "lightgbm-text", "tar",
    "zip", "7z",
}  # fmt: skip


def test_real_library_files_cover_every_format_and_none_is_malicious(corpus: Path) -> None:
    """At least 50 files written by the real libraries' own save functions, across every
    format and every pickle protocol and joblib compressor: none is malicious."""
    manifest: dict[str, str] = json.loads((corpus / "manifest.json").read_text())
    real = sorted(name for name in manifest if "/real-" in name)
    reports = {name: scan_path(corpus / name) for name in real}
    assert len(real) >= 50
    assert [name for name, report in reports.items() if report.verdict is Verdict.MALICIOUS] == []
    assert {report.format for report in reports.values()} == REAL_FORMATS
    assert {f"p{protocol}" for protocol in range(6)} <= {
        name.rsplit("-", 1)[1].removesuffix(".pkl") for name in real if name.startswith("pickle/")
    }
    compressors = {name.rsplit("-", 1)[1] for name in real if name.startswith("joblib/real-random")}
    assert {
        "plain.joblib",
        "zlib.joblib",
        "gzip.joblib",
        "bz2.joblib",
        "lzma.joblib",
    } <= compressors
    assert "xz.joblib" in compressors
