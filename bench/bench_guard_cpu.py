"""What the default guard policy costs a V2 infer request, in CPU time, in one process.

`make bench` measures the whole server under wrk; on a shared machine its throughput moves with
everyone else's load. This measures the one number that moves least: CPU microseconds per
request (`time.process_time()`, every thread of the process, the detector feeder included),
through the same ASGI app the server runs (the fast infer path, authentication, Cedar, tensor
validation, admission, ONNX Runtime, hardening, detectors), called in a loop by 8 concurrent
tasks, with no sockets, TLS or load generator. Each policy gets its own data directory, model and
consumer key, and the detectors' state is warmed up first (PRADA's window and growing sets fill
over a few thousand requests, and cost more once full).

    .venv/bin/python bench/bench_guard_cpu.py [--requests 8000] [--warmup 3000] [--rounds 3]
        [--policies defaults,none] [--profile DIR] [--cpu 0 | --no-pin]

Per policy and round it prints the CPU per request, the share of it spent by the detector feeder
thread, and the garbage collector's passes and time during the run; then the lowest CPU per
request of the rounds per policy (the least disturbed by other processes), and the difference.
`--profile DIR` writes a cProfile of the request path (main thread) per policy.

Policies: `defaults` is `make bench`'s (the defaults a new model gets, rate and budget out of
the load's reach); `none` has no limits, full outputs and no detectors; `limits`, `hardening`
and `detectors` switch on one part of the defaults each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from modelkeep.api.app import create_app
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx, iris_rows

_OUT_OF_REACH = {"rate": "1000000/second", "budget": "1000000000000/day"}
_NONE: dict[str, Any] = {"limits": {}, "output": "full", "detect": []}
# Fields set over the policy a new model gets (the defaults).
POLICIES: dict[str, dict[str, Any]] = {
    "defaults": {"limits": _OUT_OF_REACH},
    "none": _NONE,
    "limits": {**_NONE, "limits": _OUT_OF_REACH},
    "hardening": {"limits": {}, "detect": []},
    "detectors": {"limits": {}, "output": "full"},
}
CONCURRENCY = 8


@dataclass
class Run:
    policy: str
    requests: int
    cpu: float
    feeder_cpu: float
    gc_passes: list[int] = field(default_factory=lambda: [0, 0, 0])
    gc_seconds: float = 0.0
    # The longest the request thread can be kept from the GIL at once by either, in CPU time.
    gc_longest: float = 0.0
    feeder_longest: float = 0.0

    def line(self) -> str:
        per = 1e6 / self.requests
        return (
            f"  {self.policy:<10} {self.cpu * per:6.1f} us CPU/req"
            f"  (feeder thread {self.feeder_cpu * per:5.1f})"
            f"  gc passes {self.gc_passes} taking {self.gc_seconds * per:5.1f} us/req;"
            f" longest: gc pass {self.gc_longest * 1e3:.1f} ms,"
            f" feeder slice {self.feeder_longest * 1e3:.1f} ms"
        )


class GcClock:
    """Counts the collector's passes by generation and the CPU time they take (thread time:
    a pass the OS preempts would otherwise count the other processes' time)."""

    def __init__(self) -> None:
        self.passes = [0, 0, 0]
        self.seconds = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            took = time.thread_time() - self._started
            self.seconds += took
            self.longest = max(self.longest, took)
            self.passes[info["generation"]] += 1


def bodies(count: int = 256) -> list[bytes]:
    """One-row V2 JSON bodies: iris rows with a little noise, as natural callers send."""
    rng = np.random.default_rng(0)
    base = np.asarray(iris_rows(16))
    out = []
    for i in range(count):
        row = base[i % 16] + rng.normal(0.0, 0.3, 4)
        data = [round(float(v), 2) for v in row]
        tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": data}
        out.append(orjson.dumps({"inputs": [tensor]}))
    return out


class World:
    """A service with the iris model under one policy, and a consumer key."""

    def __init__(self, root: Path, policy: dict[str, Any]) -> None:
        init = init_data_dir(root / "data")
        self.service = Service.open(Settings(data_dir=root / "data"))
        admin = self.service.authenticate(f"Bearer {init.admin_key}")
        self.service.put_model(admin, "iris", require_signature=False)
        self.service.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
        current = self.service.get_policy(admin, "iris")[0].to_json()
        self.service.set_policy(admin, "iris", {**current, **policy})
        key = self.service.create_key(admin, role="consumer", models=None, expires_at=None)
        self.headers = [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {key.token}".encode()),
            (b"content-type", b"application/json"),
        ]
        # Access lines go where a server's go, a file, not this bench's report.
        self._log = open(os.devnull, "w")  # noqa: SIM115 (closed in close())
        with contextlib.redirect_stdout(self._log):
            self.app = create_app(self.service, manage_lifecycle=False)
        # The feeder thread's own CPU time, added up around each batch it feeds.
        self.feeder_cpu = self.feeder_longest = 0.0
        feed = self.service.gate.feed
        process: Callable[[list[Any]], None] = feed._process

        def timed(items: list[Any]) -> None:
            started = time.thread_time()
            try:
                process(items)
            finally:
                took = time.thread_time() - started
                self.feeder_cpu += took
                self.feeder_longest = max(self.feeder_longest, took)

        feed._process = timed

    async def call(self, body: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "https",
            "path": "/v2/models/iris/infer",
            "raw_path": b"/v2/models/iris/infer",
            "query_string": b"",
            "root_path": "",
            "headers": [*self.headers, (b"content-length", b"%d" % len(body))],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 443),
        }
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        if status != 200:
            raise SystemExit(f"the server answered {status}; the bench needs 200s")

    async def load(self, requests: int, payloads: list[bytes]) -> None:
        async def client(first: int) -> None:
            for i in range(first, requests, CONCURRENCY):
                await self.call(payloads[i % len(payloads)])

        await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))

    def close(self) -> None:
        self.service.stop()
        self._log.close()

    def flush(self) -> None:
        if not self.service.gate.feed.flush(timeout=120):
            raise SystemExit("the detector feeder did not catch up within 120 s")


def measure(name: str, opts: argparse.Namespace, payloads: list[bytes]) -> Run:
    with tempfile.TemporaryDirectory(prefix="modelkeep-guard-cpu-") as tmp:
        world = World(Path(tmp), POLICIES[name])
        try:
            asyncio.run(world.load(opts.warmup, payloads))
            world.flush()
            clock = GcClock()
            profile = cProfile.Profile() if opts.profile else None
            gc.callbacks.append(clock)
            world.feeder_cpu = world.feeder_longest = 0.0
            started = time.process_time()
            try:
                if profile is not None:
                    profile.enable()
                asyncio.run(world.load(opts.requests, payloads))
                world.flush()
            finally:
                if profile is not None:
                    profile.disable()
                gc.callbacks.remove(clock)
            cpu = time.process_time() - started
            if profile is not None:
                opts.profile.mkdir(parents=True, exist_ok=True)
                profile.dump_stats(opts.profile / f"{name}.prof")
            return Run(
                name,
                opts.requests,
                cpu,
                world.feeder_cpu,
                clock.passes,
                clock.seconds,
                clock.longest,
                world.feeder_longest,
            )
        finally:
            world.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8000, help="measured requests per run")
    parser.add_argument("--warmup", type=int, default=3000, help="requests before measuring")
    parser.add_argument("--rounds", type=int, default=3, help="runs per policy (alternating)")
    parser.add_argument(
        "--policies", default="defaults,none", help=f"comma-separated: {', '.join(POLICIES)}"
    )
    parser.add_argument("--profile", type=Path, help="write DIR/POLICY.prof (cProfile)")
    parser.add_argument(
        "--cpu", type=int, default=0, help="the one CPU to run on, as make bench pins its server"
    )
    parser.add_argument("--no-pin", action="store_true", help="run on every CPU")
    opts = parser.parse_args()
    if not opts.no_pin:
        # One CPU, like the server under `make bench`: the detector feeder thread then takes
        # its CPU from the requests' thread instead of running beside it on another core
        # (which, on this VM, also slows the requests' thread and inflates its CPU time).
        os.sched_setaffinity(0, {opts.cpu})
    names = [name.strip() for name in opts.policies.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names or opts.requests < 1 or opts.warmup < 0 or opts.rounds < 1:
        parser.error(f"policies are among {', '.join(POLICIES)}; counts must be positive")
    payloads = bodies()
    best: dict[str, Run] = {}
    for round_no in range(1, opts.rounds + 1):
        print(f"round {round_no}/{opts.rounds}")
        for name in names:
            run = measure(name, opts, payloads)
            print(run.line(), flush=True)
            if name not in best or run.cpu < best[name].cpu:
                best[name] = run
    print("lowest of the rounds (CPU microseconds per request):")
    for name in names:
        print(best[name].line())
    if "defaults" in best and "none" in best:
        extra = (best["defaults"].cpu - best["none"].cpu) * 1e6 / opts.requests
        print(f"the defaults cost {extra:.1f} us CPU per request over no policy")


if __name__ == "__main__":
    main()
