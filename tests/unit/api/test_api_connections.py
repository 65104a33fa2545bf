"""LimitedHttpToolsProtocol: the limits on unauthenticated connections, over a fake socket.

Each test drives the real protocol (uvicorn's httptools protocol and the real parser) with
bytes, and reads what it wrote back; timeouts are tens of milliseconds so nothing waits long.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from modelkeep.api._connections import (
    ConnectionLimits,
    LimitedHttpToolsProtocol,
    TlsTimeoutLoop,
    drain,
)
from modelkeep.api.server import SECURITY_HEADERS
from modelkeep.crypto.tls import create_tls_material, server_ssl_context

LIMITS = ConnectionLimits(
    max_header_bytes=1024,
    max_headers=10,
    max_connections=4,
    max_connections_per_client=2,
    tls_handshake_timeout_s=1.0,
    header_timeout_s=0.1,
    body_timeout_s=0.1,
    body_min_rate=1000,  # 100 bytes per 0.1 s window
)
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


class Socket:
    """Stands in for the TLS transport: records what the protocol writes and whether it closed."""

    def __init__(self, host: str = "10.0.0.7") -> None:
        self.host = host
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.host, 50123), "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def status(self) -> int | None:
        """The status of the first response written, if any."""
        if not self.written:
            return None
        return int(bytes(self.written).split(b" ", 2)[1])


class CountingParser:
    """Wraps httptools' parser: counts the bytes the protocol gives it."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += len(data)
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


async def echo(scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """Reads the whole body, then answers 200 with it."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def connect(
    limits: ConnectionLimits = LIMITS,
    *,
    state: ServerState | None = None,
    host: str = "10.0.0.7",
    app: Any = echo,
    keep_alive: int = 5,
) -> tuple[LimitedHttpToolsProtocol, Socket, CountingParser]:
    config = Config(app=app, http=LimitedHttpToolsProtocol, timeout_keep_alive=keep_alive)
    config.load()
    state = state or ServerState()
    protocol = LimitedHttpToolsProtocol(
        config=config, server_state=state, app_state={}, limits=limits
    )
    parser = CountingParser(protocol.parser)
    protocol.parser = parser
    protocol.linger_s = 0.0  # cut refused connections at once
    sock = Socket(host)
    protocol.connection_made(sock)  # type: ignore[arg-type]
    return protocol, sock, parser


async def settle(seconds: float = 0.0) -> None:
    """Let the app tasks and the coalesced writes run (and timers, given ``seconds``)."""
    await asyncio.sleep(seconds)
    for _ in range(5):
        await asyncio.sleep(0)


def body_of(sock: Socket) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(bytes(sock.written).split(b"\r\n\r\n", 1)[1])
    return result


def test_a_head_within_the_cap_is_served() -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        padding = b"x" * (LIMITS.max_header_bytes - len(GET) - len(b"X-Pad: \r\n"))
        head = GET[:-2] + b"X-Pad: " + padding + b"\r\n\r\n"
        assert len(head) == LIMITS.max_header_bytes
        for i in range(0, len(head), 100):  # in pieces, as a network would deliver it
            protocol.data_received(head[i : i + 100])
        await settle()
        assert (sock.status(), sock.closed) == (200, False)

    asyncio.run(main())


def test_an_endless_header_gets_431_after_no_more_than_the_cap_was_parsed() -> None:
    async def main() -> None:
        protocol, sock, parser = connect()
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: ")
        for _ in range(1000):  # 4 MB offered in 4 KiB reads
            protocol.data_received(b"a" * 4096)
        await settle()
        assert parser.fed == LIMITS.max_header_bytes
        assert (sock.status(), sock.closed) == (431, True)
        assert body_of(sock) == {"error": "the request headers are too large"}
        # Reading stopped at once, and the connection was cut rather than closed with TLS,
        # which would read on (discarding) until the client stopped sending.
        assert (sock.reading, sock.aborted) == (False, True)

    asyncio.run(main())


def test_one_read_larger_than_the_cap_is_cut_at_the_cap() -> None:
    async def main() -> None:
        protocol, sock, parser = connect()
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 10 * 1024 * 1024)
        await settle()
        assert parser.fed == LIMITS.max_header_bytes
        assert sock.status() == 431

    asyncio.run(main())


def test_a_read_holding_a_whole_request_and_a_large_body_is_not_cut() -> None:
    """The cap counts the head only: body bytes in the same read pass on."""

    async def main() -> None:
        protocol, sock, _ = connect()
        body = b"b" * 50_000
        protocol.data_received(b"POST / HTTP/1.1\r\nContent-Length: 50000\r\n\r\n" + body)
        await settle()
        assert sock.status() == 200
        assert bytes(sock.written).endswith(body)

    asyncio.run(main())


def test_each_request_on_a_connection_gets_the_whole_cap() -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        head = GET[:-2] + b"X-Pad: " + b"x" * 900 + b"\r\n\r\n"
        for _ in range(3):
            protocol.data_received(head)
            await settle()
        assert bytes(sock.written).count(b"HTTP/1.1 200 OK") == 3
        assert sock.closed is False

    asyncio.run(main())


def test_pipelined_requests_in_one_read_are_all_served() -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(GET * 5)
        for _ in range(5):
            await settle()
        assert bytes(sock.written).count(b"HTTP/1.1 200 OK") == 5

    asyncio.run(main())


def test_too_many_header_fields_get_431_and_the_limit_itself_passes() -> None:
    async def main() -> None:
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(LIMITS.max_headers))
        protocol, sock, _ = connect()
        protocol.data_received(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
        await settle()
        assert sock.status() == 200

        protocol, sock, _ = connect()
        protocol.data_received(b"GET / HTTP/1.1\r\n" + fields + b"X-One-More: 1\r\n\r\n")
        await settle()
        assert (sock.status(), sock.closed) == (431, True)
        assert body_of(sock) == {"error": "the request has too many header fields"}

    asyncio.run(main())


def test_a_head_that_trickles_gets_408_at_the_header_timeout() -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(b"GET / HTTP/1.1\r\n")
        for _ in range(5):  # still sending, but never finishing
            await settle(LIMITS.header_timeout_s / 4)
            if sock.closed:
                break
            protocol.data_received(b"X")
        assert (sock.status(), sock.closed) == (408, True)
        assert body_of(sock) == {"error": "the request headers did not arrive in time"}

    asyncio.run(main())


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout() -> None:
    async def main() -> None:
        _, sock, _ = connect(keep_alive=1)
        await settle(0.5)
        assert sock.closed is False
        await settle(0.7)
        assert (sock.closed, sock.written) == (True, bytearray())

    asyncio.run(main())


def post(length: int) -> bytes:
    return b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % length


def test_a_slow_body_gets_408_and_the_app_is_told_the_client_left() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                # What the app sends now must not reach the wire after the 408.
                await send({"type": "http.response.start", "status": 400, "headers": []})
                return

    async def main() -> None:
        protocol, sock, _ = connect(app=app)
        protocol.data_received(post(1000))
        for _ in range(8):  # 10 bytes per 0.05 s: a fifth of the minimum rate
            await settle(LIMITS.body_timeout_s / 2)
            if sock.closed:
                break
            protocol.data_received(b"b" * 10)
        await settle()
        assert (sock.status(), sock.closed) == (408, True)
        assert body_of(sock) == {"error": "the request body is arriving too slowly"}
        assert bytes(sock.written).count(b"HTTP/1.1") == 1
        assert seen[-1] == "http.disconnect"

    asyncio.run(main())


def test_a_body_at_the_minimum_rate_is_read_to_the_end() -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(post(600))
        for _ in range(6):  # 100 bytes per 0.05 s: twice the minimum rate
            await settle(LIMITS.body_timeout_s / 2)
            protocol.data_received(b"b" * 100)
        await settle()
        assert (sock.status(), sock.closed) == (200, False)

    asyncio.run(main())


def test_a_body_held_back_by_the_server_is_not_timed() -> None:
    """The app does not read: uvicorn pauses reading, and the client cannot be blamed."""

    async def main() -> None:
        go = asyncio.Event()

        async def slow_reader(scope: Any, receive: Any, send: Any) -> None:
            await go.wait()
            await echo(scope, receive, send)

        protocol, sock, _ = connect(app=slow_reader)
        protocol.data_received(post(200_000) + b"b" * 100_000)  # past uvicorn's high water
        assert sock.reading is False
        await settle(LIMITS.body_timeout_s * 4)
        assert sock.closed is False
        go.set()
        await settle()
        protocol.data_received(b"b" * 100_000)
        await settle()
        assert (sock.status(), sock.closed) == (200, False)

    asyncio.run(main())


def test_a_slow_body_after_an_early_response_is_cut_without_a_second_answer() -> None:
    """The app answered before the body came: the rest is read and dropped, under the rate."""

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        protocol, sock, _ = connect(app=refuse)
        protocol.data_received(post(1000))
        await settle()
        assert (sock.status(), sock.closed) == (401, False)
        for _ in range(8):
            await settle(LIMITS.body_timeout_s / 2)
            if sock.closed:
                break
            protocol.data_received(b"b")
        assert (sock.reading, sock.aborted) == (False, True)
        assert bytes(sock.written).count(b"HTTP/1.1") == 1

    asyncio.run(main())


def test_connections_past_the_worker_limit_get_503_and_are_closed() -> None:
    async def main() -> None:
        state = ServerState()
        hosts = [f"10.0.0.{n}" for n in range(LIMITS.max_connections + 1)]
        socks = [connect(state=state, host=host)[1] for host in hosts]
        await settle()
        assert [s.closed for s in socks] == [False] * LIMITS.max_connections + [True]
        assert socks[-1].status() == 503
        assert b"retry-after: 1\r\n" in socks[-1].written

    asyncio.run(main())


def test_connections_past_the_per_client_limit_get_503_others_still_connect() -> None:
    async def main() -> None:
        state = ServerState()
        same = [connect(state=state, host="10.0.0.9") for _ in range(3)]
        await settle()
        assert [s.closed for _, s, _ in same] == [False, False, True]
        assert body_of(same[2][1]) == {
            "error": "too many connections from this address; retry shortly"
        }
        _, other, _ = connect(state=state, host="10.0.0.10")
        await settle()
        assert other.closed is False
        # A connection that ends frees its place (a refused one too, once its socket closed).
        same[0][0].connection_lost(None)
        same[2][0].connection_lost(None)
        _, again, _ = connect(state=state, host="10.0.0.9")
        await settle()
        assert again.closed is False

    asyncio.run(main())


def test_the_protocols_own_answers_carry_the_default_headers() -> None:
    """uvicorn's default headers (date and modelkeep's security headers) are on a 431 too."""

    async def main() -> None:
        state = ServerState()
        encoded = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS]
        state.default_headers = [(b"date", b"today"), *encoded]
        protocol, sock, _ = connect(replace(LIMITS, max_headers=1), state=state)
        protocol.data_received(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n")
        await settle()
        head = bytes(sock.written).split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
        for name, value in encoded:
            assert name + b": " + value in head
        assert not any(line.startswith(b"server:") for line in head)

    asyncio.run(main())


def test_a_request_that_arrives_in_one_read_arms_no_timer() -> None:
    """The usual path costs no timer: only an unfinished head or body is timed."""

    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(post(5) + b"hello")
        assert protocol._timer is None
        await settle()
        assert sock.status() == 200
        protocol.data_received(post(5))  # head now, body in a later read: timed
        assert protocol._timer is not None
        protocol.data_received(b"hello")
        assert protocol._timer is None

    asyncio.run(main())


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide draining flag starts unset and is unset again after the test."""
    monkeypatch.setattr(LimitedHttpToolsProtocol, "draining", False)


def heads(sock: Socket) -> list[bytes]:
    """The response heads written so far, lower-cased."""
    return [
        part.split(b"\r\n\r\n")[0].lower() for part in bytes(sock.written).split(b"HTTP/1.1 ")[1:]
    ]


def test_before_a_drain_responses_keep_the_connection_open(serving: None) -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(GET)
        await settle()
        assert b"connection: close" not in heads(sock)[0]
        assert sock.closed is False

    asyncio.run(main())


def test_after_drain_each_response_says_connection_close_and_closes_after_it(
    serving: None,
) -> None:
    """SIGTERM: a keep-alive client is told to go elsewhere by its next response."""

    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(GET)
        await settle()
        drain()
        assert sock.closed is False  # idle: nothing is closed under a request on its way
        protocol.data_received(GET)
        await settle()
        first, second = heads(sock)
        assert (b"connection: close" in first, b"connection: close" in second) == (False, True)
        assert sock.closed is True  # after the answer

    asyncio.run(main())


def test_shutdown_leaves_an_idle_connection_to_its_next_request(serving: None) -> None:
    """uvicorn's shutdown closed a connection between requests at once, losing a request the
    client had just sent on it; here that request is answered, then the connection closes."""

    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(GET)
        await settle()
        protocol.shutdown()
        await settle()
        assert sock.closed is False
        protocol.data_received(GET)  # sent before the client could know of the shutdown
        await settle()
        assert b"connection: close" in heads(sock)[1]
        assert sock.closed is True

    asyncio.run(main())


def test_shutdown_leaves_a_new_connection_to_its_first_request(serving: None) -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.shutdown()  # connected, first request not read yet
        await settle()
        assert sock.closed is False
        protocol.data_received(GET)
        await settle()
        assert (sock.status(), sock.closed) == (200, True)
        assert b"connection: close" in heads(sock)[0]

    asyncio.run(main())


def test_shutdown_lets_a_request_in_flight_finish_then_closes(serving: None) -> None:
    async def main() -> None:
        protocol, sock, _ = connect()
        protocol.data_received(post(5))  # the body is still on its way
        protocol.shutdown()
        assert sock.closed is False
        protocol.data_received(b"hello")
        await settle()
        assert (sock.status(), sock.closed) == (200, True)
        assert b"connection: close" in heads(sock)[0]

    asyncio.run(main())


def test_an_idle_connection_still_closes_at_the_keep_alive_timeout_after_shutdown(
    serving: None,
) -> None:
    """So uvicorn's wait for connections to end is bounded by the keep-alive timeout."""

    async def main() -> None:
        protocol, sock, _ = connect(keep_alive=1)
        protocol.shutdown()
        await settle(1.2)
        assert (sock.closed, sock.written) == (True, bytearray())

    asyncio.run(main())


def test_the_event_loop_gives_tls_servers_the_handshake_timeout(tmp_path: Path) -> None:
    """A client that connects and never starts TLS is dropped after the timeout (not 60 s)."""
    create_tls_material(tmp_path)
    context = server_ssl_context(tmp_path / "server.pem", tmp_path / "server-key.pem")

    async def main() -> float:
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=context
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
        server.close()
        return time.monotonic() - started

    with asyncio.Runner(loop_factory=lambda: TlsTimeoutLoop(0.3)) as runner:
        waited = runner.run(main())
    assert 0.2 < waited < 5
