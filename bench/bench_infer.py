"""`make bench`: modelkeep's full inference path against a bare ONNX Runtime endpoint.

One run starts two servers on this machine and puts the same load on each, in turn:

* modelkeep, as a user runs it: ``modelkeep init`` then ``modelkeep serve --workers 1`` (HTTPS),
  the iris model pushed through the management API and called with a consumer key, so each
  request pays for TLS, key check, Cedar authorization, tensor validation and inference;
* bench/bare_server.py: plain HTTP, V2 JSON parsing and the same ONNX Runtime session, nothing else.

The same modelkeep server also listens for the Open Inference Protocol over gRPC (TLS, the same
key), measured as a third row (``mk-grpc``) at the same concurrencies: one HTTP/2 connection per
client, one call in flight on each, the one-row tensor in ``raw_input_contents`` as tritonclient
sends it. wrk speaks no gRPC; that load comes from h2load (nghttp2-client, installed with apt-get
when missing), which posts the framed ModelInferRequest over HTTP/2 and TLS as a gRPC client
does. h2load cannot read the grpc-status trailers, so the answers are first checked with a real
gRPC client, and each run is checked against the server's own count of failed calls (its
Prometheus metrics). Without h2load, a grpc.aio client in this process makes the load; its CPU
is shown, and near 100% means the client, not the server, set the number.

The load is wrk (installed with apt-get when missing; a small Python load generator otherwise)
with keep-alive connections at several concurrencies for a fixed time after a warm-up, in
rounds that alternate the two servers (the table shows medians). The servers are pinned to one
core and the load generator to the other. Results go to the terminal and to
bench/results/infer.json (raw wrk output in bench/results/wrk/). Targets missed print FAIL but
exit 0 (a measurement, not a test); a harness that could not measure (a server that does not
start, non-2xx answers) exits 1.

Usage: python bench/bench_infer.py [--duration 10] [--warmup 2] [--rounds 3] [--concurrency 1,8,64]
       (quick look: --duration 2 --warmup 1 --rounds 1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

from modelkeep.testing import free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "infer.json"
BIN = Path(sys.executable).parent
MODEL = "iris"
INFER_PATH = f"/v2/models/{MODEL}/infer"
TFSERVING_PATH = f"/v1/models/{MODEL}:predict"
# Each other protocol's throughput against V2 REST's, at RATIO_CONCURRENCY, in the same run.
PROTOCOL_TARGET = 0.85

# The targets this bench reports on (docs: bench/README.md).
RATIO_TARGET = 0.6  # modelkeep rps >= 0.6 x bare rps ...
RATIO_CONCURRENCY = 8  # ... at this concurrency
P99_TARGET_MS = 5.0  # modelkeep p99 latency < 5 ms ...
P99_CONCURRENCY = 1  # ... at this concurrency

START_TIMEOUT_S = 60.0
BODY_ROWS = 16  # distinct one-row bodies, cycled, so no layer can cache a single answer


# The model runs under modelkeep's default guard policy (hardened output for the consumer,
# PRADA, near-copy and OOD detectors in alert mode, admission counted), with the default rate
# and budget raised out of the load's reach: they would refuse it, and the bench measures what
# each request costs, not how many a key may send.
BENCH_POLICY: dict[str, Any] = json.loads(
    os.environ.get(
        "BENCH_POLICY",
        '{"limits": {"rate": "1000000/second", "budget": "1000000000000/day"}}',
    )
)


class HarnessError(Exception):
    """The bench could not measure (not a missed target)."""


# -- results -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One measured run of one server at one concurrency."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_200: int
    socket_errors: dict[str, int]
    # Filled in when the server is pinned: its own CPU and how busy its core was (% of one core).
    server_cpu_pct: float | None = None
    server_core_busy_pct: float | None = None
    load_core_busy_pct: float | None = None
    cpu_us_per_request: float | None = None
    # wrk's own CPU (% of one core): near 100 would mean the client, not the server, is the limit.
    client_cpu_pct: float | None = None

    @classmethod
    def of(
        cls,
        latencies_s: list[float],
        duration_s: float,
        non_200: int,
        socket_errors: dict[str, int],
        client_cpu_pct: float | None = None,
    ) -> LoadResult:
        """A run from its per-request latencies (seconds), as the harness's own clients and
        h2load's log give them: requests/s and nearest-rank percentiles in ms."""
        ordered = sorted(latencies_s)

        def percentile(q: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000

        return cls(
            requests=len(ordered),
            duration_s=round(duration_s, 3),
            rps=len(ordered) / duration_s,
            p50_ms=percentile(50),
            p90_ms=percentile(90),
            p99_ms=percentile(99),
            max_ms=ordered[-1] * 1000 if ordered else 0.0,
            non_200=non_200,
            socket_errors=socket_errors,
            client_cpu_pct=client_cpu_pct,
        )

    @property
    def failures(self) -> list[str]:
        found = [f"{self.non_200} non-200 responses"] if self.non_200 else []
        found += [f"{n} socket {kind} errors" for kind, n in self.socket_errors.items() if n]
        if self.requests == 0:
            found.append("no request completed")
        return found


SUMMARY_FIELDS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cpu_us_per_request",
    "server_cpu_pct",
    "server_core_busy_pct",
    "client_cpu_pct",
    "load_core_busy_pct",
)


@dataclass
class Point:
    """One concurrency: every round of both servers, and the errors seen."""

    concurrency: int
    rounds: dict[str, list[LoadResult]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, result: LoadResult, *, warmup: bool = False) -> None:
        if result.failures:
            prefix = "warm-up: " if warmup else ""
            self.errors.setdefault(name, []).extend(prefix + f for f in result.failures)
        if not warmup:
            self.rounds.setdefault(name, []).append(result)

    def summary(self, name: str) -> dict[str, float] | None:
        """Median of each number over the rounds; None when not measured cleanly."""
        runs = self.rounds.get(name)
        if not runs or name in self.errors:
            return None
        found: dict[str, float] = {}
        for key in SUMMARY_FIELDS:
            values = [v for v in (getattr(r, key) for r in runs) if v is not None]
            if values:
                found[key] = statistics.median(values)
        return found

    def measured(self, name: str) -> bool:
        """Whether ``name`` was loaded at this point at all (``--targets`` may leave it out)."""
        return name in self.rounds or name in self.errors

    def ratio(self) -> float | None:
        mk, bare = self.summary("modelkeep"), self.summary("bare")
        if mk is None or bare is None or not bare["rps"]:
            return None
        return mk["rps"] / bare["rps"]

    def protocol_ratio(self, name: str) -> float | None:
        """Another protocol's throughput against V2 REST's on the same server."""
        other, v2 = self.summary(name), self.summary("modelkeep")
        if other is None or v2 is None or not v2["rps"]:
            return None
        return other["rps"] / v2["rps"]


# -- processes and clean-up --------------------------------------------------------------------


class Processes:
    """The servers this run started; all stopped on exit, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: Sequence[str], log: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        print(f"  $ {' '.join(command)}", flush=True)
        with log.open("wb") as sink:
            # Own session: the terminal's Ctrl-C reaches us, and we stop the server in order.
            proc = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: only what it started
                proc.wait()
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._running):
            self.stop(proc)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"server exited ({proc.returncode}) before {what}:\n{tail(log)}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise HarnessError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}:\n{tail(log)}")


# -- CPU pinning and tools ---------------------------------------------------------------------


@dataclass
class Pinning:
    server_cpu: int | None
    load_cpu: int | None

    def server(self, command: list[str]) -> list[str]:
        return (
            command
            if self.server_cpu is None
            else ["taskset", "-c", str(self.server_cpu), *command]
        )

    def load(self, command: list[str]) -> list[str]:
        return command if self.load_cpu is None else ["taskset", "-c", str(self.load_cpu), *command]

    def describe(self) -> str:
        if self.server_cpu is None:
            return "none (servers and load generator share the CPUs)"
        return f"server on CPU {self.server_cpu}, load generator on CPU {self.load_cpu}"


def choose_pinning(enabled: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning(None, None)
    if len(cpus) < 2 or shutil.which("taskset") is None:
        print("note: no pinning (needs taskset and 2 CPUs); server and load share the CPUs")
        return Pinning(None, None)
    return Pinning(cpus[0], cpus[1])


Ticks = tuple[int, int, int, int, int]


class CpuMeter:
    """CPU ticks of both pinned cores and of the server process, from /proc (Linux)."""

    def __init__(self, server_cpu: int, load_cpu: int, pid: int) -> None:
        self.server_cpu, self.load_cpu, self.pid = server_cpu, load_cpu, pid

    def snapshot(self) -> Ticks | None:
        """(server core busy, server core total, load core busy, load core total, process)."""
        try:
            with open("/proc/stat") as stat:
                lines = {line.split()[0]: line.split()[1:9] for line in stat}
            server = [int(x) for x in lines[f"cpu{self.server_cpu}"]]
            load = [int(x) for x in lines[f"cpu{self.load_cpu}"]]
            # After the ")" that ends the command name: utime and stime are the 12th and 13th.
            own = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, KeyError, ValueError, IndexError):
            return None
        return (
            sum(server) - server[3] - server[4],  # all but idle and iowait
            sum(server),
            sum(load) - load[3] - load[4],
            sum(load),
            int(own[11]) + int(own[12]),
        )

    @staticmethod
    def fill(result: LoadResult, before: Ticks | None, after: Ticks | None) -> None:
        if before is None or after is None or after[1] <= before[1] or after[3] <= before[3]:
            return
        elapsed = after[1] - before[1]
        result.server_core_busy_pct = round(100 * (after[0] - before[0]) / elapsed, 1)
        result.load_core_busy_pct = round(100 * (after[2] - before[2]) / (after[3] - before[3]), 1)
        result.server_cpu_pct = round(100 * (after[4] - before[4]) / elapsed, 1)
        if result.requests:
            seconds = (after[4] - before[4]) / os.sysconf("SC_CLK_TCK")
            result.cpu_us_per_request = round(seconds / result.requests * 1e6, 1)


def ensure_tool(program: str, package: str) -> str | None:
    """``program``'s path, installing Debian's ``package`` with apt-get when missing and
    possible; None otherwise."""
    found = shutil.which(program)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"{program} is not installed and cannot be installed here (needs root and apt-get)")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        print(f"{program} is not installed; running: {' '.join(command)}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            print(f"  failed ({done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
            return None
    return shutil.which(program)


# -- the two servers ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str  # base URL
    headers: dict[str, str]
    ssl_context: ssl.SSLContext | None
    proc: subprocess.Popen[bytes]
    admin: dict[str, str] = field(default_factory=dict)  # modelkeep's admin key header
    ca_cert: str | None = None  # modelkeep's CA, for the gRPC client
    grpc: str | None = None  # host:port of the gRPC listener, for a gRPC target
    # What the load posts: V2 infer bodies by default; another protocol's path and bodies.
    path: str = INFER_PATH
    bodies: list[bytes] | None = None


def server_env() -> dict[str, str]:
    # Defaults only: a MODELKEEP_* variable in the caller's shell must not change what we measure.
    return {k: v for k, v in os.environ.items() if not k.startswith("MODELKEEP_")}


def start_modelkeep(
    tmp: Path,
    model: bytes,
    procs: Processes,
    pin: Pinning,
    *,
    name: str = MODEL,
    settings: Mapping[str, str] | None = None,
    workers: int = 1,
    label: str = "modelkeep",
    policy: Mapping[str, Any] | None = None,
) -> Target:
    """A fresh data dir under ``tmp``, ``modelkeep serve --workers N`` on it, ``model`` pushed
    as ``name`` (unsigned) and a consumer key for it. ``settings``: MODELKEEP_* variables for the
    server, on top of the defaults (none by default). ``label`` names the target in the output.
    ``policy``: fields of the model's guard policy set over its defaults (none: the defaults,
    as a new model gets them)."""
    cli = BIN / "modelkeep"
    if not cli.exists():
        raise HarnessError(f"{cli} not found; run `make venv` first")
    tmp.mkdir(parents=True, exist_ok=True)
    data_dir = tmp / "modelkeep-data"
    command = [str(cli), "init", "--data-dir", str(data_dir), "--json"]
    print(f"  $ {' '.join(command)}", flush=True)
    init = subprocess.run(command, capture_output=True, text=True, env=server_env(), timeout=120)
    if init.returncode != 0:
        raise HarnessError(f"modelkeep init failed ({init.returncode}):\n{init.stderr[-2000:]}")
    created = json.loads(init.stdout)
    admin = {"Authorization": f"Bearer {created['admin_key']}"}
    context = ssl.create_default_context(cafile=created["ca_cert"])

    port = free_port()
    log = tmp / "modelkeep.log"
    serve = [str(cli), "serve", "--data-dir", str(data_dir), "--port", str(port)]
    serve += ["--workers", str(workers)]
    proc = procs.start(pin.server(serve), log, {**server_env(), **(settings or {})})
    base = f"https://127.0.0.1:{port}"
    with httpx.Client(base_url=base, verify=context, timeout=60) as client:
        wait_for(
            "/v2/health/live",
            lambda: client.get("/v2/health/live").status_code == 200,
            proc,
            log,
        )
        # Signatures are checked at push time only; the inference path is the same for a
        # signed model, so the bench spares itself the publisher key and signing steps.
        created_model = client.put(
            f"/api/v1/models/{name}",
            json={"description": "bench", "require_signature": False},
            headers=admin,
        )
        if created_model.status_code not in (200, 201):
            raise HarnessError(
                f"model creation answered {created_model.status_code}: "
                f"{created_model.text[:500]}\n{tail(log)}"
            )
        pushed = client.post(
            f"/api/v1/models/{name}/versions",
            params={"filename": f"{name}.onnx"},
            content=model,
            headers={**admin, "Content-Type": "application/octet-stream"},
        )
        if pushed.status_code not in (200, 201):
            raise HarnessError(
                f"push answered {pushed.status_code}: {pushed.text[:500]}\n{tail(log)}"
            )
        if policy is not None:
            current = client.get(f"/api/v1/models/{name}/policy", headers=admin).json()
            changed = client.put(
                f"/api/v1/models/{name}/policy", json={**current, **policy}, headers=admin
            )
            if changed.status_code != 200:
                raise HarnessError(f"policy answered {changed.status_code}: {changed.text[:500]}")
        made = client.post(
            "/api/v1/keys", json={"role": "consumer", "models": [name]}, headers=admin
        )
        if made.status_code not in (200, 201):
            raise HarnessError(
                f"key creation answered {made.status_code}: {made.text[:500]}\n{tail(log)}"
            )
        consumer = {"Authorization": f"Bearer {made.json()['key']}"}
        wait_for(
            f"/v2/models/{name}/ready",
            lambda: client.get(f"/v2/models/{name}/ready", headers=consumer).status_code == 200,
            proc,
            log,
        )
    return Target(label, base, consumer, context, proc, admin, ca_cert=created["ca_cert"])


def start_bare(tmp: Path, model_path: Path, procs: Processes, pin: Pinning) -> Target:
    port = free_port()
    log = tmp / "bare.log"
    command = [
        sys.executable,
        str(BENCH_DIR / "bare_server.py"),
        "--model",
        str(model_path),
        "--port",
        str(port),
    ]
    proc = procs.start(pin.server(command), log, server_env())
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        wait_for(
            "/v2/health/ready",
            lambda: client.get("/v2/health/ready").status_code == 200,
            proc,
            log,
        )
    return Target("bare", base, {}, None, proc)


def infer_bodies(rows: list[list[float]]) -> list[bytes]:
    return [
        json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": row}]},
            separators=(",", ":"),
        ).encode()
        for row in rows
    ]


def tfserving_bodies(rows: list[list[float]]) -> list[bytes]:
    """The same rows as TF Serving REST row-form bodies."""
    return [json.dumps({"instances": [row]}, separators=(",", ":")).encode() for row in rows]


def tfserving_target(modelkeep: Target, rows: list[list[float]]) -> Target:
    """The same modelkeep server, model, key and rows, through TF Serving's REST API; its
    answers are checked against V2's before anything is measured."""
    target = Target(
        "tfserving",
        modelkeep.url,
        modelkeep.headers,
        modelkeep.ssl_context,
        modelkeep.proc,
        modelkeep.admin,
        path=TFSERVING_PATH,
        bodies=tfserving_bodies(rows),
    )
    v2 = smoke_outputs(modelkeep, infer_bodies(rows))
    assert target.bodies is not None
    with httpx.Client(verify=target.ssl_context or True, timeout=60) as client:
        for body, expected in zip(target.bodies, v2, strict=True):
            reply = client.post(
                target.url + TFSERVING_PATH,
                content=body,
                headers={**target.headers, "Content-Type": "application/json"},
            )
            if reply.status_code != 200:
                raise HarnessError(f"tfserving: predict answered {reply.status_code}: {reply.text}")
            (got,) = reply.json()["predictions"]
            if [got["label"]] != expected["label"]:
                raise HarnessError("tfserving and V2 answers differ")
    return target


def smoke_outputs(target: Target, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Each body once through the target; 200 and the decoded outputs, or HarnessError."""
    verify: ssl.SSLContext | bool = target.ssl_context or True
    answers: list[dict[str, Any]] = []
    with httpx.Client(base_url=target.url, verify=verify, timeout=30) as client:
        for body in bodies:
            reply = client.post(
                INFER_PATH,
                content=body,
                headers={**target.headers, "Content-Type": "application/json"},
            )
            if reply.status_code != 200:
                raise HarnessError(
                    f"{target.name}: infer answered {reply.status_code}: {reply.text[:500]}"
                )
            answers.append({o["name"]: o["data"] for o in reply.json()["outputs"]})
    return answers


def check_same_answers(modelkeep: list[dict[str, Any]], bare: list[dict[str, Any]]) -> None:
    """Both servers must compute the same thing, or the comparison means nothing. The consumer
    sees modelkeep's default output (the top-1 class as a one-hot row), so the probabilities
    are compared through their top class."""
    for mk, ref in zip(modelkeep, bare, strict=True):
        if mk.get("label") != ref.get("label"):
            raise HarnessError(f"labels differ: modelkeep {mk.get('label')} vs bare {ref['label']}")
        shown, full = mk.get("probabilities", []), ref["probabilities"]
        if len(shown) != len(full) or shown.index(max(shown)) != full.index(max(full)):
            raise HarnessError("the top class differs between modelkeep and bare")


# -- load generation: wrk ----------------------------------------------------------------------

_LUA = """-- written by bench/bench_infer.py
local bodies = { %(bodies)s }
local headers = { %(headers)s }
local prepared = {}
local next_index = 0
non200 = 0  -- global: done() reads it per thread with thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for k, body in ipairs(bodies) do
    prepared[k] = wrk.format("POST", "%(path)s", headers, body)
  end
end

function request()
  next_index = next_index %% #prepared + 1
  return prepared[next_index]
end

function response(status, response_headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non200")
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT %%d %%d %%d %%d %%d %%d %%d %%d %%d %%d %%d %%d\\n",
    summary.requests, summary.duration, bad, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def write_lua(
    path: Path, bodies: list[bytes], headers: dict[str, str], url_path: str = INFER_PATH
) -> None:
    all_headers = {**headers, "Content-Type": "application/json"}
    path.write_text(
        _LUA
        % {
            "bodies": ", ".join(f"[==[{body.decode()}]==]" for body in bodies),
            "headers": ", ".join(f'["{k}"] = "{v}"' for k, v in all_headers.items()),
            "path": url_path,
        }
    )


def run_wrk(wrk: str, pin: Pinning, url: str, script: Path, concurrency: int, seconds: int) -> str:
    """wrk's whole output (its --latency text and our BENCH_RESULT line)."""
    command = pin.load(
        [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url + INFER_PATH,
        ]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise HarnessError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}")
    return done.stdout


def parse_wrk(output: str) -> LoadResult:
    """The numbers from the BENCH_RESULT line our Lua ``done`` prints (exact, in microseconds)."""
    for line in output.splitlines():
        if line.startswith("BENCH_RESULT "):
            fields = [int(float(x)) for x in line.split()[1:]]
            requests, duration_us, non200, status, connect, read, write, timeout = fields[:8]
            p50, p90, p99, top = (us / 1000 for us in fields[8:12])
            seconds = duration_us / 1e6
            return LoadResult(
                requests=requests,
                duration_s=round(seconds, 3),
                rps=requests / seconds if seconds else 0.0,
                p50_ms=p50,
                p90_ms=p90,
                p99_ms=p99,
                max_ms=top,
                non_200=max(non200, status),
                socket_errors={
                    "connect": connect,
                    "read": read,
                    "write": write,
                    "timeout": timeout,
                },
            )
    raise HarnessError(f"no result line in wrk's output:\n{output[-1500:]}")


# -- load generation: the Python fallback ------------------------------------------------------


def address(target: Target) -> tuple[str, int]:
    parts = urlsplit(target.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def post_requests(target: Target, bodies: list[bytes], path: str = INFER_PATH) -> list[bytes]:
    """One whole HTTP/1.1 POST request (head and JSON body) per body, with the target's headers."""
    host, port = address(target)
    headers = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response: its head, its header fields (names lower-case) and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = dict(line.partition(b":")[::2] for line in head.split(b"\r\n")[1:])
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    if b"content-length" in fields:
        return head, fields, await reader.readexactly(int(fields[b"content-length"]))
    chunks: list[bytes] = []  # chunked: size line, data, CRLF ... up to the empty last chunk
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        chunks.append((await reader.readexactly(size + 2))[:-2])
    await reader.readuntil(b"\r\n")
    return head, fields, b"".join(chunks)


def run_python_load(
    target: Target,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    path: str = INFER_PATH,
) -> LoadResult:
    """Keep-alive HTTP/1.1 clients on asyncio; used only when wrk is not available.

    It is much slower than wrk, so at high concurrency it may measure itself: the results say so.
    """
    host, port = address(target)
    prepared = post_requests(target, bodies, path)
    latencies: list[float] = []
    counts = {"non_200": 0, "read": 0, "connect": 0}

    async def client(index: int, deadline: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=target.ssl_context)
        except OSError:
            counts["connect"] += 1
            return
        try:
            while time.perf_counter() < deadline:
                request = prepared[index % len(prepared)]
                index += 1
                started = time.perf_counter()
                writer.write(request)
                head, _, _ = await read_response(reader)
                latencies.append(time.perf_counter() - started)
                if head[9:12] != b"200":
                    counts["non_200"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["read"] += 1
        finally:
            writer.close()

    async def main() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(k, deadline) for k in range(concurrency)))
        return time.perf_counter() - started

    try:
        import uvloop  # installed with uvicorn[standard]; a faster client, like the servers

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    errors = {"connect": counts["connect"], "read": counts["read"]}
    return LoadResult.of(latencies, elapsed, counts["non_200"], errors)


def grpc_requests(rows: list[list[float]]) -> list[bytes]:
    """One serialized ModelInferRequest per row: FP32 [1, 4] in raw_input_contents."""
    import numpy as np

    from modelkeep.api.grpc import grpc_predict_v2_pb2 as pb

    requests = []
    for row in rows:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.asarray([row], dtype="<f4").tobytes())
        requests.append(request.SerializeToString())
    return requests


def run_grpc_load(
    target: Target, rows: list[list[float]], concurrency: int, seconds: float
) -> LoadResult:
    """``concurrency`` gRPC clients over TLS, each its own connection and one call at a time."""
    import grpc
    from grpc import aio

    assert target.grpc is not None
    assert target.ca_cert is not None
    prepared = grpc_requests(rows)
    credentials = grpc.ssl_channel_credentials(Path(target.ca_cert).read_bytes())
    metadata = (("authorization", target.headers["Authorization"]),)
    latencies: list[float] = []
    counts = {"non_200": 0, "read": 0, "connect": 0}

    async def client(index: int, deadline: float) -> None:
        # A channel option of its own keeps gRPC from sharing one connection between clients.
        options = [("grpc.channel_id", index)]
        async with aio.secure_channel(target.grpc, credentials, options=options) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            while time.perf_counter() < deadline:
                request = prepared[index % len(prepared)]
                index += 1
                started = time.perf_counter()
                try:
                    await call(request, metadata=metadata, timeout=30)
                except aio.AioRpcError:
                    counts["non_200"] += 1
                latencies.append(time.perf_counter() - started)

    async def main() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(k, deadline) for k in range(concurrency)))
        return time.perf_counter() - started

    before = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = asyncio.run(main())
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    errors = {"connect": counts["connect"], "read": counts["read"]}
    cpu = round(100 * used / elapsed, 1) if elapsed else None
    return LoadResult.of(latencies, elapsed, counts["non_200"], errors, cpu)


# -- load generation: gRPC with h2load ---------------------------------------------------------

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def grpc_frame(message: bytes) -> bytes:
    """One gRPC message on the wire: not compressed (0), its length (big-endian), the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def check_grpc_answers(target: Target, rows: list[list[float]], v2: list[dict[str, Any]]) -> None:
    """Each row once through a real gRPC client (grpcio, the server's CA verified): OK and the
    same labels and top classes as V2 REST, or HarnessError. h2load cannot read grpc-status, so
    this is how the bench knows the calls it loads are answered correctly."""
    import grpc
    import numpy as np

    from modelkeep.api.grpc import grpc_predict_v2_pb2 as pb

    assert target.grpc is not None
    assert target.ca_cert is not None
    credentials = grpc.ssl_channel_credentials(Path(target.ca_cert).read_bytes())
    metadata = (("authorization", target.headers["Authorization"]),)
    with grpc.secure_channel(target.grpc, credentials) as channel:
        call = channel.unary_unary(
            GRPC_INFER, response_deserializer=pb.ModelInferResponse.FromString
        )
        for body, expected in zip(grpc_requests(rows), v2, strict=True):
            try:
                reply = call(body, metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                raise HarnessError(f"{target.name}: ModelInfer failed: {exc}") from None
            got: dict[str, list[Any]] = {}
            for output, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
                dtype = {"INT64": "<i8", "FP32": "<f4"}.get(output.datatype)
                if dtype is None:
                    raise HarnessError(f"{target.name}: unexpected datatype {output.datatype}")
                got[output.name] = np.frombuffer(raw, dtype=dtype).tolist()
            try:
                check_same_answers([got], [expected])
            except HarnessError as exc:
                raise HarnessError(f"{target.name} and V2 REST answers differ: {exc}") from None


def grpc_call_counts(target: Target) -> dict[str, int]:
    """ModelInfer calls the server has answered so far, by status (its Prometheus metrics, which
    count gRPC calls under the RPC's route with the HTTP status their outcome maps to)."""
    with httpx.Client(verify=target.ssl_context or True, timeout=30) as client:
        reply = client.get(target.url + "/metrics", headers=target.admin)
    if reply.status_code != 200:
        raise HarnessError(f"/metrics answered {reply.status_code}: {reply.text[:300]}")
    counts: dict[str, int] = {}
    for line in reply.text.splitlines():
        if not line.startswith("modelkeep_requests_total{") or f'route="{GRPC_INFER}"' not in line:
            continue
        labels, _, value = line.rpartition(" ")
        status = labels.split('status="', 1)[1].split('"', 1)[0]
        counts[status] = counts.get(status, 0) + int(float(value))
    return counts


def run_h2load(
    h2load: str,
    pin: Pinning,
    target: Target,
    body: Path,
    concurrency: int,
    seconds: int,
    log: Path,
) -> LoadResult:
    """``concurrency`` HTTP/2 connections over TLS, one ModelInfer call in flight on each
    (``-m 1``), for ``seconds``; latencies from h2load's per-request log. A call the server
    refused still answers HTTP 200 (the gRPC status is in the trailers, which h2load does not
    read), so the server's own count of failed calls over the run is added to ``non_200``."""
    assert target.grpc is not None
    before = grpc_call_counts(target)
    log.unlink(missing_ok=True)
    command = pin.load(
        [
            h2load,
            "-t1",
            f"-c{concurrency}",
            "-m1",
            "-D",
            str(seconds),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            f"authorization: {target.headers['Authorization']}",
            "--log-file",
            str(log),
            f"https://{target.grpc}{GRPC_INFER}",
        ]
    )
    used_before = _children_cpu_s()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    used = _children_cpu_s() - used_before
    if done.returncode != 0:
        raise HarnessError(f"h2load failed ({done.returncode}): {done.stderr[-1000:]}")
    after = grpc_call_counts(target)
    refused = sum(n - before.get(s, 0) for s, n in after.items() if s != "200")
    answered = after.get("200", 0) - before.get("200", 0)
    result = parse_h2load(done.stdout, log)
    result.non_200 += refused
    if answered < result.requests:
        # The server counts a call once it has answered it: fewer OKs than h2load's answers
        # means some answers were not OK calls.
        result.non_200 += result.requests - answered
    if result.duration_s:
        result.client_cpu_pct = round(100 * used / result.duration_s, 1)
    return result


def parse_h2load(output: str, log: Path) -> LoadResult:
    """h2load's summary (duration, failures) and its per-request log (status, latency)."""
    duration = 0.0
    failed = errored = timeouts = 0
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("finished in "):
            text = line.removeprefix("finished in ").split(",", 1)[0]
            duration = float(text[:-2]) / 1000 if text.endswith("ms") else float(text[:-1])
        elif line.startswith("requests: "):
            fields = {
                word: int(number)
                for number, word in (part.split()[:2] for part in line[10:].split(", "))
            }
            failed, errored, timeouts = fields["failed"], fields["errored"], fields["timeout"]
    if not duration:
        raise HarnessError(f"h2load printed no summary:\n{output[-1000:]}")
    latencies: list[float] = []
    non_200 = 0
    for entry in log.read_text().splitlines():
        _start, status, elapsed = entry.split("\t")[:3]
        if status != "200":
            non_200 += 1
        latencies.append(int(elapsed) / 1e6)  # h2load logs microseconds
    errors = {"errored": errored, "timeout": timeouts}
    return LoadResult.of(latencies, duration, max(non_200, failed - errored), errors)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Options:
    duration: int
    warmup: int
    rounds: int
    concurrency: list[int]
    loadgen: str
    grpc_loadgen: str
    targets: list[str]
    pin: bool
    output: Path


class Loader:
    """Runs one load point against one target, with wrk or the fallback, and meters the CPU."""

    def __init__(
        self,
        opts: Options,
        wrk: str | None,
        pin: Pinning,
        bodies: list[bytes],
        tmp: Path,
        rows: list[list[float]] | None = None,
        h2load: str | None = None,
    ) -> None:
        self.opts, self.wrk, self.pin, self.bodies, self.tmp = opts, wrk, pin, bodies, tmp
        self.rows = rows or []
        self.h2load = h2load
        self.raw_dir = opts.output.parent / "wrk"
        for stale in self.raw_dir.glob("*.txt"):  # one run's raw output at a time
            stale.unlink()

    def run(self, target: Target, concurrency: int, seconds: int, tag: str) -> LoadResult:
        meter = None
        if self.pin.server_cpu is not None:
            assert self.pin.load_cpu is not None
            meter = CpuMeter(self.pin.server_cpu, self.pin.load_cpu, target.proc.pid)
        before = meter.snapshot() if meter else None
        bodies = target.bodies or self.bodies
        if target.grpc is not None and self.h2load is not None:
            body = self.tmp / "grpc-infer.bin"
            if not body.exists():
                # h2load posts one body: the first row, framed as one gRPC message.
                body.write_bytes(grpc_frame(grpc_requests(self.rows[:1])[0]))
            log = self.tmp / "h2load.log"
            result = run_h2load(self.h2load, self.pin, target, body, concurrency, seconds, log)
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, self.raw_dir / f"{target.name}-c{concurrency}-{tag}.log")
        elif target.grpc is not None:
            result = run_grpc_load(target, self.rows, concurrency, seconds)
        elif self.wrk is None:
            result = run_python_load(target, bodies, concurrency, seconds, target.path)
        else:
            script = self.tmp / f"{target.name}.lua"
            if not script.exists():
                write_lua(script, bodies, target.headers, target.path)
            used_before = _children_cpu_s()
            output = run_wrk(self.wrk, self.pin, target.url, script, concurrency, seconds)
            used = _children_cpu_s() - used_before
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            (self.raw_dir / f"{target.name}-c{concurrency}-{tag}.txt").write_text(output)
            result = parse_wrk(output)
            if result.duration_s:
                result.client_cpu_pct = round(100 * used / result.duration_s, 1)
        if meter:
            meter.fill(result, before, meter.snapshot())
        return result


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def measure_all(targets: list[Target], points: dict[int, Point], loader: Loader) -> None:
    """Rounds x concurrencies x targets, alternating the targets so that drift in the machine's
    background load touches both alike."""
    opts = loader.opts
    for round_no in range(1, opts.rounds + 1):
        print(f"\nround {round_no}/{opts.rounds}")
        for concurrency in opts.concurrency:
            point = points[concurrency]
            for target in targets:
                if opts.warmup:
                    warm = loader.run(target, concurrency, opts.warmup, f"r{round_no}-warmup")
                    point.add(target.name, warm, warmup=True)
                result = loader.run(target, concurrency, opts.duration, f"r{round_no}")
                point.add(target.name, result)
                line = (
                    f"{result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms"
                )
                if result.cpu_us_per_request is not None:
                    line += (
                        f"  server {result.cpu_us_per_request:4.0f} us CPU/req"
                        f" (its core {result.server_core_busy_pct:3.0f}% busy)"
                    )
                if result.client_cpu_pct is not None:
                    line += f"  client {result.client_cpu_pct:3.0f}% CPU"
                if result.load_core_busy_pct is not None:
                    line += f" (its core {result.load_core_busy_pct:3.0f}% busy)"
                if result.failures:
                    line += f"  FAILED: {'; '.join(result.failures)}"
                print(f"  c={concurrency:<3} {target.name:<9} {line}", flush=True)


WORKERS_CONCURRENCY = 8
NO_PIN = Pinning(None, None)
GRPC_ROW = "mk-grpc"
GRPC_TARGET = 0.85  # V2 gRPC req/s >= 0.85 x V2 REST req/s (issue 13) ...
# What --targets can choose: the loads of the main rounds, and the workers and canary comparisons.
TARGET_NAMES = ("modelkeep", GRPC_ROW, "tfserving", "bare", "workers", "canary")


def measure_workers(
    tmp: Path, model: bytes, procs: Processes, loader: Loader
) -> dict[str, Any] | None:
    """``--workers 1`` against ``--workers 2`` at concurrency 8, nothing pinned, in this run.

    The question is whether a client holding a few keep-alive connections gets the CPU of
    every worker (each worker has its own SO_REUSEPORT socket). Both servers and the load
    generator share the machine's CPUs, so the 2-worker figure is bounded by what the load
    generator leaves free; the ratio is the measure, not the absolute numbers.
    """
    opts = loader.opts
    print(f"\nworkers: --workers 1 and 2 at concurrency {WORKERS_CONCURRENCY}, unpinned")
    one = start_modelkeep(
        tmp / "w1", model, procs, NO_PIN, workers=1, label="mk-1worker", policy=BENCH_POLICY
    )
    two = start_modelkeep(
        tmp / "w2", model, procs, NO_PIN, workers=2, label="mk-2workers", policy=BENCH_POLICY
    )
    point = Point(WORKERS_CONCURRENCY)
    for round_no in range(1, opts.rounds + 1):
        for target in (one, two):
            if opts.warmup:
                warm = loader.run(target, WORKERS_CONCURRENCY, opts.warmup, f"w{round_no}-warmup")
                point.add(target.name, warm, warmup=True)
            result = loader.run(target, WORKERS_CONCURRENCY, opts.duration, f"w{round_no}")
            point.add(target.name, result)
            print(
                f"  {target.name:<12} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms",
                flush=True,
            )
    single, double = point.summary(one.name), point.summary(two.name)
    if single is None or double is None or not single["rps"]:
        print(f"workers: FAILED ({point.errors})")
        return None
    scaling = double["rps"] / single["rps"]
    print(
        f"workers at c={WORKERS_CONCURRENCY} (median): 1 worker {single['rps']:,.0f} req/s, "
        f"2 workers {double['rps']:,.0f} req/s: {scaling:.2f}x"
    )
    return {"concurrency": WORKERS_CONCURRENCY, "1": single, "2": double, "scaling": scaling}


CANARY_CONCURRENCY = 8
CANARY_SHARE = 10.0  # percent of callers on the canary
SHADOW_SAMPLE = 1.0  # percent of requests mirrored to the shadow
# "No measurable cost": within the run-to-run noise of medians over rounds on this machine.
CANARY_TARGET = 0.95


def measure_canary(
    tmp: Path, model: bytes, procs: Processes, pin: Pinning, loader: Loader
) -> dict[str, Any] | None:
    """V2 infer on one server with and without an active canary and shadow, alternating.

    The model is pushed twice and ``production`` points at version 1 (the load names no
    version, so it is served through ``production``). With the canary on, version 2 takes
    ``CANARY_SHARE`` % of callers and mirrors ``SHADOW_SAMPLE`` % of requests to version 2 as a
    shadow: routing is decided once per caller (the load's one key lands on one side, printed),
    every run is counted for the canary's numbers and the sampled calls are mirrored off the
    request path, on the server's core. Off: both aborted. Same server, key and rows.
    """
    from modelkeep.testing import build_iris_onnx

    opts = loader.opts
    print(
        f"\ncanary: V2 infer at concurrency {CANARY_CONCURRENCY}, with and without a"
        f" {CANARY_SHARE:g}% canary and a {SHADOW_SAMPLE:g}% shadow on production"
    )
    target = start_modelkeep(tmp / "canary", model, procs, pin, label="mk", policy=BENCH_POLICY)
    base = f"/api/v1/models/{MODEL}"
    with httpx.Client(base_url=target.url, verify=target.ssl_context or False, timeout=60) as c:
        pushed = c.post(
            f"{base}/versions",
            params={"filename": f"{MODEL}.onnx"},
            content=build_iris_onnx(seed=1),
            headers={**target.admin, "Content-Type": "application/octet-stream"},
        )
        labelled = c.put(f"{base}/labels/production", json={"version": 1}, headers=target.admin)
        # Version 2 loaded before anything is measured (the server also warms canary
        # versions after each change; a load during a measured run would be counted).
        warmed = c.post(
            f"/v2/models/{MODEL}/versions/2/infer",
            content=loader.bodies[0],
            headers={**target.headers, "Content-Type": "application/json"},
        )
        if pushed.status_code != 201 or labelled.status_code != 200 or warmed.status_code != 200:
            raise HarnessError(
                f"canary set-up answered {pushed.status_code}, {labelled.status_code}"
            )

        def switch(on: bool) -> None:
            if on:
                answers = [
                    c.put(
                        f"{base}/labels/production/canary",
                        json={"version": 2, "share": CANARY_SHARE},
                        headers=target.admin,
                    ),
                    c.put(
                        f"{base}/labels/production/shadow",
                        json={"version": 2, "sample": SHADOW_SAMPLE},
                        headers=target.admin,
                    ),
                ]
                if any(a.status_code != 200 for a in answers):
                    raise HarnessError(f"canary start answered {[a.text for a in answers]}")
            else:
                for mode in ("canary", "shadow"):
                    c.delete(f"{base}/labels/production/{mode}", headers=target.admin)

        point = Point(CANARY_CONCURRENCY)
        on_target = Target("mk-canary", target.url, target.headers, target.ssl_context, target.proc)
        off_target = Target("mk-plain", target.url, target.headers, target.ssl_context, target.proc)
        for round_no in range(1, opts.rounds + 1):
            for state, which in ((False, off_target), (True, on_target)):
                switch(state)
                if opts.warmup:
                    warm = loader.run(which, CANARY_CONCURRENCY, opts.warmup, f"c{round_no}-warmup")
                    point.add(which.name, warm, warmup=True)
                result = loader.run(which, CANARY_CONCURRENCY, opts.duration, f"c{round_no}")
                point.add(which.name, result)
                print(
                    f"  {which.name:<10} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                    f"  p99 {result.p99_ms:7.2f} ms",
                    flush=True,
                )
        status = c.get(f"{base}/canary", headers=target.admin).json()["canaries"]
    plain, canary = point.summary(off_target.name), point.summary(on_target.name)
    if plain is None or canary is None or not plain["rps"]:
        print(f"canary: FAILED ({point.errors})")
        return None
    live = next((s for s in status if s["mode"] == "canary"), None)
    arms = {a["role"]: a["requests"] for a in (live or {}).get("versions", [])}
    side = "canary" if arms.get("canary") else "primary"
    ratio = canary["rps"] / plain["rps"]
    print(
        f"canary at c={CANARY_CONCURRENCY} (median): without {plain['rps']:,.0f} req/s"
        f" (p50 {plain['p50_ms']:.2f} ms), with {canary['rps']:,.0f} req/s"
        f" (p50 {canary['p50_ms']:.2f} ms): {ratio:.3f}x; the load's key was on the {side} side"
    )
    return {
        "concurrency": CANARY_CONCURRENCY,
        "share": CANARY_SHARE,
        "shadow_sample": SHADOW_SAMPLE,
        "without": plain,
        "with": canary,
        "ratio": ratio,
        "caller_side": side,
    }


def _cell(summary: dict[str, float] | None, width: int, measured: bool = True) -> str:
    if summary is None:
        shown = "FAILED" if measured else "-"
        return f"{shown:>{width}} {'-':>7} {'-':>7} {'-':>6}"
    cpu = summary.get("cpu_us_per_request")
    cpu_text = f"{cpu:>6.0f}" if cpu is not None else f"{'-':>6}"
    return (
        f"{summary['rps']:>{width},.0f} {summary['p50_ms']:>7.2f} {summary['p99_ms']:>7.2f} "
        f"{cpu_text}"
    )


def report(points: dict[int, Point], opts: Options, meta: dict[str, Any]) -> bool:
    """Print the table and the verdicts, write the JSON; True when every point measured cleanly."""
    rounds = f"median of {opts.rounds} rounds" if opts.rounds > 1 else "1 round"
    print(f"\nresults ({rounds}; cpu = server CPU microseconds per request):")
    header = (
        f"{'conc':>4} | {'modelkeep rps':>13} {'p50 ms':>7} {'p99 ms':>7} {'cpu':>6} | "
        f"{'bare rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu':>6} | {'mk/bare':>7}"
    )
    print(header)
    print("-" * len(header))
    for concurrency, point in sorted(points.items()):
        ratio = point.ratio()
        shown = f"{ratio:>6.2f}x" if ratio is not None else f"{'-':>7}"
        print(
            f"{concurrency:>4} | "
            f"{_cell(point.summary('modelkeep'), 13, point.measured('modelkeep'))} | "
            f"{_cell(point.summary('bare'), 9, point.measured('bare'))} | {shown}"
        )

    print(f"\nV2 gRPC on the same modelkeep server ({GRPC_ROW}; client = the gRPC client's CPU %):")
    grpc_header = f"{'conc':>4} | {'gRPC rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu':>6} | "
    grpc_header += f"{'client':>6} | {'grpc/rest':>9}"
    print(grpc_header)
    print("-" * len(grpc_header))
    grpc_ratios: dict[int, float | None] = {}
    for concurrency, point in sorted(points.items()):
        over, rest = point.summary(GRPC_ROW), point.summary("modelkeep")
        grpc_ratios[concurrency] = (
            over["rps"] / rest["rps"] if over and rest and rest["rps"] else None
        )
        client = over.get("client_cpu_pct") if over else None
        ratio_text = grpc_ratios[concurrency]
        print(
            f"{concurrency:>4} | {_cell(over, 9, point.measured(GRPC_ROW))} | "
            + (f"{client:>5.0f}%" if client is not None else f"{'-':>6}")
            + " | "
            + (f"{ratio_text:>8.2f}x" if ratio_text is not None else f"{'-':>9}")
        )

    print("\nprotocols (same server, model, key and rows; ratio to V2 REST):")
    print(
        f"{'conc':>4} | {'protocol':<10} {'rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu':>6} | ratio"
    )
    for concurrency, point in sorted(points.items()):
        for name in ("tfserving",):
            against = point.protocol_ratio(name)
            shown = f"{against:>5.2f}x" if against is not None else f"{'-':>6}"
            cell = _cell(point.summary(name), 9, point.measured(name))
            print(f"{concurrency:>4} | {name:<10} {cell} | {shown}")

    ratio_point = points.get(RATIO_CONCURRENCY)
    ratio = ratio_point.ratio() if ratio_point else None
    protocol_ratio = ratio_point.protocol_ratio("tfserving") if ratio_point else None
    grpc_ratio = grpc_ratios.get(RATIO_CONCURRENCY)
    p99_point = points.get(P99_CONCURRENCY)
    p99_summary = p99_point.summary("modelkeep") if p99_point else None
    p99 = p99_summary["p99_ms"] if p99_summary else None
    targets = [
        {
            "name": f"modelkeep/bare throughput at concurrency {RATIO_CONCURRENCY}",
            "target": f">= {RATIO_TARGET}",
            "value": None if ratio is None else round(ratio, 3),
            "pass": ratio is not None and ratio >= RATIO_TARGET,
        },
        {
            "name": f"V2 gRPC/V2 REST throughput at concurrency {RATIO_CONCURRENCY}",
            "target": f">= {GRPC_TARGET}",
            "value": None if grpc_ratio is None else round(grpc_ratio, 3),
            "pass": grpc_ratio is not None and grpc_ratio >= GRPC_TARGET,
        },
        {
            "name": f"modelkeep p99 latency at concurrency {P99_CONCURRENCY} (ms)",
            "target": f"< {P99_TARGET_MS}",
            "value": None if p99 is None else round(p99, 3),
            "pass": p99 is not None and p99 < P99_TARGET_MS,
        },
        {
            "name": f"TF Serving REST/V2 REST throughput at concurrency {RATIO_CONCURRENCY}",
            "target": f">= {PROTOCOL_TARGET}",
            "value": None if protocol_ratio is None else round(protocol_ratio, 3),
            "pass": protocol_ratio is not None and protocol_ratio >= PROTOCOL_TARGET,
        },
    ]
    canary = meta.get("canary")
    if canary is not None:
        print(
            f"\ncanary (same server, c={canary['concurrency']}; with/without a"
            f" {canary['share']:g}% canary and a {canary['shadow_sample']:g}% shadow):"
        )
        print(f"  without {_cell(canary['without'], 9)}")
        print(f"  with    {_cell(canary['with'], 9)}  ratio {canary['ratio']:.3f}x")
    ratio_canary = None if canary is None else canary["ratio"]
    targets.append(
        {
            "name": "V2 REST throughput with/without an active canary and shadow",
            "target": f">= {CANARY_TARGET}",
            "value": None if ratio_canary is None else round(ratio_canary, 3),
            "pass": ratio_canary is not None and ratio_canary >= CANARY_TARGET,
        }
    )
    print("\ntargets:")
    for t in targets:
        value = "not measured" if t["value"] is None else t["value"]
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {value} (target {t['target']})")
    clean = not any(point.errors for point in points.values())
    verdict = "PASS" if all(t["pass"] for t in targets) and clean else "FAIL"
    print(f"\nbench verdict: {verdict}")
    if not clean:
        print("some points FAILED (errors above): their numbers are not a valid measurement")

    document = {
        **meta,
        "verdict": verdict,
        "targets": targets,
        "points": [
            {
                "concurrency": c,
                "ratio": None if (r := p.ratio()) is None else round(r, 4),
                "errors": p.errors,
                "median": {
                    name: p.summary(name) for name in ("modelkeep", GRPC_ROW, "tfserving", "bare")
                },
                "rounds": {name: [asdict(x) for x in runs] for name, runs in p.rounds.items()},
            }
            for c, p in sorted(points.items())
        ],
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {opts.output}")
    return clean


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("modelkeep", "onnxruntime", "uvicorn", "uvloop", "httptools", "starlette"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


@contextmanager
def workspace() -> Iterator[tuple[Path, Processes]]:
    procs = Processes()
    # SIGINT too: a shell that starts us in the background leaves it ignored otherwise.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="modelkeep-bench-") as tmp:
            try:
                yield Path(tmp), procs
            finally:
                procs.stop_all()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(opts: Options) -> int:
    from modelkeep.testing import build_iris_onnx, iris_rows

    pin = choose_pinning(opts.pin)
    wrk = ensure_tool("wrk", "wrk") if opts.loadgen in ("auto", "wrk") else None
    if wrk is None and opts.loadgen == "wrk":
        raise HarnessError("wrk was asked for and is not available")
    h2load = None
    if GRPC_ROW in opts.targets and opts.grpc_loadgen in ("auto", "h2load"):
        h2load = ensure_tool("h2load", "nghttp2-client")
        if h2load is None and opts.grpc_loadgen == "h2load":
            raise HarnessError("h2load was asked for and is not available")
    if GRPC_ROW in opts.targets and h2load is None:
        print("gRPC load: the grpc.aio client in this process (h2load is not used)")
    if wrk is None:
        print("load generator: Python fallback (slower than wrk; high-concurrency numbers may be")
        print("bound by the client, not the server)")
    if pin.load_cpu is not None:
        # The harness only waits while the load runs; keep it off the server's core too.
        os.sched_setaffinity(0, {pin.load_cpu})
    load_before = os.getloadavg()[0]
    print(f"load generator: {'wrk' if wrk else 'python'}; pinning: {pin.describe()}")
    if GRPC_ROW in opts.targets:
        print(f"gRPC load generator: {'h2load' if h2load else 'grpc.aio (python)'}")
    print(
        f"per point: {opts.warmup} s warm-up + {opts.duration} s measured, keep-alive connections;"
        f" {opts.rounds} round(s), the targets alternating"
    )
    if load_before > 0.5:
        print(f"note: load average is {load_before:.2f} before we start: other processes are")
        print("      running: expect noisy numbers (see 'its core ... busy' on each run)")

    model = build_iris_onnx()
    bodies = infer_bodies(iris_rows(BODY_ROWS))
    points = {c: Point(c) for c in opts.concurrency}
    with workspace() as (tmp, procs):
        model_path = tmp / "iris.onnx"
        model_path.write_bytes(model)
        print("\nstarting the bare endpoint (plain HTTP, no checks):")
        bare = start_bare(tmp, model_path, procs, pin)
        print("starting modelkeep (HTTPS and gRPC, API key, Cedar, validation):")
        grpc_port = free_port()
        modelkeep = start_modelkeep(
            tmp,
            model,
            procs,
            pin,
            policy=BENCH_POLICY,
            settings={"MODELKEEP_GRPC_PORT": str(grpc_port)},
        )
        over_grpc = Target(
            GRPC_ROW,
            modelkeep.url,
            modelkeep.headers,
            modelkeep.ssl_context,
            modelkeep.proc,
            modelkeep.admin,
            ca_cert=modelkeep.ca_cert,
            grpc=f"127.0.0.1:{grpc_port}",
        )
        check_same_answers(smoke_outputs(modelkeep, bodies), smoke_outputs(bare, bodies))
        print(f"both servers give the same answers on {len(bodies)} sample rows")
        # The same server, model, key and rows through TF Serving's REST API.
        tfserving = tfserving_target(modelkeep, iris_rows(BODY_ROWS))
        rows = iris_rows(BODY_ROWS)
        # The same for gRPC, through a real client (h2load only counts HTTP statuses).
        check_grpc_answers(over_grpc, rows, smoke_outputs(modelkeep, bodies))
        print(f"gRPC answers the same as V2 REST on {len(rows)} sample rows")
        # All stay up for the whole run; only the one under load does work.
        loader = Loader(opts, wrk, pin, bodies, tmp, rows, h2load)
        chosen = [modelkeep, over_grpc, tfserving, bare]
        measure_all([t for t in chosen if t.name in opts.targets], points, loader)
        procs.stop_all()
        workers = None
        if WORKERS_CONCURRENCY in opts.concurrency and "workers" in opts.targets:
            workers = measure_workers(tmp, model, procs, Loader(opts, wrk, NO_PIN, bodies, tmp))
            procs.stop_all()
        canary = None
        if "canary" in opts.targets:
            canary = measure_canary(tmp, model, procs, pin, Loader(opts, wrk, pin, bodies, tmp))
            procs.stop_all()

    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "pinning": pin.describe(),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
        "load": {
            "generator": "wrk" if wrk else "python-fallback",
            "grpc_generator": "h2load" if h2load else "grpc.aio",
            "grpc_body": "one row (FP32 [1,4] in raw_input_contents)"
            if h2load
            else f"{BODY_ROWS} rows cycled",
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "rounds": opts.rounds,
            "body": f"one-row V2 JSON (FP32 [1,4]), {BODY_ROWS} rows cycled",
        },
        "versions": versions(),
        "workers": workers,
        "canary": canary,
    }
    return 0 if report(points, opts, meta) else 1


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per point")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per point")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all points; the table shows medians"
    )
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated connection counts")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk (installed with apt-get if missing), else the Python fallback",
    )
    parser.add_argument(
        "--grpc-loadgen",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="auto: h2load (installed with apt-get if missing), else the grpc.aio client",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help=f"comma-separated subset of {','.join(TARGET_NAMES)} to measure (default: all)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    try:
        concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,8,64")
    if not concurrency or min(concurrency) < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("need concurrency >= 1, --duration >= 1 and --warmup >= 0")
    if args.rounds < 1:
        parser.error("need --rounds >= 1")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGET_NAMES for t in targets):
        parser.error(f"--targets takes names from {','.join(TARGET_NAMES)}")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        concurrency=concurrency,
        loadgen=args.loadgen,
        grpc_loadgen=args.grpc_loadgen,
        targets=targets,
        pin=not args.no_pin,
        output=args.output,
    )


def main() -> int:
    opts = parse_args()
    try:
        return run(opts)
    except HarnessError as exc:
        print(f"\nbench could not measure: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, temporary files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
