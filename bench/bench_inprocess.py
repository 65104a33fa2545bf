"""CPU time per V2 REST infer request through the whole ASGI app, in process (no sockets).

    .venv/bin/python bench/bench_inprocess.py [requests]

Builds a data dir in a temp dir, pushes the iris model under the bench's guard policy (the
defaults, rate and budget out of reach, as ``BENCH_POLICY`` in bench_infer.py), makes a
consumer key, then sends one-row V2 JSON requests straight into the ASGI app and prints the
process CPU time per request (median and least of 7 rounds). A quick check for changes on the
request path, not a throughput figure (bench_infer.py is that).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from modelkeep.api.app import create_app
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx, iris_rows

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}]}
).encode()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        init = init_data_dir(Path(tmp) / "data")
        service = Service.open(Settings(data_dir=Path(tmp) / "data", access_log=False))
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        service.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
        service.set_policy(
            admin,
            "iris",
            {"limits": {"rate": "1000000/second", "budget": "1000000000000/day"}},
        )
        key = service.create_key(admin, role="consumer", models=["iris"], expires_at=None)
        app = create_app(service, manage_lifecycle=False)
        headers = [
            (b"authorization", f"Bearer {key.token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def one() -> None:
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v2/models/iris/infer",
                "headers": headers,
                "client": ("127.0.0.1", 1234),
                "query_string": b"",
            }
            await app(scope, receive, send)

        async def rounds() -> list[float]:
            for _ in range(200):
                await one()
            results = []
            for _ in range(7):
                started = time.process_time()
                for _ in range(count):
                    await one()
                results.append((time.process_time() - started) / count * 1e6)
            return results

        results = asyncio.run(rounds())
        assert set(statuses) == {200}, set(statuses)
        print(
            f"{statistics.median(results):.1f} us CPU per request, least {min(results):.1f}"
            " (rounds: " + ", ".join(f"{r:.1f}" for r in results) + ")"
        )
        service.stop()


if __name__ == "__main__":
    main()
