"""A model's plaintext in a private tmpfs file: private, never on disk, never left behind, and
loaded by ONNX Runtime to the same predictions as the bytes."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelkeep.errors import ModelRefused
from modelkeep.runtime._plaintext_file import (
    DEFAULT_BASE,
    is_tmpfs,
    plaintext_file,
    remove_stale,
)
from modelkeep.runtime.loader import inspect_model
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.testing import (
    build_custom_domain_onnx,
    build_dense_onnx,
    build_external_data_onnx,
    build_iris_onnx,
)

MiB = 1 << 20


@pytest.fixture
def shm_base() -> Iterator[str]:
    """A fresh base directory on tmpfs, so each test gets its own private directory."""
    base = os.path.join(DEFAULT_BASE, f"modelkeep-test-{os.urandom(6).hex()}")
    os.mkdir(base, 0o700)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_plaintext_file_is_private_on_tmpfs_and_unlinked_after_the_block(
    shm_base: str,
) -> None:
    with plaintext_file(4096, base=shm_base) as plain:
        assert plain is not None
        directory = os.stat(plain.directory)
        assert stat.S_IMODE(directory.st_mode) == 0o700
        assert Path(plain.directory).name.startswith(f"modelkeep-plaintext-{os.getpid()}-")
        assert stat.S_IMODE(os.stat(plain.path).st_mode) == 0o600
        assert os.stat(plain.path).st_size == 4096
        assert is_tmpfs(plain.path)
        plain.buffer[:5] = b"hello"
        assert Path(plain.path).read_bytes()[:5] == b"hello"
    assert _plaintexts(plain.directory) == []


def test_the_writer_fills_the_file_in_order_and_the_mapping_sees_it(shm_base: str) -> None:
    data = np.arange(3000, dtype=np.float32)  # a view whose items are not bytes
    with plaintext_file(data.nbytes + 5, base=shm_base) as plain:
        assert plain is not None
        writer = plain.writer()
        assert writer.write(b"head!") == 5
        assert writer.write(memoryview(data)) == data.nbytes
        assert plain.buffer[:] == b"head!" + data.tobytes()


def test_the_plaintext_file_is_removed_when_the_block_fails(shm_base: str) -> None:
    paths: list[str] = []

    def failing_load() -> None:
        with plaintext_file(4096, base=shm_base) as plain:
            assert plain is not None
            paths.append(plain.path)
            raise RuntimeError("a load that failed")

    with pytest.raises(RuntimeError):
        failing_load()
    assert len(paths) == 1
    assert not os.path.exists(paths[0])


def test_a_disk_directory_is_refused_and_the_caller_told_to_load_from_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = Path(__file__).parent  # the checkout, on disk
    assert not is_tmpfs(str(base))
    with caplog.at_level(logging.WARNING), plaintext_file(4096, base=str(base)) as plain:
        assert plain is None
    assert "is not a memory filesystem (tmpfs)" in caplog.text
    assert not list(base.glob("modelkeep-plaintext-*"))


def _plaintexts(directory: str) -> list[str]:
    """The files in a private directory but its lock file."""
    return [name for name in os.listdir(directory) if name != ".lock"]


def _left_behind(base: str, *, age_s: float, locked: bool) -> tuple[Path, int | None]:
    """A private directory as a process leaves it: plaintext inside, its lock file held (the
    process lives) or not (it died), last changed ``age_s`` ago."""
    directory = Path(base) / f"modelkeep-plaintext-1-{os.urandom(4).hex()}"
    directory.mkdir(mode=0o700)
    (directory / "plaintext-left-by-a-crash").write_bytes(b"secret")
    lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    if locked:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: the check's own open conflicts
    else:
        os.close(lock)
    then = time.time() - age_s
    os.utime(directory, (then, then))
    return directory, lock if locked else None


@pytest.mark.parametrize("how", ["at start", "at the first file"])
def test_a_directory_whose_process_is_gone_is_removed_and_a_live_ones_kept(
    shm_base: str, how: str
) -> None:
    # Both carry pid 1: in containers sharing one /dev/shm the pid tells nothing; the lock does.
    dead, _ = _left_behind(shm_base, age_s=60, locked=False)
    alive, lock = _left_behind(shm_base, age_s=60, locked=True)
    just_made, _ = _left_behind(shm_base, age_s=0, locked=False)  # its process may lock it yet
    try:
        if how == "at start":
            remove_stale(shm_base)
        else:
            with plaintext_file(16, base=shm_base) as plain:
                assert plain is not None
        assert not dead.exists()
        assert (alive / "plaintext-left-by-a-crash").exists()
        assert just_made.exists()
    finally:
        assert lock is not None
        os.close(lock)


def test_a_directory_in_use_by_another_process_is_kept(shm_base: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_A_PRIVATE_DIR, shm_base], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            theirs = Path(holder.stdout.readline().strip())
            then = time.time() - 60
            os.utime(theirs, (then, then))
            remove_stale(shm_base)
            assert theirs.exists()
        finally:
            holder.kill()
    # Killed, it leaves the directory behind (no atexit ran), and nothing holds its lock now.
    assert theirs.exists()
    remove_stale(shm_base)
    assert not theirs.exists()


HOLD_A_PRIVATE_DIR = """
import sys, time
from modelkeep.runtime._plaintext_file import plaintext_file
with plaintext_file(16, base=sys.argv[1]) as plain:
    print(plain.directory, flush=True)
    time.sleep(60)
"""


def _rows(model: OnnxModel, seed: int = 0) -> dict[str, np.ndarray]:
    (spec,) = model.signature.inputs
    shape = [3 if dim < 0 else dim for dim in spec.shape]
    return {spec.name: np.random.default_rng(seed).random(shape, dtype=np.float32)}


def test_a_model_mapped_from_the_plaintext_file_predicts_exactly_what_its_bytes_do() -> None:
    data = build_dense_onnx(4 * MiB, layer_bytes=1 * MiB, seed=3)
    from_bytes = OnnxModel.load(data)
    with plaintext_file(len(data)) as plain:
        assert plain is not None
        plain.buffer[:] = data
        mapped = OnnxModel.load(plain)
        unpacked = OnnxModel.load(plain, prepack=False)
        # The model's graph went into the directory beside the plaintext, and out again.
        assert _plaintexts(plain.directory) == [plain.name]
    inputs = _rows(from_bytes)

    expected, actual = from_bytes.run(inputs), mapped.run(inputs)

    assert from_bytes.signature == mapped.signature == unpacked.signature
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert np.array_equal(value, actual[name])
        np.testing.assert_allclose(value, unpacked.run(inputs)[name], rtol=1e-5, atol=1e-6)


def test_a_smoke_load_from_the_plaintext_file_gives_the_signature_of_the_bytes() -> None:
    data = build_iris_onnx()
    with plaintext_file(len(data)) as plain:
        assert plain is not None
        plain.buffer[:] = data
        assert inspect_model("onnx", plain) == inspect_model("onnx", data)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (build_external_data_onnx, "external data"),
        (build_custom_domain_onnx, "custom domain"),
    ],
)
def test_the_plaintext_file_is_refused_for_what_the_bytes_are_refused_for(
    build: object, message: str
) -> None:
    assert callable(build)
    data: bytes = build()
    with pytest.raises(ModelRefused, match=message):
        OnnxModel.load(data)
    with plaintext_file(len(data)) as plain:
        assert plain is not None
        plain.buffer[:] = data
        with pytest.raises(ModelRefused, match=message):
            OnnxModel.load(plain)
        assert _plaintexts(plain.directory) == [plain.name]


def test_a_tmpfs_without_room_for_the_model_is_not_written_to(
    shm_base: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full tmpfs (a container's /dev/shm is 64 MiB by default) refuses the reservation; a
    # write through the mapping would instead have killed the process with SIGBUS.
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING), plaintext_file(64 * MiB, base=shm_base) as plain:
        assert plain is None
    assert "no room for a 64 MiB model" in caplog.text
    assert [_plaintexts(str(directory)) for directory in Path(shm_base).iterdir()] == [[]]
