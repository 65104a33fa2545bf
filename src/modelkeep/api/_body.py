"""Reading request bodies with the size limit enforced while reading, and the V2 binary
extension's header length. Shared by the infer fast path and the FastAPI routes."""

from __future__ import annotations

from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import Receive

from modelkeep.errors import InvalidInput, TooLarge

from ._limits import limit_message


def check_declared_length(content_length: str | bytes | None, limit: int) -> None:
    """Refuse a malformed Content-Length, or one over ``limit``, before a byte is read."""
    if content_length is not None:
        if not (content_length.isascii() and content_length.isdigit()):
            raise InvalidInput("invalid Content-Length header")
        if int(content_length) > limit:
            raise TooLarge(limit_message(limit))


async def _next_chunk(receive: Receive) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows; InvalidInput if the client left."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise InvalidInput("the client went away")
    return message.get("body", b""), message.get("more_body", False)


async def receive_body(receive: Receive, content_length: str | bytes | None, limit: int) -> bytes:
    """The whole body from ASGI ``receive``, refused with TooLarge as soon as it passes ``limit``.

    A declared Content-Length over the limit is refused before a byte is read.
    """
    check_declared_length(content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk, more = await _next_chunk(receive)
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit_message(limit))
        chunks.append(chunk)
        if not more:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def stream_body(
    receive: Receive,
    content_length: str | bytes | None,
    limit: int,
    consume: Callable[[list[bytes]], object],
    *,
    batch: int = 1 << 20,
) -> int:
    """Hand the body from ASGI ``receive`` to ``consume`` in batches of about ``batch`` bytes.

    ``consume`` runs in a worker thread (it may hash, encrypt and write), so the event loop
    holds at most one batch. The limit is enforced as for ``receive_body``. Returns the size.
    """
    check_declared_length(content_length, limit)
    pending: list[bytes] = []
    pending_size = 0
    size = 0
    while True:
        chunk, more = await _next_chunk(receive)
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit_message(limit))
        if chunk:
            pending.append(chunk)
            pending_size += len(chunk)
        if pending and (pending_size >= batch or not more):
            await run_in_threadpool(consume, pending)
            pending, pending_size = [], 0
        if not more:
            return size


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of ``request`` (see ``receive_body``).

    BodyLimitMiddleware enforces the same limit for every route; this check keeps the
    handler correct on its own.
    """
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


def header_length(value: str | bytes | None) -> int | None:
    """The ``Inference-Header-Content-Length`` value, if any; InvalidInput unless digits."""
    if value is None:
        return None
    # isdigit() alone admits '²' and other digits int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise InvalidInput("invalid Inference-Header-Content-Length header")
    return int(value)
