"""A push's memory on a real server: the upload is never held whole, failures leave nothing.

The server process's peak resident memory is reset (``/proc/PID/clear_refs``) before each push
and read from ``VmHWM`` after it, so each test measures what that one push cost.
"""

from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import Server, ensure_model, init_server, sign_bytes
from onnx import TensorProto, helper, numpy_helper

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
LARGE = 256 * MiB
MODEL = "big"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
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


def push(server: Server, data: bytes, bundle: bytes) -> int:
    with server.client(server.admin_key) as c:
        r = c.post(
            f"/api/v1/models/{MODEL}/versions",
            params={"filename": "model.onnx"},
            content=data,
            headers={
                "Content-Type": "application/octet-stream",
                "Modelkeep-Signature": base64.b64encode(bundle).decode(),
            },
        )
    return r.status_code


def peak_growth(server: Server, data: bytes, bundle: bytes) -> tuple[int, int]:
    """Push ``data``; returns its status and how far the server's resident memory rose."""
    assert server.proc is not None
    status_file = Path(f"/proc/{server.proc.pid}/status")
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib(status_file, "VmHWM")
    status = push(server, data, bundle)
    return status, (_kib(status_file, "VmHWM") - before) * 1024


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


def onnx_of(nbytes: int) -> bytes:
    """``y = input + sum(w)`` with ``w`` ``nbytes`` of random FP32."""
    weights = np.random.default_rng(3).random(nbytes // 4, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
            helper.make_node("Add", ["input", "s"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return bytes(model.SerializeToString())


def test_a_wrongly_signed_upload_four_times_the_allowance_is_refused_and_leaves_nothing(
    srv: Server,
) -> None:
    data = os.urandom(LARGE)
    stranger_signed = sign_bytes(data[:-1] + b"x")  # a signature over other bytes

    status, growth = peak_growth(srv, data, stranger_signed)

    # Streamed in sealed and hashed, refused on its digest before any byte was held whole.
    assert status == 422
    assert growth < LARGE // 4, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


def test_a_corrupted_signed_upload_is_refused_by_the_scan_and_leaves_nothing(
    srv: Server,
) -> None:
    data = os.urandom(LARGE)

    status, growth = peak_growth(srv, data, sign_bytes(data))

    # The scan holds the one file it reads, never a second copy of the upload.
    assert status == 422
    assert growth < LARGE + 256 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)


def test_a_loaded_model_is_pushed_within_its_size_plus_256_mib(srv: Server) -> None:
    data = onnx_of(64 * MiB)

    status, growth = peak_growth(srv, data, sign_bytes(data))

    assert status == 201
    assert growth < len(data) + 256 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
    assert_nothing_left(srv)
