"""Uploads are staged sealed in a file without a name; prepare() leaves no leftover behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from modelkeep.api.server import prepare
from modelkeep.bootstrap import init_data_dir
from modelkeep.registry.upload import Upload, clear_staging, staging_dir
from modelkeep.settings import Settings

MiB = 1024 * 1024


def test_an_upload_is_staged_sealed_in_a_file_without_a_name(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    with Upload(tmp_path) as upload:
        upload.write(data[:MiB])
        upload.write(data[MiB:])
        upload.finish()
        assert list(tmp_path.iterdir()) == []  # nothing a crash could leave or anyone could open
        staged = Path(f"/proc/self/fd/{upload._file.fileno()}").read_bytes()
        assert data[MiB : MiB + 64] not in staged
        assert (upload.size, upload.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert upload.reader().read() == data
        assert upload.reader().read() == data  # read back again from the start


def test_staging_is_cleared_whole(tmp_path: Path) -> None:
    area = staging_dir(tmp_path)
    (area / "tmpab12").write_bytes(b"x")
    (area / "left").mkdir()
    (area / "left" / "over").write_bytes(b"y")
    assert clear_staging(area) == 2
    assert list(area.iterdir()) == []


def test_prepare_removes_every_leftover_of_a_crashed_push_at_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    settings = Settings(data_dir=data_dir)
    uploads = staging_dir(data_dir)
    (uploads / "tmpx").write_bytes(b"sealed bytes of a push whose process died")
    temporary = data_dir / "blobs" / ".tmp"
    temporary.mkdir(exist_ok=True)
    (temporary / "0123456789abcdef.half").write_bytes(b"half a sealed blob")
    orphan = data_dir / "blobs" / "ab" / "abcdef0123456789abcdef0123456789"
    orphan.parent.mkdir()
    orphan.write_bytes(b"a sealed blob no version records")

    prepare(settings)  # they are seconds old, not hours: still removed

    assert list(uploads.iterdir()) == []
    assert list(temporary.iterdir()) == []
    assert not orphan.exists()
