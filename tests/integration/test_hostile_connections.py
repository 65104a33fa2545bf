"""Hostile connections against a real `modelkeep serve`, none of them with an API key.

One server (2 workers) with timeouts of a few seconds takes the oversized heads, the slowloris,
idle and handshake-less connections and the trickled body; a second (1 worker) with small
connection caps takes the floods. Every answer is checked for the security headers, and so is
every route of the app's route table.

Clients are asyncio streams over TLS in the test process. Timings are checked with margins
that hold on a loaded 2-core machine yet still fail the old behaviour, where such connections
stayed open for minutes.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Server, init_server

from modelkeep.api.app import create_app
from modelkeep.api.server import SECURITY_HEADERS
from modelkeep.service import Service
from modelkeep.settings import MiB, Settings

# Timing and per-process memory under load: run alone (`make test`), not beside another test.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

TIMEOUT_S = 2  # header, body and keep-alive timeouts of the module's server
TLS_TIMEOUT_S = 3
SLACK_S = 4.0  # how late a closure may come on a loaded machine
MAX_REQUEST = 64 * 1024
EXPECTED_HEADERS = {name.lower(): value for name, value in SECURITY_HEADERS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = init_server(tmp_path_factory.mktemp("conns"), workers=2)
    srv.extra_env = {
        "MODELKEEP_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "MODELKEEP_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "MODELKEEP_KEEP_ALIVE_TIMEOUT_S": str(TIMEOUT_S),
        "MODELKEEP_TLS_HANDSHAKE_TIMEOUT_S": str(TLS_TIMEOUT_S),
        "MODELKEEP_MAX_CONNECTIONS_PER_CLIENT": "2000",
        "MODELKEEP_MAX_REQUEST_BYTES": str(MAX_REQUEST),
        "MODELKEEP_ACCESS_LOG": "false",
    }
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def assert_security_headers(headers: httpx.Headers | dict[str, str], what: str) -> None:
    got = {name: headers.get(name) for name in EXPECTED_HEADERS}
    assert got == EXPECTED_HEADERS, what
    assert "server" not in headers, what


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers of the first response in ``raw``."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in head[1:])
    return status, {name.lower(): value for name, value in headers.items()}


async def open_tls(
    server: Server, local: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1",
        server.port,
        ssl=server.tls(),
        local_addr=(local, 0) if local else None,
        ssl_handshake_timeout=30,
    )


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    data = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return data


# --- Oversized heads ------------------------------------------------------------------------


def worker_rss(server: Server) -> dict[int, int]:
    """Resident memory in bytes of each process of the server's process group."""
    assert server.proc is not None
    sizes = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != server.proc.pid:  # process group
                continue
            rss = re.search(r"VmRSS:\s+(\d+) kB", (status.parent / "status").read_text())
        except (OSError, IndexError):
            continue
        if rss:
            sizes[int(status.parent.name)] = int(rss.group(1)) * 1024
    return sizes


async def big_header(server: Server, size: int = 128 * MiB) -> tuple[bytes, int]:
    """Send a request whose one header is ``size`` bytes; (what came back, bytes accepted)."""
    reader, writer = await open_tls(server)
    sent = 0

    async def send() -> None:
        nonlocal sent
        writer.write(b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        try:
            while sent < size:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, ssl.SSLError):
            pass

    sender = asyncio.create_task(send())
    answer = await read_until_closed(reader, 60)
    sender.cancel()
    writer.transport.abort()
    return answer, sent


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99) - 1]


def normal_latencies(server: Server, n: int) -> list[float]:
    """``n`` requests, each on a new connection so that both workers take some."""
    latencies = []
    with server.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(n):
            started = time.perf_counter()
            r = client.get("/v2/health/ready")
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    return latencies


def test_128_mb_headers_get_431_without_memory_growth_or_slowing_others(server: Server) -> None:
    baseline = normal_latencies(server, 120)
    rss_before = worker_rss(server)
    peak = dict(rss_before)
    results: list[tuple[bytes, int]] = []
    stop = threading.Event()

    def attack() -> None:
        # Two attackers at a time, one after another, for as long as the probe runs.
        async def main() -> None:
            while not stop.is_set():
                results.extend(await asyncio.gather(big_header(server), big_header(server)))
                for pid, rss in worker_rss(server).items():
                    peak[pid] = max(peak.get(pid, 0), rss)

        asyncio.run(main())

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        time.sleep(0.5)
        under_attack = normal_latencies(server, 120)
    finally:
        stop.set()
        attacker.join(timeout=120)

    # At least one wave of two attackers at once ran while the normal client was measured.
    assert len(results) >= 2
    for answer, sent in results:
        status, headers = parse_head(answer)
        assert status == 431
        assert_security_headers(headers, "431")
        # The server closed long before 128 MB: only socket buffers took more than the cap.
        assert sent < 16 * MiB
    growth = {pid: peak[pid] - rss_before.get(pid, 0) for pid in peak}
    # Far below the 128 MB each attacker sends (two at a time): no header is buffered past its
    # 16 KiB cap. The rest is TLS and allocator noise: up to 11 MB in one worker on a busy
    # machine, and once 36 MiB while the other test process ran a heavy test beside it (the
    # worker's loop falls behind and TLS records queue). Holding even one header would cost
    # more than 128 MB.
    assert max(growth.values()) < 64 * MiB, growth
    # p99 within twice the quiet one; the floor keeps scheduler noise on a shared machine from
    # failing it (the unprotected server took 17 s).
    assert p99(under_attack) <= max(2 * p99(baseline), p99(baseline) + 0.25), (
        p99(baseline),
        p99(under_attack),
    )


def test_100k_header_fields_get_431(server: Server) -> None:
    async def main() -> bytes:
        reader, writer = await open_tls(server)
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(100_000))
        writer.write(b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        answer = await read_until_closed(reader, 30)
        writer.transport.abort()
        return answer

    status, headers = parse_head(asyncio.run(main()))
    assert status == 431
    assert_security_headers(headers, "431")


# --- Slow and idle connections ------------------------------------------------------------


async def slowloris(server: Server) -> tuple[float, bytes]:
    """Trickle a header, a byte every 0.4 s; (seconds from connecting to the close, answer)."""
    started = time.monotonic()
    reader, writer = await open_tls(server)
    writer.write(b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    closed = asyncio.create_task(read_until_closed(reader, 60))
    while not closed.done():
        try:
            writer.write(b"z")
        except (ConnectionError, RuntimeError):
            break
        await asyncio.wait([closed], timeout=0.4)
    answer = await closed
    writer.transport.abort()
    return time.monotonic() - started, answer


async def idle_tls(server: Server) -> tuple[float, bytes]:
    started = time.monotonic()
    reader, writer = await open_tls(server)
    answer = await read_until_closed(reader, 60)
    writer.transport.abort()
    return time.monotonic() - started, answer


async def no_handshake(server: Server) -> tuple[float, bytes]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    answer = await read_until_closed(reader, 60)
    writer.transport.abort()
    return time.monotonic() - started, answer


def test_500_slowloris_idle_and_handshakeless_connections_are_closed_in_time(
    server: Server,
) -> None:
    async def normal_client(stop: asyncio.Event) -> list[int]:
        # A new connection per request: this client's loop is busy with 500 handshakes, so a
        # pause between two requests can outlast the server's 2 s keep-alive timeout, and a
        # request sent as the server closes an idle connection would fail for that race alone.
        statuses = []
        headers = {"Connection": "close"}
        async with httpx.AsyncClient(
            base_url=server.url, verify=server.tls(), timeout=20, headers=headers
        ) as c:
            while not stop.is_set():
                statuses.append((await c.get("/v2/health/ready")).status_code)
                await asyncio.sleep(0.1)
        return statuses

    async def main() -> tuple[list[Any], list[Any], list[Any], list[int]]:
        stop = asyncio.Event()
        normal = asyncio.create_task(normal_client(stop))
        lorises, idles, raws = [], [], []
        for _ in range(10):  # 500 in all, opened in waves of 50
            lorises += [asyncio.create_task(slowloris(server)) for _ in range(20)]
            idles += [asyncio.create_task(idle_tls(server)) for _ in range(20)]
            raws += [asyncio.create_task(no_handshake(server)) for _ in range(10)]
            await asyncio.sleep(0.1)
        results = [await asyncio.gather(*group) for group in (lorises, idles, raws)]
        stop.set()
        return results[0], results[1], results[2], await normal

    lorises, idles, raws, statuses = asyncio.run(main())
    assert len(lorises) + len(idles) + len(raws) == 500
    # Closed by their own timeout: not before it, nor much after it. Times run from the
    # client's connect, which precedes the server's clock, so "before" is exact but for timer
    # resolution; the client's own loop, busy with 500 handshakes, may see a close late, hence
    # the slack after.
    assert off_time(lorises, TIMEOUT_S) == []
    assert off_time(idles, TIMEOUT_S) == []
    assert off_time(raws, TLS_TIMEOUT_S) == []
    for _, answer in lorises:
        status, headers = parse_head(answer)
        assert status == 408
        assert_security_headers(headers, "408")
    assert {answer for _, answer in idles + raws} == {b""}
    assert len(statuses) >= 10
    assert set(statuses) == {200}


# The event loop's timers have millisecond resolution (uvloop), so a close may be seen a hair
# before the nominal timeout even when measured from the client's earlier connect.
EARLY_S = 0.05


def off_time(closures: list[tuple[float, bytes]], timeout: float) -> list[float]:
    """The closure times outside [timeout - EARLY_S, timeout + SLACK_S]."""
    return [round(s, 3) for s, _ in closures if not timeout - EARLY_S <= s <= timeout + SLACK_S]


def test_a_body_at_one_byte_per_second_gets_408_within_the_body_deadline(server: Server) -> None:
    async def main() -> tuple[float, bytes]:
        reader, writer = await open_tls(server)
        writer.write(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Authorization: Bearer " + server.admin_key.encode() + b"\r\n\r\n"
        )
        started = time.monotonic()
        closed = asyncio.create_task(read_until_closed(reader, 60))
        while not closed.done():
            writer.write(b"{")
            await asyncio.wait([closed], timeout=1.0)
        writer.transport.abort()
        return time.monotonic() - started, await closed

    seconds, answer = asyncio.run(main())
    status, headers = parse_head(answer)
    assert status == 408
    assert_security_headers(headers, "408")
    assert seconds <= TIMEOUT_S + SLACK_S


# --- Security headers -----------------------------------------------------------------------


def route_table(data_dir: Path) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, walked from app.routes, and of the routes the
    OpenAPI document describes that the fast entry serves before routing (infer)."""
    service = Service.open(Settings(data_dir=data_dir))
    try:
        app: Any = create_app(service, manage_lifecycle=False)
        while not hasattr(app, "routes"):
            app = app.app  # the fast path and the observer wrap the FastAPI app
        table: list[tuple[str, str]] = []

        def walk(routes: list[Any], prefix: str) -> None:
            for route in routes:
                if hasattr(route, "original_router"):  # an included router
                    walk(route.original_router.routes, prefix + route.include_context.prefix)
                else:
                    table.extend((m, prefix + route.path) for m in sorted(route.methods))

        walk(app.routes, "")
        for path, item in app.openapi()["paths"].items():
            table.extend((m.upper(), path) for m in sorted(item) if (m.upper(), path) not in table)
        return table
    finally:
        service.stop()


# Bodies that make a route succeed: a new key (201) is the response whose body is a secret.
BODIES: dict[str, Any] = {"/api/v1/keys": {"role": "consumer"}}


def test_every_route_answers_with_the_security_headers(server: Server) -> None:
    table = route_table(server.data_dir)
    assert ("POST", "/v2/models/{model}/infer") in table
    assert ("POST", "/api/v1/keys") in table
    assert len(table) >= 30
    seen: set[int] = set()
    with server.client() as anonymous, server.client(server.admin_key) as admin:
        for method, template in table:
            path = re.sub(r"\{model\}", "iris", template)
            path = re.sub(r"\{version\}", "1", path)
            path = re.sub(r"\{[^}]+\}", "x", path)
            for client in (anonymous, admin):
                body = BODIES.get(path, {}) if method in ("POST", "PUT", "PATCH") else None
                r = client.request(method, path, json=body)
                assert_security_headers(r.headers, f"{method} {path}: {r.status_code}")
                seen.add(r.status_code)
        # Refusals outside the route table: unknown path, wrong method, body too large,
        # and uvicorn's own answer to a malformed request.
        key = admin.post("/api/v1/keys", json=BODIES["/api/v1/keys"]).json()["key"]
        with server.client(key) as consumer:
            forbidden = consumer.get("/api/v1/keys")
        extra = [
            forbidden,
            admin.get("/no/such/route"),
            admin.request("DELETE", "/v2/health/ready"),
            admin.post("/v2/models/iris/infer", content=b"x" * (MAX_REQUEST + 1)),
        ]
        for r in extra:
            assert_security_headers(r.headers, f"{r.request.method} {r.url}: {r.status_code}")
            seen.add(r.status_code)

    async def malformed() -> bytes:
        reader, writer = await open_tls(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        answer = await read_until_closed(reader, 30)
        writer.transport.abort()
        return answer

    status, headers = parse_head(asyncio.run(malformed()))
    assert status == 400
    assert_security_headers(headers, "uvicorn's 400")
    assert {200, 201, 401, 403, 404, 405, 413} <= seen


# --- Connection caps ------------------------------------------------------------------------


def test_connections_past_the_caps_are_refused_at_once(tmp_path: Path) -> None:
    """Per client address 5, per worker 8; addresses 127.0.0.x are all this host's loopback."""
    srv = init_server(tmp_path)
    srv.extra_env = {
        "MODELKEEP_MAX_CONNECTIONS_PER_CLIENT": "5",
        "MODELKEEP_MAX_CONNECTIONS": "8",
        "MODELKEEP_HEADER_TIMEOUT_S": "60",
    }
    srv.start()

    async def hold(local: str) -> asyncio.StreamWriter:
        """A connection kept open by an unfinished head."""
        _, writer = await open_tls(srv, local)
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\n")
        await writer.drain()
        return writer

    async def ask(local: str) -> tuple[float, bytes]:
        started = time.monotonic()
        reader, writer = await open_tls(srv, local)
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await read_until_closed(reader, 30)
        writer.transport.abort()
        return time.monotonic() - started, answer

    async def main() -> None:
        held = [await hold("127.0.0.2") for _ in range(5)]
        seconds, answer = await ask("127.0.0.2")
        status, headers = parse_head(answer)
        assert status == 503
        assert_security_headers(headers, "503")
        assert headers["retry-after"] == "1"
        assert seconds < 5
        assert parse_head((await ask("127.0.0.3"))[1])[0] == 200  # another address is served

        held += [await hold("127.0.0.3") for _ in range(3)]  # 8: the worker is full
        status, _ = parse_head((await ask("127.0.0.4"))[1])
        assert status == 503

        for writer in held:
            writer.transport.abort()
        await asyncio.sleep(0.5)
        assert parse_head((await ask("127.0.0.2"))[1])[0] == 200  # places free again

    try:
        asyncio.run(main())
    finally:
        srv.stop()
