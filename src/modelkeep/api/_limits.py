"""Request body limits for every route, enforced while the body is read.

Route handlers that parse JSON bodies (FastAPI models) read the whole body before any handler
code runs, so the limit must sit below them: this middleware refuses a declared Content-Length
over the limit at once and cuts off a streamed body as soon as it passes the limit.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelkeep.errors import InvalidInput, TooLarge

from ._errors import modelkeep_error_response

_PUSH = re.compile(r"/api/v1/models/[^/]+/versions/?")


def limit_message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_request = max_request_bytes
        self.max_upload = max_upload_bytes

    def limit_for(self, scope: Scope) -> int:
        if scope["method"] == "POST" and _PUSH.fullmatch(scope["path"]):
            return self.max_upload
        return self.max_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    error: InvalidInput | TooLarge = InvalidInput("invalid Content-Length header")
                elif int(value) > limit:
                    error = TooLarge(limit_message(limit))
                else:
                    break
                await modelkeep_error_response(error)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLarge(limit_message(limit))
            return message

        await self.app(scope, limited_receive, send)
