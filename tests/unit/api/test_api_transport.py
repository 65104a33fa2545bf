"""CoalescingTransport: the writes of one event-loop turn leave as one write, nothing is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modelkeep.api._transport import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport:
    """Stands in for the socket transport: records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.7", 50123)}.get(name, default)


def wrapped() -> tuple[CoalescingTransport, RecordingTransport]:
    inner = RecordingTransport()
    return CoalescingTransport(inner, asyncio.get_running_loop()), inner  # type: ignore[arg-type]


async def next_turn() -> None:
    await asyncio.sleep(0)


def test_head_and_body_written_in_one_turn_leave_as_one_write() -> None:
    async def main() -> None:
        transport, inner = wrapped()
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(bytearray(b"{}"))
        assert inner.writes == []  # held until the end of this turn
        assert transport.get_write_buffer_size() == 40 + 7
        await next_turn()
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]

    asyncio.run(main())


def test_writes_of_different_turns_stay_separate_and_in_order() -> None:
    async def main() -> None:
        transport, inner = wrapped()
        for chunk in (b"one", b"two", b"three"):
            transport.write(chunk)
            await next_turn()
        transport.writelines([b"a", b"b"])
        await next_turn()
        assert inner.writes == [b"one", b"two", b"three", b"ab"]

    asyncio.run(main())


def test_close_and_write_eof_flush_what_is_waiting_first() -> None:
    async def main() -> None:
        transport, inner = wrapped()
        transport.write(b"last words")
        transport.close()
        assert (inner.writes, inner.closed) == ([b"last words"], True)
        await next_turn()  # the scheduled flush finds nothing left: no write after close
        assert inner.writes == [b"last words"]

        transport, inner = wrapped()
        transport.write(b"tail")
        transport.write_eof()
        assert (inner.writes, inner.eof) == ([b"tail"], True)

    asyncio.run(main())


def test_everything_else_is_the_real_transports() -> None:
    async def main() -> None:
        transport, inner = wrapped()
        assert transport.get_extra_info("peername") == ("10.0.0.7", 50123)
        assert transport.is_closing() is False
        inner.closed = True
        assert transport.is_closing() is True
        with pytest.raises(AttributeError):
            transport.no_such_method()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_many_concurrent_responses_each_arrive_whole() -> None:
    """Tasks writing interleaved in one turn: per connection, bytes arrive complete and in order."""

    async def respond(transport: CoalescingTransport, n: int) -> None:
        transport.write(f"head-{n};".encode())
        await next_turn()
        transport.write(f"body-{n};".encode())

    async def main() -> None:
        pairs = [wrapped() for _ in range(50)]
        await asyncio.gather(*(respond(t, n) for n, (t, _) in enumerate(pairs)))
        await next_turn()
        for n, (_, inner) in enumerate(pairs):
            assert b"".join(inner.writes) == f"head-{n};body-{n};".encode()

    asyncio.run(main())


def test_the_protocol_hands_uvicorn_a_coalescing_transport() -> None:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    async def main() -> None:
        config = Config(app=lambda *_: None, http=CoalescingHttpToolsProtocol)
        config.load()
        protocol = CoalescingHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}
        )
        inner = RecordingTransport()
        protocol.connection_made(inner)  # type: ignore[arg-type]
        assert isinstance(protocol.transport, CoalescingTransport)
        assert protocol.client == ("10.0.0.7", 50123)

    asyncio.run(main())
