"""A push's signature is verified before any scanner parses its content (intake.py, step 2
before step 3; docs/architecture.md says how this differs from DESIGN §2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeep.errors import ModelRefused
from modelkeep.registry import intake
from modelkeep.registry.upload import Upload
from modelkeep.scanning import ScanReport, scan_reader

# A hand-made pickle that calls os.system("id") when loaded: the scan refuses it.
EVIL = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R."


@pytest.fixture
def evil(tmp_path: Path) -> Iterator[Upload]:
    with Upload.of(EVIL, tmp_path) as upload:
        yield upload


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the push's scanner was given."""
    names: list[str] = []
    real = scan_reader

    def recording(content: object, name: str, **options: object) -> ScanReport:
        names.append(name)
        return real(content, name, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "scan_reader", recording)
    return names


def _accept(upload: Upload, *, bundle: bytes | None, require_signature: bool) -> None:
    intake.accept(
        upload,
        file_name="evil.pkl",
        is_directory=False,
        bundle=bundle,
        trusted=[],
        require_signature=require_signature,
        model="m",
    )


def test_a_bad_signature_refuses_the_push_before_the_scanner_sees_a_byte(
    evil: Upload, scanned: list[str]
) -> None:
    with pytest.raises(ModelRefused) as refused:
        _accept(evil, bundle=b"not a bundle", require_signature=True)

    assert scanned == []
    assert refused.value.details is None or "report" not in refused.value.details


def test_a_missing_required_signature_refuses_the_push_before_the_scanner_sees_a_byte(
    evil: Upload, scanned: list[str]
) -> None:
    with pytest.raises(ModelRefused) as refused:
        _accept(evil, bundle=None, require_signature=True)

    assert scanned == []
    assert "signature" in refused.value.message or "signed" in refused.value.message


def test_without_a_signature_requirement_the_scan_is_what_refuses(
    evil: Upload, scanned: list[str]
) -> None:
    with pytest.raises(ModelRefused) as refused:
        _accept(evil, bundle=None, require_signature=False)

    assert scanned == ["evil.pkl"]
    assert "the scan refused evil.pkl" in refused.value.message
