"""What the connection limits and the security headers cost per request, in the protocol alone.

`make bench` measures the whole infer path against a bare endpoint, but needs a quiet machine;
this isolates the HTTP protocol the server runs, so its cost can be read on a busy one. A V2
infer request, as httpx sends it, is fed to each protocol over a fake socket, answered by a
two-line ASGI app, and the process CPU time per request is printed, the best of many short runs
(CPU time, not wall time: other processes on the machine do not count).

    .venv/bin/python bench/bench_protocol.py

Compared: uvicorn's protocol with coalesced writes and no extra headers (before), and the same
with the security headers, with the limits, and with both (what `modelkeep serve` runs).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from modelkeep.api._connections import ConnectionLimits, LimitedHttpToolsProtocol
from modelkeep.api._transport import CoalescingHttpToolsProtocol
from modelkeep.api.server import SECURITY_HEADERS

BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
REQUEST = (
    b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nUser-Agent: python-httpx/0.28\r\n"
    b"Authorization: Bearer mk_abcdefghijkl_" + b"x" * 43 + b"\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
LIMITS = ConnectionLimits(16384, 100, 1000, 200, 10.0, 10.0, 10.0, 1024)


class Socket:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.7", 50123), "sockname": ("127.0.0.1", 8443)}.get(name)


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def cpu_us_per_request(protocol_class: type, headers: list[tuple[str, str]], n: int) -> float:
    async def main() -> float:
        config = Config(
            app=app, http=protocol_class, headers=headers, access_log=False, log_config=None
        )
        config.load()
        state = ServerState()
        state.default_headers = [(b"date", b"Sun, 06 Dec 2026 14:00:00 GMT")]
        state.default_headers += config.encoded_headers
        extra = {"limits": LIMITS} if protocol_class is LimitedHttpToolsProtocol else {}
        protocol = protocol_class(config=config, server_state=state, app_state={}, **extra)
        sock = Socket()
        protocol.connection_made(sock)
        started = time.process_time()
        for _ in range(n):
            sock.written.clear()
            protocol.data_received(REQUEST)
            while not sock.written:
                await asyncio.sleep(0)
        return (time.process_time() - started) / n * 1e6

    return uvloop.run(main())


def main() -> None:
    variants = {
        "before (coalescing only)": (CoalescingHttpToolsProtocol, []),
        "+ security headers": (CoalescingHttpToolsProtocol, SECURITY_HEADERS),
        "+ connection limits": (LimitedHttpToolsProtocol, []),
        "both (modelkeep serve)": (LimitedHttpToolsProtocol, SECURITY_HEADERS),
    }
    best = {
        name: min(cpu_us_per_request(*v, n=2000) for _ in range(25)) for name, v in variants.items()
    }
    base = best["before (coalescing only)"]
    for name, us in best.items():
        print(f"{name:26} {us:6.1f} us CPU/request  ({us - base:+.1f})")


if __name__ == "__main__":
    main()
