"""CPU time per V2 REST infer request through the whole ASGI app, in process (no sockets).

    .venv/bin/python bench/bench_inprocess.py [--requests 2000]
    .venv/bin/python bench/bench_inprocess.py --against /path/to/other/checkout/src [--rounds 20]
        [--requests 1000] [--cpu 1]

Builds a data dir in a temp dir, pushes the iris model under the bench's guard policy (the
defaults, rate and budget out of reach, as ``BENCH_POLICY`` in bench_infer.py), makes a
consumer key, then sends one-row V2 JSON requests straight into the ASGI app and prints the
process CPU time per request (median and least of 7 rounds). A quick check for changes on the
request path, not a throughput figure (bench_infer.py is that).

``--against`` compares this checkout with another one (its ``src`` directory) on a shared
machine: both run as child processes pinned to the same CPU, and rounds alternate between them,
so that background load touches both alike; it prints both medians and the median of the
paired differences.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BODY = json.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
).encode()
POLICY = {"limits": {"rate": "1000000/second", "budget": "1000000000000/day"}}


def build(tmp: Path) -> tuple[Any, Callable[[], Awaitable[None]], list[int]]:
    """The service, one request to its app, and the statuses seen."""
    from modelkeep.api.app import create_app
    from modelkeep.bootstrap import init_data_dir
    from modelkeep.service import Service
    from modelkeep.settings import Settings
    from modelkeep.testing import build_iris_onnx

    init = init_data_dir(tmp / "data")
    service = Service.open(Settings(data_dir=tmp / "data", access_log=False))
    admin = service.authenticate(f"Bearer {init.admin_key}")
    service.put_model(admin, "iris", require_signature=False)
    service.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    service.set_policy(admin, "iris", POLICY)
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

    return service, one, statuses


async def timed(one: Callable[[], Awaitable[None]], count: int) -> float:
    """CPU microseconds per request over ``count`` requests."""
    started = time.process_time()
    for _ in range(count):
        await one()
    return (time.process_time() - started) / count * 1e6


def alone(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        service, one, statuses = build(Path(tmp))

        async def rounds() -> list[float]:
            await timed(one, 200)
            return [await timed(one, count) for _ in range(7)]

        results = asyncio.run(rounds())
        service.stop()
        if set(statuses) != {200}:
            raise SystemExit(f"not every request was answered 200: {sorted(set(statuses))}")
        print(
            f"{statistics.median(results):.1f} us CPU per request, least {min(results):.1f}"
            " (rounds: " + ", ".join(f"{r:.1f}" for r in results) + ")"
        )


def child() -> None:
    """Answer each line of stdin (a request count) with the CPU us per request it took."""
    with tempfile.TemporaryDirectory() as tmp:
        service, one, statuses = build(Path(tmp))

        async def serve() -> None:
            await timed(one, 300)
            print("ready", flush=True)
            for line in sys.stdin:
                print(await timed(one, int(line)), flush=True)

        asyncio.run(serve())
        service.stop()
        if set(statuses) != {200}:
            raise SystemExit(f"not every request was answered 200: {sorted(set(statuses))}")


def against(other_src: Path, rounds: int, count: int, cpu: int) -> None:
    mine = Path(__file__).resolve().parents[1] / "src"
    procs: dict[str, subprocess.Popen[str]] = {}
    for name, src in (("this", mine), ("other", other_src.resolve())):
        env = dict(os.environ, PYTHONPATH=str(src))
        procs[name] = subprocess.Popen(
            ["taskset", "-c", str(cpu), sys.executable, __file__, "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    results: dict[str, list[float]] = {"this": [], "other": []}
    try:
        for name, proc in procs.items():
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {name} checkout did not start")
        for i in range(rounds):
            for name in ("this", "other") if i % 2 == 0 else ("other", "this"):
                proc = procs[name]
                assert proc.stdin is not None
                assert proc.stdout is not None
                proc.stdin.write(f"{count}\n")
                proc.stdin.flush()
                results[name].append(float(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    for name, values in results.items():
        print(
            f"{name:5} median {statistics.median(values):.1f} us CPU per request,"
            f" least {min(values):.1f}"
        )
    paired = [a - b for a, b in zip(results["this"], results["other"], strict=True)]
    print(f"this - other, median of paired rounds: {statistics.median(paired):+.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, help="requests per round (default 2000; 1000 with --against)"
    )
    parser.add_argument("--against", type=Path, help="another checkout's src directory")
    parser.add_argument("--rounds", type=int, default=20, help="rounds each, with --against")
    parser.add_argument("--cpu", type=int, default=1, help="the CPU both run on, with --against")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
    elif args.against is not None:
        against(args.against, args.rounds, args.requests or 1000, args.cpu)
    else:
        alone(args.requests or 2000)


if __name__ == "__main__":
    main()
