"""A push's memory on a real server: the upload is never held whole, failures leave nothing.

The server process's peak resident memory is reset (``/proc/PID/clear_refs``) before each push
and read from ``VmHWM`` after it, so each test measures what that one push cost. An ONNX model's
plaintext lives in a tmpfs file while it loads (runtime/_plaintext_file.py); the server writes
it through a mapping of its own, so every page of it is in the resident size as it is written.
"""

from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import Server, ensure_model, init_server, publisher_key, sign_bytes

from modelkeep.crypto.signing import sign_path
from modelkeep.testing import (
    build_big_lightgbm,
    build_big_onnx,
    build_big_skops,
    build_big_xgboost,
    build_dense_onnx,
    build_iris_onnx,
    xgboost_load_growth,
)
from modelkeep.testing_files import (
    deflated_keras_archive,
    deflated_npz,
    gzipped_npy,
    keras_archive,
    keras_h5,
    safetensors_tar,
    safetensors_tar_gz,
    seven_zip_safetensors,
    sparse_safetensors,
    stored_npz,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
LARGE = 256 * MiB
MODEL = "big"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serving(tmp_path_factory)


@pytest.fixture
def fresh_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: what the heap keeps from another format's push moves a push's
    growth by hundreds of MiB (an XGBoost UBJSON push grew 357 MiB after a JSON one, 702 alone)."""
    yield from _serving(tmp_path_factory)


def _serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = init_server(tmp_path_factory.mktemp("memory"))
    server.start()
    try:
        ensure_model(server, MODEL)
        # A first push loads the scanner and the runtime, as any server that has served one has.
        warm = build_iris_onnx()
        assert push(server, warm, sign_bytes(warm)) == 201
        yield server
    finally:
        server.stop()


def push(
    server: Server, data: bytes | Iterable[bytes], bundle: bytes, filename: str = "model.onnx"
) -> int:
    return _push(server, data, bundle, filename).status_code


def _push(
    server: Server, data: bytes | Iterable[bytes], bundle: bytes, filename: str
) -> httpx.Response:
    with server.client(server.admin_key) as c:
        return c.post(
            f"/api/v1/models/{MODEL}/versions",
            params={"filename": filename},
            content=data,
            headers={
                "Content-Type": "application/octet-stream",
                "Modelkeep-Signature": base64.b64encode(bundle).decode(),
            },
        )


def peak_growth(
    server: Server, data: bytes | Iterable[bytes], bundle: bytes, filename: str = "model.onnx"
) -> tuple[httpx.Response, int]:
    """Push ``data``; returns the response and how far the server's resident memory rose."""
    assert server.proc is not None
    status_file = Path(f"/proc/{server.proc.pid}/status")
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib(status_file, "VmHWM")
    response = _push(server, data, bundle, filename)
    return response, (_kib(status_file, "VmHWM") - before) * 1024


def _kib(status_file: Path, field: str) -> int:
    for line in status_file.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in {status_file}")


def assert_nothing_left(server: Server) -> None:
    with sqlite3.connect(server.data_dir / "modelkeep.db", timeout=30) as db:
        referenced = {row[0] for row in db.execute("SELECT blob_key FROM versions")}
    stored = {p.name for p in (server.data_dir / "blobs").glob("??/*")}
    assert stored == referenced
    assert list((server.data_dir / "blobs" / ".tmp").iterdir()) == []
    assert list((server.data_dir / "uploads").iterdir()) == []
    assert server.proc is not None
    # The server's private plaintext directory (runtime/_plaintext_file.py) holds only its lock.
    (private,) = Path("/dev/shm").glob(f"modelkeep-plaintext-{server.proc.pid}-*")
    assert [p.name for p in private.iterdir()] == [".lock"]


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MiB):
            yield chunk


def test_a_wrongly_signed_upload_four_times_the_allowance_is_refused_and_leaves_nothing(
    srv: Server,
) -> None:
    data = os.urandom(LARGE)
    stranger_signed = sign_bytes(data[:-1] + b"x")  # a signature over other bytes

    response, growth = peak_growth(srv, data, stranger_signed)

    # Streamed in sealed and hashed, refused on its digest before any byte was held whole.
    assert response.status_code == 422
    assert growth < LARGE // 4, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


def test_a_corrupted_signed_upload_is_refused_by_the_scan_without_being_held(
    srv: Server,
) -> None:
    data = np.random.default_rng(5).bytes(LARGE)  # fixed: random bytes that match no format

    response, growth = peak_growth(srv, data, sign_bytes(data))

    # Identified as nothing from its first MiB, and refused on that: nothing more was read.
    assert response.status_code == 422
    assert "cannot identify the format" in response.json()["error"]
    assert growth < LARGE // 4, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


def test_a_scan_only_file_four_times_the_allowance_is_scanned_without_being_held(
    srv: Server, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    sparse_safetensors(path, 2 * LARGE)
    bundle = tmp_path / "bundle.sig"
    sign_path(path, publisher_key()[0], bundle)

    response, growth = peak_growth(srv, chunks(path), bundle.read_bytes(), path.name)

    # The scan read the header through the sealed copy and found it safe; the push is then
    # refused only because safetensors is a format the server does not serve.
    assert response.status_code == 422
    assert "exactly one servable file" in response.json()["error"]
    assert growth < LARGE // 2, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


@pytest.mark.parametrize(
    ("file_name", "write"),
    [
        ("weights.npz", stored_npz),
        ("weights.tar", safetensors_tar),
        ("weights.tar.gz", safetensors_tar_gz),
        ("weights.npy.gz", gzipped_npy),
        ("compressed.npz", deflated_npz),
        ("model.h5", keras_h5),
        ("model.keras", keras_archive),
        ("deflated.keras", deflated_keras_archive),
        ("weights.7z", seven_zip_safetensors),
    ],
)
def test_a_scan_only_archive_four_times_the_allowance_is_scanned_without_being_held(
    srv: Server, tmp_path: Path, file_name: str, write: Callable[[Path, int], None]
) -> None:
    path = tmp_path / file_name
    write(path, 2 * LARGE)
    bundle = tmp_path / "bundle.sig"
    sign_path(path, publisher_key()[0], bundle)

    response, growth = peak_growth(srv, chunks(path), bundle.read_bytes(), path.name)

    # The archive's directory and its member's header were read through the sealed copy, a
    # stored member in place, a deflated member or a compressed stream decompressed again as
    # its analyser reads it (never held), an HDF5 file's attributes through the copy, and
    # found safe; the push is then refused only because none is a format the server serves.
    # (Measured: 1 to 20 MiB for 512 MiB of content; a stored archive was twice its size when
    # the scan read it whole, and a compressed one 516 to 1027 MiB when inflated into memory.)
    assert response.status_code == 422
    assert "exactly one servable file" in response.json()["error"]
    assert growth < LARGE // 4, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


@pytest.mark.parametrize(
    "build",
    [
        # Many small weights, as a model of many layers has them.
        pytest.param(lambda: build_big_onnx(64 * MiB, seed=3), id="many-weights-64MiB"),
        # Four 64 MiB weights, which ONNX Runtime pre-packs when it serves them.
        pytest.param(lambda: build_dense_onnx(LARGE, seed=6), id="dense-256MiB"),
    ],
)
def test_an_onnx_push_holds_the_model_once_within_its_size_plus_256_mib(
    srv: Server, build: Callable[[], bytes]
) -> None:
    data = build()

    response, growth = peak_growth(srv, data, sign_bytes(data))

    # The plaintext is decrypted into a tmpfs file that ONNX Runtime maps for the smoke load
    # (no pre-packing, so no copy of the weights): about 1.05x for the dense model. From arrays
    # over bytes in memory, ONNX Runtime copied the weights into its graph: 2.3x; given the
    # bytes whole, it copied and parsed them besides: 3.2x.
    assert response.status_code == 201
    assert growth < len(data) + 256 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


# Each format the server loads besides ONNX, with a model of it as large as the builder makes it.
TABULAR = {
    "skops": ("model.skops", lambda nbytes: build_big_skops(nbytes)),
    "xgboost-json": ("model.json", lambda nbytes: build_big_xgboost(nbytes, fmt="json")),
    "xgboost-ubj": ("model.ubj", lambda nbytes: build_big_xgboost(nbytes, fmt="ubj")),
    "lightgbm-text": ("model.txt", lambda nbytes: build_big_lightgbm(nbytes)),
}


@pytest.mark.parametrize("fmt", sorted(TABULAR))
def test_a_tabular_model_is_pushed_within_its_size_or_its_library_s_own_work_plus_256_mib(
    fresh_srv: Server, fmt: str, tmp_path: Path
) -> None:
    file_name, build = TABULAR[fmt]
    warm = build(1 * MiB)  # the runtime's library is imported once, as on a server serving it
    assert push(fresh_srv, warm, sign_bytes(warm, file_name), file_name) == 201
    data = build(128 * MiB)
    # XGBoost's own load builds a document of the whole file (12x a JSON model, 2.6x a UBJSON
    # one), and the tree check reads the booster as XGBoost writes it back (save_raw), which
    # no push can avoid: an XGBoost push may hold the model and cost what those two cost,
    # measured in a process of its own, plus 256 MiB. skops and LightGBM only hold the model.
    path = tmp_path / file_name
    path.write_bytes(data)
    library = xgboost_load_growth(path) if fmt.startswith("xgboost") else 0
    allowance = len(data) + library + 256 * MiB

    response, growth = peak_growth(fresh_srv, data, sign_bytes(data, file_name), file_name)

    # The runtime reads the model through the sealed copy (skops, a zip, through it; LightGBM
    # into a buffer it lets go of as soon as the model is text; the scan holds it whole while
    # it checks it, and LightGBM's now checks the text a block at a time). Measured at
    # 128 MiB: skops 2.0x (skops reads each array out of the zip, then into the array; it was
    # 3.0x from bytes read whole), LightGBM 2.7x (its text and LightGBM's UTF-8 copy of it
    # while it parses; 3.7x before). XGBoost JSON 1720 MiB against its own 1510 (load and
    # write-back), UBJSON 702 against 558; before the scan and the tree check stopped reading
    # the model as Python objects, 2744 and 1235 (bench/README.md).
    assert response.status_code == 201, response.text
    assert growth <= allowance, (
        f"{fmt}: the server grew by {growth / MiB:.0f} MiB ({growth / len(data):.1f}x);"
        f" its library's own work {library / MiB:.0f} MiB"
    )
    assert_nothing_left(fresh_srv)
