"""The baseline for `make bench`: a bare Open Inference Protocol (V2) JSON endpoint.

It does only what any ONNX endpoint must do: parse the V2 JSON body (orjson), run the ONNX
Runtime session, and encode the V2 JSON response. No TLS, no authentication, no authorization,
no tensor validation, no audit. The session is configured exactly as modelkeep configures its
own (CPU provider, one intra-op and one inter-op thread, sequential execution), and uvicorn runs
with modelkeep's defaults (loop and http "auto", i.e. uvloop and httptools with
uvicorn[standard]; one worker; no access log), so the difference bench_infer.py measures is the
cost of modelkeep's security path and framework.

Usage: python bench/bare_server.py --model iris.onnx --port 8000

Routes: ``GET /v2/health/ready`` and ``POST /v2/models/{any name}/infer``. Anything else is 404;
a body that is not a V2 request is 400 (so a broken load test shows up as non-2xx, never as a
fast error path mistaken for throughput).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# V2 datatype <-> numpy, both directions; enough for the models the bench serves.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_V2_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def load_session(path: Path) -> ort.InferenceSession:
    """The same session configuration as modelkeep's ONNX runtime (runtime/onnx.py)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])


class BareV2App:
    """A raw ASGI app: V2 JSON in, ONNX Runtime, V2 JSON out."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/v2/health/ready":
            await _respond(send, 200, b'{"ready":true}')
        elif method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            body = await _read_body(receive)
            try:
                payload = self.infer(path[len("/v2/models/") : -len("/infer")], body)
            except (ValueError, KeyError, TypeError, IndexError, orjson.JSONDecodeError):
                await _respond(send, 400, b'{"error":"bad request"}')
                return
            await _respond(send, 200, payload)
        else:
            await _respond(send, 404, b'{"error":"not found"}')

    def infer(self, model: str, body: bytes) -> bytes:
        request = orjson.loads(body)
        feeds = {
            tensor["name"]: np.asarray(tensor["data"], dtype=_DTYPES[tensor["datatype"]]).reshape(
                tensor["shape"]
            )
            for tensor in request["inputs"]
        }
        results = self.session.run(self.output_names, feeds)
        outputs = [
            {
                "name": name,
                "datatype": _V2_NAMES[array.dtype],
                "shape": list(array.shape),
                "data": array.ravel(),
            }
            for name, array in zip(self.output_names, results, strict=True)
        ]
        return orjson.dumps(
            {"model_name": model, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY
        )

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    # Content-Length, as Starlette's Response sends: without it uvicorn would use chunked framing.
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX file to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = BareV2App(load_session(args.model))
    # uvicorn's defaults, as modelkeep uses them: loop="auto", http="auto", one worker.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        server_header=False,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
