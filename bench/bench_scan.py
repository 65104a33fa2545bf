"""How long ``modelkeep scan`` takes on a large safetensors file, a large ONNX model and a large
PyTorch checkpoint.

Writes one safetensors file, one ONNX model and one ``torch.save`` zip checkpoint (a pickle
plus raw storages, every storage read and CRC-checked) of about ``--size-mb`` MiB each to a
temporary directory (``--dir``, default the system's), scans each with ``scan_path`` (the file
is memory mapped, as ``modelkeep scan`` does) and with ``scan_bytes`` (the bytes already in
memory, as the server does on push), ``--rounds`` times, prints the medians, and deletes the
files. When the directory has less than 5 GB free, the size drops to 256 MiB and the output
says so.

Usage: python bench/bench_scan.py [--size-mb 1024] [--rounds 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelkeep.scanning import ScanReport, Verdict, scan_bytes, scan_path

MIB = 1 << 20
TENSOR_MIB = 64  # each tensor of the generated models
MIN_FREE = 5 * 10**9
FALLBACK_MIB = 256


def write_safetensors(path: Path, size_mib: int) -> None:
    """``size_mib`` MiB of float32 tensors, written in pieces (never held in memory at once)."""
    count = max(1, size_mib // TENSOR_MIB)
    elements = TENSOR_MIB * MIB // 4
    header: dict[str, object] = {"__metadata__": {"format": "np"}}
    for index in range(count):
        begin = index * elements * 4
        header[f"layer{index}.weight"] = {
            "dtype": "F32",
            "shape": [elements // 1024, 1024],
            "data_offsets": [begin, begin + elements * 4],
        }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = np.arange(elements, dtype=np.float32).tobytes()
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            handle.write(chunk)


def write_onnx(path: Path, size_mib: int) -> None:
    """A chain of MatMuls whose initializers add up to ``size_mib`` MiB (protobuf limit: 2 GB)."""
    from onnx import TensorProto, helper, numpy_helper

    count = max(1, size_mib // TENSOR_MIB)
    side = int((TENSOR_MIB * MIB // 4) ** 0.5)
    weight = np.full((side, side), 0.5, dtype=np.float32)
    initializers = [numpy_helper.from_array(weight, f"w{index}") for index in range(count)]
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"])
        for i in range(count)
    ]
    nodes.append(helper.make_node("Identity", [f"h{count}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


def write_torch(path: Path, size_mib: int) -> None:
    """A state dict of float32 tensors saved by ``torch.save`` (a zip with stored members)."""
    import torch

    count = max(1, size_mib // TENSOR_MIB)
    elements = TENSOR_MIB * MIB // 4
    state = {f"layer{i}.weight": torch.full((elements,), 0.5) for i in range(count)}
    torch.save(state, path)


def timed(function: Callable[[], ScanReport], rounds: int) -> tuple[float, ScanReport]:
    times = []
    report = None
    for _ in range(rounds):
        start = time.perf_counter()
        report = function()
        times.append(time.perf_counter() - start)
    assert report is not None
    return statistics.median(times), report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of each model (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="scans per measurement")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    size = args.size_mb
    free = shutil.disk_usage(args.dir).free
    note = ""
    if free < MIN_FREE:
        size = min(size, FALLBACK_MIB)
        note = f" (only {free / 1e9:.1f} GB free in {args.dir}: reduced to {FALLBACK_MIB} MiB)"
    print(f"scan benchmark: {size} MiB per model, {args.rounds} rounds, medians{note}")

    workdir = Path(tempfile.mkdtemp(prefix="modelkeep-bench-scan-", dir=args.dir))
    failures = 0
    try:
        models = (
            ("model.safetensors", write_safetensors, Verdict.SAFE),
            ("model.onnx", write_onnx, Verdict.SAFE),
            ("model.pt", write_torch, Verdict.UNSAFE_FORMAT),  # pickle-based: refused by format
        )
        for name, writer, expected in models:
            path = workdir / name
            start = time.perf_counter()
            writer(path, size)
            written = time.perf_counter() - start
            actual = path.stat().st_size / MIB
            mapped, report = timed(lambda p=path: scan_path(p), args.rounds)
            data = path.read_bytes()
            in_memory, _ = timed(lambda d=data, n=name: scan_bytes(d, n), args.rounds)
            del data
            print(
                f"  {name:18s} {actual:7.0f} MiB  scan_path {mapped * 1000:9.1f} ms   "
                f"scan_bytes {in_memory * 1000:9.1f} ms   verdict {report.verdict.value} "
                f"({report.format}; written in {written:.1f} s)"
            )
            if report.verdict is not expected:
                failures += 1
                for finding in report.findings:
                    print(f"    {finding.severity.value}: {finding.location}: {finding.message}")
            path.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
