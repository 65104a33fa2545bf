"""Reading request bodies with the size limit enforced while reading."""

from __future__ import annotations

from starlette.requests import Request

from modelkeep.errors import InvalidInput, TooLarge

from ._limits import limit_message


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with TooLarge as soon as it passes ``limit`` bytes.

    BodyLimitMiddleware enforces the same limit for every route; this check keeps the
    handler correct on its own.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("invalid Content-Length header")
        if int(declared) > limit:
            raise TooLarge(limit_message(limit))
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(limit_message(limit))
    return bytes(buf)
