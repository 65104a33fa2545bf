"""`make bench-overload`: what modelkeep does when asked for twice what it can serve (issue 4).

Issue 4's measure: "overload: at twice the sustainable rate, the p99 of admitted requests and
the share shed". modelkeep sheds with its bounded queue: at most MODELKEEP_MAX_QUEUE inference
requests (default 64) wait or run per worker, and the next one is answered 503 with Retry-After
("the server is overloaded"). This bench runs one server per queue bound (default 64, then 8),
each started as bench/bench_infer.py starts modelkeep: ``modelkeep init``, ``modelkeep serve
--workers 1``, the model pushed unsigned, a consumer key; the server pinned to the first CPU and
the load to the second. The model is built here, with no download: three MatMuls
(4 -> W -> W -> 3) called with 512 rows a request, so that each call takes milliseconds and the
model, not HTTP, is what runs out.

1. Sustainable rate R: closed loop, 4 then 8 keep-alive connections each with one request in
   flight, on the first server; R is the best rate of 200 answers.
2. Open loop at 0.5 R (baseline) and at 2 R, on each server: request i is sent at
   t0 + i / rate whether or not the earlier ones have been answered (as wrk2 does: a closed-loop
   client slows down with the server and never overloads it), from a pool of keep-alive HTTPS
   connections that grows when none is idle. Latency runs from the scheduled time, so a request
   that the client could not send on time still counts its wait (no coordinated omission); the
   client's own lateness (sent - scheduled) is reported, with a warning when it is large.

Shed means a 503 with Retry-After whose error says "overloaded". Any other status, a socket
error or a request left unanswered means the bench could not measure: its run is FAILED and the
command exits 1. Results go to the terminal and to bench/results/overload.json.

Usage: python bench/bench_overload.py [--max-queue 64,8] [--rate-factor 2] [--duration 10]
       [--warmup 2] [--width 768] [--rows 512]     (about 70 s with the defaults)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from bench_infer import (
    BENCH_DIR,
    CpuMeter,
    HarnessError,
    LoadResult,
    Pinning,
    Target,
    Ticks,
    address,
    choose_pinning,
    post_requests,
    read_response,
    run_python_load,
    start_modelkeep,
    tail,
    versions,
    workspace,
)

from modelkeep.settings import Settings
from modelkeep.testing import build_slow_onnx

RESULTS = BENCH_DIR / "results" / "overload.json"
MODEL = "slow"
INFER_PATH = f"/v2/models/{MODEL}/infer"
BODIES = 8  # distinct request bodies, cycled
SUSTAIN_CONNECTIONS = (4, 8)
# Connections opened before each open-loop run: one second of requests, at least MIN_PREOPEN.
# The pool grows past that on demand, but a TLS handshake with an overloaded server is slow and
# would show as client lateness rather than as the server's answer time.
PREOPEN_S = 1.0
MIN_PREOPEN = 32
CORE_SHARE_WARN = 0.8  # R below this share of 1 / (server CPU per request): warn
UNDERRATED_WARN = 1.1  # admitted above this many R in an overload run: warn
LATE_WARN_MS = 5.0  # client lateness p99 above this: the client shaped the run too
DRAIN_TIMEOUT_S = 60.0  # after the last send, how long answers are waited for
DEFAULT_QUEUE: int = Settings.model_fields["max_queue"].default

T = TypeVar("T")


# -- the model and its requests ----------------------------------------------------------------


def request_rows(rows: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((rows, 4)).round(3).astype(np.float32) for _ in range(count)]


def infer_body(rows: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    data = [round(float(x), 3) for x in rows.ravel()]
    return json.dumps({"inputs": [{**tensor, "data": data}]}, separators=(",", ":")).encode()


def check_server(target: Target, model: bytes, rows: np.ndarray, body: bytes, log: Path) -> None:
    """No admission limit on the model (only the queue may shed), and the server computes what
    ONNX Runtime computes here."""
    import onnxruntime as ort

    with httpx.Client(base_url=target.url, verify=target.ssl_context or True, timeout=60) as c:
        policy = c.get(f"/api/v1/models/{MODEL}/policy", headers=target.admin)
        if policy.status_code != 200:
            raise HarnessError(f"policy answered {policy.status_code}: {policy.text[:500]}")
        if policy.json().get("limits"):
            raise HarnessError(f"the model has limits, not only the queue: {policy.json()}")
        reply = c.post(
            INFER_PATH, content=body, headers={**target.headers, "Content-Type": "application/json"}
        )
    if reply.status_code != 200:
        raise HarnessError(f"infer answered {reply.status_code}: {reply.text[:500]}\n{tail(log)}")
    got = np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(-1, 3)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": rows})[0]
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise HarnessError("the server's scores differ from ONNX Runtime's")


# -- step 1: the sustainable rate (closed loop) ------------------------------------------------


def sustainable_rate(
    target: Target, bodies: list[bytes], opts: Options, pin: Pinning
) -> tuple[float, list[dict[str, Any]]]:
    """The best rate of 200 answers over closed-loop runs at SUSTAIN_CONNECTIONS."""
    found: list[dict[str, Any]] = []
    for connections in SUSTAIN_CONNECTIONS:
        if opts.warmup:
            run_python_load(target, bodies, connections, opts.warmup, INFER_PATH)
        meter = _meter(pin, target)
        before = meter.snapshot() if meter else None
        result = run_python_load(target, bodies, connections, opts.sustain, INFER_PATH)
        if meter:
            meter.fill(result, before, meter.snapshot())
        line = (
            f"  closed loop, {connections} connections: {result.rps:6.1f} req/s  "
            f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms"
        )
        if result.cpu_us_per_request is not None:
            line += (
                f"  server {result.cpu_us_per_request / 1000:4.1f} ms CPU/req, "
                f"{result.server_cpu_pct:3.0f}% of its core"
                f" (core {result.server_core_busy_pct:3.0f}% busy)"
            )
        print(line, flush=True)
        if result.failures:
            raise HarnessError(f"closed loop at {connections}: {'; '.join(result.failures)}")
        found.append({"connections": connections, **asdict(result)})
    best = max(found, key=lambda run: run["rps"])
    cpu_us = best["cpu_us_per_request"]
    if cpu_us:
        # CPU-bound on one core: what the server would do with its core to itself.
        whole_core = 1e6 / cpu_us
        print(
            f"  (at {cpu_us / 1000:.1f} ms CPU a request, a whole core serves ~{whole_core:.0f}/s)"
        )
        if best["rps"] < CORE_SHARE_WARN * whole_core:
            print(
                "  warning: the server did not have its core to itself (other processes): R is"
                " low, and the overload runs offer less than their factor of what it can do"
            )
    return best["rps"], found


def _meter(pin: Pinning, target: Target) -> CpuMeter | None:
    if pin.server_cpu is None or pin.load_cpu is None:
        return None
    return CpuMeter(pin.server_cpu, pin.load_cpu, target.proc.pid)


# -- step 2: open loop -------------------------------------------------------------------------


@dataclass(eq=False)  # hashed by identity, for the pool's set
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Pool:
    """Keep-alive HTTPS connections to one server: an idle one when there is one (oldest first,
    so every connection stays in use), a new one otherwise, up to ``cap`` open at once."""

    def __init__(self, target: Target, cap: int) -> None:
        self.host, self.port = address(target)
        self.context = target.ssl_context
        self.cap = cap
        self.idle: deque[Connection] = deque()
        self.every: set[Connection] = set()  # open ones, idle or busy
        self.open = 0
        self.peak = 0
        self.opened_at: list[float] = []
        self.cap_waits = 0  # requests that waited because `cap` connections were busy
        self.stale = 0  # idle connections the server had closed (keep-alive timeout)
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def get(self) -> tuple[Connection, bool]:
        """A connection, and whether it was opened for this request."""
        waited = False
        while True:
            while self.idle:
                conn = self.idle.popleft()
                if not conn.reader.at_eof():
                    return conn, False
                self.stale += 1
                self.discard(conn)
            if self.open < self.cap:
                self.open += 1
                self.peak = max(self.peak, self.open)
                try:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.context
                    )
                except BaseException:
                    self.open -= 1
                    self._wake()
                    raise
                self.opened_at.append(time.perf_counter())
                conn = Connection(reader, writer)
                self.every.add(conn)
                return conn, True
            if not waited:
                self.cap_waits += 1
                waited = True
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            await future

    def release(self, conn: Connection) -> None:
        self.idle.append(conn)
        self._wake()

    def discard(self, conn: Connection) -> None:
        conn.writer.close()
        self.every.discard(conn)
        self.open -= 1
        self._wake()

    def close(self) -> None:
        """Every connection, busy ones too (requests given up on after the drain timeout)."""
        for conn in list(self.every):
            self.discard(conn)
        self.idle.clear()

    def _wake(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return


@dataclass
class Shot:
    """One request: times from perf_counter (s), its status (0: no HTTP answer)."""

    index: int
    scheduled: float
    sent: float
    done: float
    status: int
    shed: bool
    error: str = ""


_SOCKET_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class OpenLoop:
    """Request i at t0 + i / rate, each on its own task, whatever the earlier ones are doing."""

    def __init__(
        self, pool: Pool, requests: list[bytes], rate: float, warmup: float, duration: float
    ) -> None:
        self.pool, self.requests, self.rate = pool, requests, rate
        self.first = round(warmup * rate)  # the measured window: requests first .. last - 1
        self.last = round((warmup + duration) * rate)
        self.shots: list[Shot] = []
        self.retries = 0  # requests re-sent once because a reused connection was found closed
        self.unanswered = 0
        self.t0 = 0.0
        # At the window's edges: the time, this process's CPU seconds, the server's CPU ticks.
        self.edges: dict[str, tuple[float, float, Ticks | None]] = {}

    async def run(self, meter: CpuMeter | None) -> None:
        preopen = min(self.pool.cap, max(MIN_PREOPEN, math.ceil(PREOPEN_S * self.rate)))
        await asyncio.gather(*(self._preopen() for _ in range(preopen)))
        self.t0 = time.perf_counter() + 0.05
        watcher = asyncio.create_task(self._watch(meter))
        pending: set[asyncio.Task[None]] = set()
        for i in range(self.last):
            at = self.t0 + i / self.rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._shoot(i, at))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await watcher
        if pending:
            _, late = await asyncio.wait(set(pending), timeout=DRAIN_TIMEOUT_S)
            for task in late:
                task.cancel()
            self.unanswered = len(late)
        self.pool.close()

    async def _preopen(self) -> None:
        conn, _ = await self.pool.get()
        self.pool.release(conn)

    async def _watch(self, meter: CpuMeter | None) -> None:
        for edge, i in (("start", self.first), ("end", self.last)):
            await asyncio.sleep(max(0.0, self.t0 + i / self.rate - time.perf_counter()))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.edges[edge] = (
                time.perf_counter(),
                usage.ru_utime + usage.ru_stime,
                meter.snapshot() if meter else None,
            )

    async def _shoot(self, index: int, scheduled: float) -> None:
        request = self.requests[index % len(self.requests)]
        for attempt in (1, 2):
            try:
                conn, fresh = await self.pool.get()
            except OSError as exc:
                self._record(index, scheduled, scheduled, 0, False, f"connect: {exc!r}")
                return
            sent = time.perf_counter()
            try:
                conn.writer.write(request)
                head, fields, body = await read_response(conn.reader)
            except _SOCKET_ERRORS as exc:
                self.pool.discard(conn)
                closed_idle = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                if attempt == 1 and not fresh and closed_idle:
                    self.retries += 1  # the keep-alive race: the server closed it as we sent
                    continue
                self._record(index, scheduled, sent, 0, False, repr(exc)[:200])
                return
            if fields.get(b"connection", b"").lower() == b"close":
                self.pool.discard(conn)
            else:
                self.pool.release(conn)
            status = int(head[9:12])
            shed = status == 503 and b"retry-after" in fields and b"overloaded" in body
            self._record(index, scheduled, sent, status, shed)
            return

    def _record(
        self, index: int, scheduled: float, sent: float, status: int, shed: bool, error: str = ""
    ) -> None:
        done = time.perf_counter()
        self.shots.append(Shot(index, scheduled, sent, done, status, shed, error))


# -- summaries ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank, in ms (as bench_infer's Python load generator)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000, 2)


@dataclass
class RunSummary:
    """One open-loop run: the measured window's requests, by outcome."""

    load: str  # "0.5R", "2R"
    offered_rps: float
    requests: int
    # The 200s: requests and rps count those answered in the window, latency is from the
    # scheduled time of those scheduled in it; CPU per request is per 200 answered.
    admitted: LoadResult
    admitted_from_send_ms: dict[str, float | None]
    shed: int
    shed_share: float
    shed_ms: dict[str, float | None]
    other_statuses: dict[str, int]
    late_ms: dict[str, float | None]  # client lateness: sent - scheduled, every request
    connections: dict[str, int]
    errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.admitted.failures + self.errors


def summarise(
    loop: OpenLoop, load: str, duration: float, meter: CpuMeter | None, cap: int
) -> RunSummary:
    # Requests scheduled in the measured window give the latencies and the shares; answers
    # that arrived in it give the admitted rate (the same in a steady state, not when the
    # server falls behind).
    start, end = loop.t0 + loop.first / loop.rate, loop.t0 + loop.last / loop.rate
    window = [s for s in loop.shots if loop.first <= s.index < loop.last]
    admitted = [s for s in window if s.status == 200]
    answered = sum(s.status == 200 and start <= s.done < end for s in loop.shots)
    shed = [s for s in window if s.shed]
    others = Counter(str(s.status) for s in window if s.status not in (0, 200) and not s.shed)
    socket_errors = Counter(s.error.split("(")[0] for s in window if s.status == 0)
    unanswered = (loop.last - loop.first) - len(window)
    latency = [s.done - s.scheduled for s in admitted]
    result = LoadResult(
        requests=answered,
        duration_s=duration,
        rps=round(answered / duration, 2),
        p50_ms=percentile(latency, 50) or 0.0,
        p90_ms=percentile(latency, 90) or 0.0,
        p99_ms=percentile(latency, 99) or 0.0,
        max_ms=round(max(latency, default=0.0) * 1000, 2),
        non_200=sum(others.values()),
        socket_errors={**socket_errors, **({"unanswered": unanswered} if unanswered else {})},
    )
    if {"start", "end"} <= loop.edges.keys():
        t_start, cpu_start, ticks_start = loop.edges["start"]
        t_end, cpu_end, ticks_end = loop.edges["end"]
        result.client_cpu_pct = round(100 * (cpu_end - cpu_start) / (t_end - t_start), 1)
        if meter:
            meter.fill(result, ticks_start, ticks_end)
    warm_failed = sum(s.index < loop.first and s.status != 200 and not s.shed for s in loop.shots)
    errors = [f"statuses {dict(others)}"] if others else []
    errors += [f"{warm_failed} warm-up requests failed"] if warm_failed else []
    return RunSummary(
        load=load,
        offered_rps=round(loop.rate, 2),
        requests=loop.last - loop.first,
        admitted=result,
        admitted_from_send_ms={
            "p50": percentile([s.done - s.sent for s in admitted], 50),
            "p99": percentile([s.done - s.sent for s in admitted], 99),
        },
        shed=len(shed),
        shed_share=round(len(shed) / max(1, loop.last - loop.first), 4),
        shed_ms={
            "p50": percentile([s.done - s.scheduled for s in shed], 50),
            "p99": percentile([s.done - s.scheduled for s in shed], 99),
        },
        other_statuses=dict(others),
        late_ms={
            "p50": percentile([s.sent - s.scheduled for s in window], 50),
            "p99": percentile([s.sent - s.scheduled for s in window], 99),
            "max": percentile([s.sent - s.scheduled for s in window], 100),
        },
        connections={
            "cap": cap,
            "peak_open": loop.pool.peak,
            "opened_in_window": sum(t >= start for t in loop.pool.opened_at),
            "cap_waits": loop.pool.cap_waits,
            "stale_closed": loop.pool.stale,
            "retried": loop.retries,
        },
        errors=errors,
    )


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # installed with uvicorn[standard]: a cheaper client

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def open_loop(
    target: Target,
    requests: list[bytes],
    rate: float,
    load: str,
    opts: Options,
    pin: Pinning,
) -> RunSummary:
    loop = OpenLoop(Pool(target, opts.cap), requests, rate, opts.warmup, opts.duration)
    meter = _meter(pin, target)
    run_async(loop.run(meter))
    summary = summarise(loop, load, opts.duration, meter, opts.cap)
    print(f"  {load:>5} {_line(summary)}", flush=True)
    return summary


def _ms(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def _line(run: RunSummary) -> str:
    a = run.admitted
    line = (
        f"offered {run.offered_rps:6.1f}/s  admitted {a.rps:6.1f}/s  shed {run.shed_share:6.1%}"
        f"  admitted p50 {_ms(a.p50_ms)} p99 {_ms(a.p99_ms)} max {_ms(a.max_ms)} ms"
        f"  shed p50 {_ms(run.shed_ms['p50'], 5)} p99 {_ms(run.shed_ms['p99'], 5)} ms"
        f"  late p99 {_ms(run.late_ms['p99'], 4)} ms"
    )
    if a.server_core_busy_pct is not None:
        line += f"  server core {a.server_core_busy_pct:3.0f}% busy"
    if a.client_cpu_pct is not None:
        line += f"  client {a.client_cpu_pct:3.0f}% CPU"
    if run.failures:
        line += f"  FAILED: {'; '.join(run.failures)}"
    return line


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Options:
    max_queue: list[int]
    rate_factor: float
    rate: float | None
    duration: float
    warmup: float
    sustain: float
    width: int
    rows: int
    cap: int
    pin: bool
    output: Path


@dataclass
class ServerRuns:
    max_queue: int
    settings: dict[str, str]
    runs: list[RunSummary] = field(default_factory=list)


def run(opts: Options) -> int:
    pin = choose_pinning(opts.pin)
    if pin.load_cpu is not None:
        os.sched_setaffinity(0, {pin.load_cpu})  # the client and the harness off the server's core
    load_before = os.getloadavg()[0]
    model = build_slow_onnx(opts.width)
    rows = request_rows(opts.rows, BODIES)
    bodies = [infer_body(r) for r in rows]
    print(f"model: MatMul chain 4 -> {opts.width} -> {opts.width} -> 3, {opts.rows} rows/request")
    print(f"  ({len(bodies[0]):,} bytes of JSON a request); pinning: {pin.describe()}")
    print(f"open loop: {opts.warmup:g} s warm-up + {opts.duration:g} s measured per rate")
    if load_before > 0.5:
        print(f"note: load average is {load_before:.2f} before we start: expect noisy numbers")

    rate, sustain = opts.rate, None
    servers: list[ServerRuns] = []
    with workspace() as (tmp, procs):
        for bound in opts.max_queue:
            settings = {} if bound == DEFAULT_QUEUE else {"MODELKEEP_MAX_QUEUE": str(bound)}
            shown = "the default, unset" if not settings else "MODELKEEP_MAX_QUEUE"
            # The load comes from one address with up to --cap connections: above the default
            # per-client cap (200), which would refuse them before the queue is reached.
            settings["MODELKEEP_MAX_CONNECTIONS_PER_CLIENT"] = str(opts.cap + 16)
            print(f"\nmax_queue {bound} ({shown}): starting modelkeep", flush=True)
            home = tmp / f"q{bound}"
            home.mkdir()
            # No admission limit and full outputs: only the queue may shed, and the answers
            # are compared with ONNX Runtime's (a new model's defaults would do neither).
            target = start_modelkeep(
                home,
                model,
                procs,
                pin,
                name=MODEL,
                settings=settings,
                policy={"limits": {}, "output": "full", "detect": []},
            )
            log = home / "modelkeep.log"  # where start_modelkeep sends the server's output
            check_server(target, model, rows[0], bodies[0], log)
            if rate is None:
                rate, sustain = sustainable_rate(target, bodies, opts, pin)
                print(f"sustainable rate R = {rate:.1f} req/s (best closed-loop rate)", flush=True)
            requests = post_requests(target, bodies, INFER_PATH)
            server = ServerRuns(bound, settings)
            for factor in (0.5, opts.rate_factor):
                load = f"{factor:g}R"
                server.runs.append(open_loop(target, requests, factor * rate, load, opts, pin))
                if server.runs[-1].failures:
                    print(f"  the server's log ends with:\n{tail(log)}")
            servers.append(server)
            procs.stop(target.proc)

    assert rate is not None
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "pinning": pin.describe(),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
        "model": {"width": opts.width, "rows": opts.rows, "body_bytes": len(bodies[0])},
        "load": {
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "sustain_s": opts.sustain,
            "rate_factor": opts.rate_factor,
            "connection_cap": opts.cap,
        },
        "sustainable": {"rate": round(rate, 2), "given": opts.rate is not None, "runs": sustain},
        "versions": versions(),
    }
    return 0 if report(servers, rate, opts, meta) else 1


def report(servers: list[ServerRuns], rate: float, opts: Options, meta: dict[str, Any]) -> bool:
    """Print the table and the comparisons, write the JSON; True when every run was clean."""
    print(f"\nresults (R = {rate:.1f} req/s; latency in ms from the scheduled send time;")
    print("shed = 503 + Retry-After; conns = most connections open; cpu/200 = server CPU ms")
    print("per 200 answered):")
    header = (
        f"{'queue':>5} | {'load':>5} | {'offered/s':>9} | {'admitted/s':>10} | {'shed':>6} | "
        f"{'adm p50':>7} {'p99':>7} {'max':>7} | {'shed p50':>8} {'p99':>5} | "
        f"{'late p99':>8} | {'conns':>5} | {'cpu/200':>7}"
    )
    print(header)
    print("-" * len(header))
    for server in servers:
        for r in server.runs:
            a = r.admitted
            cpu = _ms(None if a.cpu_us_per_request is None else a.cpu_us_per_request / 1000)
            print(
                f"{server.max_queue:>5} | {r.load:>5} | {r.offered_rps:>9.1f} | {a.rps:>10.1f} | "
                f"{r.shed_share:>6.1%} | {_ms(a.p50_ms)} {_ms(a.p99_ms)} {_ms(a.max_ms)} | "
                f"{_ms(r.shed_ms['p50'], 8)} {_ms(r.shed_ms['p99'], 5)} | "
                f"{_ms(r.late_ms['p99'], 8)} | {r.connections['peak_open']:>5} | {cpu}"
                + ("  FAILED" if r.failures else "")
            )
    print()
    comparisons = []
    for server in servers:
        base, over = server.runs[0], server.runs[-1]
        ratio = over.admitted.p99_ms / base.admitted.p99_ms if base.admitted.p99_ms else None
        bound_ms = 1000 * server.max_queue / rate
        comparisons.append(
            {
                "max_queue": server.max_queue,
                "p99_ratio": None if ratio is None else round(ratio, 2),
                "queue_over_R_ms": round(bound_ms, 1),
            }
        )
        print(
            f"max_queue {server.max_queue}: admitted p99 at {over.load} / at {base.load} = "
            + ("-" if ratio is None else f"{ratio:.1f}x")
            + f"; max_queue / R = {bound_ms:.0f} ms (the wait of a full queue served at R)"
        )
    warnings = []
    for server in servers:
        for r in server.runs:
            where = f"max_queue {server.max_queue} at {r.load}"
            late = r.late_ms["p99"]
            if late is not None and late > LATE_WARN_MS:
                warnings.append(
                    f"{where}: the client's p99 lateness is {late:.1f} ms: the client, not only "
                    "the server, shaped this run"
                )
            if r.connections["cap_waits"]:
                warnings.append(
                    f"{where}: the connection cap ({opts.cap}) was hit; "
                    f"{r.connections['cap_waits']} requests waited for a connection"
                )
            if r.offered_rps > rate and r.admitted.rps > UNDERRATED_WARN * rate:
                warnings.append(
                    f"{where}: {r.admitted.rps:.0f} admitted/s, more than R: R was measured low"
                    f" (noise), so this run offered {r.offered_rps / r.admitted.rps:.2f}x what"
                    " the server served, not the factor asked"
                )
            for failure in r.failures:
                warnings.append(f"{where}: FAILED: {failure}")
    for warning in warnings:
        print(f"warning: {warning}")
    clean = not any(r.failures for server in servers for r in server.runs)
    if not clean:
        print("some runs FAILED: their numbers are not a valid measurement")

    document = {
        **meta,
        "clean": clean,
        "comparisons": comparisons,
        "servers": [
            {
                "max_queue": s.max_queue,
                "settings": s.settings,
                "runs": [{**asdict(r), "failures": r.failures} for r in s.runs],
            }
            for s in servers
        ],
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {opts.output}")
    return clean


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--max-queue",
        default=f"{DEFAULT_QUEUE},8",
        help=f"comma-separated queue bounds, one server each ({DEFAULT_QUEUE}: left unset)",
    )
    parser.add_argument("--rate-factor", type=float, default=2.0, help="overload, in units of R")
    parser.add_argument("--rate", type=float, help="use this R (req/s) instead of measuring it")
    parser.add_argument("--duration", type=float, default=10, help="seconds measured per rate")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per run")
    parser.add_argument(
        "--sustain-duration", type=float, default=5, help="seconds measured per closed-loop run"
    )
    parser.add_argument("--width", type=int, default=768, help="the model's hidden width W")
    parser.add_argument("--rows", type=int, default=512, help="rows per request")
    parser.add_argument("--cap", type=int, default=512, help="most connections open at once")
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    try:
        bounds = list(dict.fromkeys(int(q) for q in args.max_queue.split(",") if q.strip()))
    except ValueError:
        parser.error("--max-queue takes integers, e.g. 64,8")
    if not bounds or min(bounds) < 1:
        parser.error("need --max-queue values >= 1")
    if args.duration <= 0 or args.warmup < 0 or args.sustain_duration <= 0:
        parser.error("need --duration > 0, --warmup >= 0 and --sustain-duration > 0")
    if args.rate_factor <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("need --rate-factor > 0 and --rate > 0")
    if args.width < 1 or args.rows < 1 or args.cap < MIN_PREOPEN:
        parser.error(f"need --width >= 1, --rows >= 1 and --cap >= {MIN_PREOPEN}")
    return Options(
        max_queue=bounds,
        rate_factor=args.rate_factor,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        sustain=args.sustain_duration,
        width=args.width,
        rows=args.rows,
        cap=args.cap,
        pin=not args.no_pin,
        output=args.output,
    )


def main() -> int:
    opts = parse_args()
    started = time.monotonic()
    try:
        code = run(opts)
    except HarnessError as exc:
        print(f"\nbench could not measure: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, temporary files removed", file=sys.stderr)
        return 130
    print(f"run time: {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
