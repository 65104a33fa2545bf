"""Regenerate the gRPC modules of the Open Inference Protocol from its .proto.

    .venv/bin/python scripts/grpc_codegen.py

Writes grpc_predict_v2_pb2.py, .pyi and grpc_predict_v2_pb2_grpc.py next to
src/modelkeep/api/grpc/grpc_predict_v2.proto with grpcio-tools (a dev dependency; the server
needs only grpcio and protobuf). The generated files are committed, and ruff and mypy skip them.

One change is made to protoc's output: the descriptors go into a descriptor pool of modelkeep's
own instead of protobuf's default pool. Every Open Inference Protocol stub (KServe's, Triton's
client, ours) declares the same `inference.*` names in different files, and the default pool
refuses a second file declaring a name it holds; with a pool of its own, modelkeep can share a
process with tritonclient or kserve.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "modelkeep" / "api" / "grpc"
PROTO = PACKAGE / "grpc_predict_v2.proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "# modelkeep: a pool of its own, not the default one (scripts/grpc_codegen.py says why).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def main() -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'src'}",
            f"--python_out={ROOT / 'src'}",
            f"--pyi_out={ROOT / 'src'}",
            f"--grpc_python_out={ROOT / 'src'}",
            str(PROTO),
        ],
        check=True,
    )
    module = PACKAGE / "grpc_predict_v2_pb2.py"
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit("protoc's output changed: the default pool line was not found once")
    module.write_text(text.replace(DEFAULT_POOL, OWN_POOL))


if __name__ == "__main__":
    main()
