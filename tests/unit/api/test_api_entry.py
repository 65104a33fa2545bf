"""ProtocolEntry, the pure-ASGI way in shared by the protocol adapters: routing, errors."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import httpx

from modelkeep.api._entry import Answer, Exchange, ProtocolEntry, Route
from modelkeep.errors import InternalError, RateLimited
from modelkeep.service import Service
from modelkeep.testing import app_client


async def fallback(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 418, "headers": []})
    await send({"type": "http.response.body", "body": b"next app"})


async def boom(_exchange: Exchange) -> Answer:
    raise RuntimeError("/secret/path/model.onnx exploded")


async def internal(_exchange: Exchange) -> Answer:
    raise InternalError("an internal detail")


async def limited(_exchange: Exchange) -> Answer:
    raise RateLimited("slow down", retry_after=2.5)


async def echo(exchange: Exchange) -> Answer:
    return Answer(201, exchange.body, [(b"x-extra", b"1")], b"text/plain")


ROUTES = {
    "/boom": Route("/boom", boom, public=True),
    "/internal": Route("/internal", internal, public=True),
    "/limited": Route("/limited", limited, public=True),
    "/echo": Route("/echo", echo, public=True),
}


def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    service = SimpleNamespace(settings=SimpleNamespace(max_request_bytes=16))
    entry = ProtocolEntry(
        fallback,
        cast(Service, service),
        lambda m, p: ROUTES.get(p) if m == "POST" else None,
    )

    async def go() -> httpx.Response:
        async with app_client(entry) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_unrecognised_requests_go_on_to_the_next_app() -> None:
    assert call("POST", "/other").status_code == 418
    assert call("GET", "/echo").status_code == 418


def test_the_handler_answers_with_its_status_headers_and_body() -> None:
    r = call("POST", "/echo", content=b"hello")
    assert (r.status_code, r.text, r.headers["x-extra"]) == (201, "hello", "1")
    assert r.headers["content-type"] == "text/plain"
    assert r.headers["x-request-id"]


def test_the_body_limit_applies_before_the_handler() -> None:
    r = call("POST", "/echo", content=b"x" * 17)
    assert (r.status_code, list(r.json())) == (413, ["error"])


def test_errors_never_show_internal_details() -> None:
    for path in ("/boom", "/internal"):
        r = call("POST", path)
        assert (r.status_code, r.json()) == (500, {"error": "internal error"})


def test_a_modelkeep_error_keeps_its_status_and_retry_after() -> None:
    r = call("POST", "/limited")
    assert (r.status_code, r.json(), r.headers["retry-after"]) == (
        429,
        {"error": "slow down"},
        "3",
    )
