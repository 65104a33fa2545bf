"""The access log (one JSON line per request, never a secret or a body) and ObserveMiddleware."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.api._observe import ObserveMiddleware
from modelkeep.audit.access import (
    AccessLog,
    AccessRecord,
    bind_request,
    configure_access_log,
    input_digest,
    new_request_id,
    reset_request,
    safe_model,
    safe_version,
)
from modelkeep.audit.metrics import Metrics
from modelkeep.auth import Principal

TOKEN = "mk_abcdefghijkl_" + "S3cretS3cretS3cretS3cretS3cretS3cretS3cret1"
PAYLOAD_MARKER = "PAYLOAD-MARKER-7f3a9c"
QUERY_SECRET = "QUERY-SECRET-a81b"
INFER = "/v2/models/{model}/infer"


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def record(**changes: object) -> AccessRecord:
    fields: dict[str, object] = {
        "request_id": "0123456789abcdef0123456789abcdef",
        "principal": "key:abcdefghijkl",
        "method": "POST",
        "route": INFER,
        "model": "iris",
        "version": "3",
        "status": 200,
        "latency_ms": 1.25,
        "rows": 8,
        "input_digest": "ba7816bf8f01cfea",
        "bytes_in": 412,
        "bytes_out": 230,
        "client": "10.0.0.7",
    }
    fields.update(changes)
    return AccessRecord(**fields)  # type: ignore[arg-type]


# -- the log itself -------------------------------------------------------------------------


class Sink:
    """An AccessLog writing to memory, and the lines it wrote, parsed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.log = AccessLog(self.stream)

    def lines(self) -> list[dict[str, Any]]:
        self.log.flush()  # lines written on a loop wait up to the log's delay
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


def test_access_log_writes_exactly_one_json_line_per_record() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    log.write(record())
    log.write(record(status=404, rows=None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    timestamp = first.pop("timestamp")
    assert first == {"event": "access", "level": "info", **asdict(record())}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", timestamp)
    assert (second["status"], second["rows"]) == (404, None)


class WriteCounter(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_lines_written_on_the_loop_go_out_together_after_the_delay() -> None:
    stream = WriteCounter()
    log = AccessLog(stream, delay_s=0.02)

    async def main() -> None:
        log.write(record(status=200))
        log.write(record(status=404))
        await asyncio.sleep(0)
        assert stream.writes == []  # waiting for the delay, not only the end of the turn
        await asyncio.sleep(0.1)
        assert len(stream.writes) == 1
        log.write(record(status=500))
        await asyncio.sleep(0.1)

    asyncio.run(main())
    statuses = [json.loads(line)["status"] for line in stream.getvalue().splitlines()]
    assert statuses == [200, 404, 500]
    assert len(stream.writes) == 2


def test_lines_go_out_at_once_when_max_pending_wait() -> None:
    stream = WriteCounter()
    log = AccessLog(stream, delay_s=3600, max_pending=3)

    async def main() -> None:
        log.write(record(status=200))
        log.write(record(status=201))
        assert stream.writes == []
        log.write(record(status=202))
        assert len(stream.writes) == 1

    asyncio.run(main())
    statuses = [json.loads(line)["status"] for line in stream.getvalue().splitlines()]
    assert statuses == [200, 201, 202]


def test_the_timestamp_is_when_the_record_was_written_not_when_it_went_out() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, delay_s=3600)

    async def main() -> None:
        log.write(record())
        await asyncio.sleep(1.1)
        log.flush()

    before = datetime.now(UTC)
    asyncio.run(main())
    (line,) = (json.loads(text) for text in stream.getvalue().splitlines())
    stamped = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((stamped - before).total_seconds()) < 0.5


def test_writes_are_whole_lines_of_at_most_4_kib_so_a_pipe_never_splits_them() -> None:
    stream = WriteCounter()
    log = AccessLog(stream, delay_s=0.0)

    async def main() -> None:
        for n in range(100):
            log.write(record(latency_ms=float(n)))
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert len(stream.writes) > 1
    for chunk in stream.writes:
        assert len(chunk.encode()) <= 4096
        assert chunk.endswith("\n")
    latencies = [json.loads(line)["latency_ms"] for line in stream.getvalue().splitlines()]
    assert latencies == [float(n) for n in range(100)]


def test_a_line_written_off_the_loop_goes_out_at_once_with_what_waits() -> None:
    stream = WriteCounter()
    log = AccessLog(stream)

    async def main() -> None:
        log.write(record(status=200))
        # A worker thread of the same process writes before the loop's turn ends.
        await asyncio.to_thread(log.write, record(status=201))
        assert [json.loads(line)["status"] for line in stream.getvalue().splitlines()] == [
            200,
            201,
        ]

    asyncio.run(main())


def test_flush_writes_what_waits_at_once() -> None:
    stream = WriteCounter()
    log = AccessLog(stream)

    async def main() -> None:
        log.write(record())
        log.flush()  # as the app does when it stops, before the delay is over
        assert len(stream.getvalue().splitlines()) == 1
        await asyncio.sleep(0.1)  # the scheduled flush finds nothing more to write

    asyncio.run(main())
    assert len(stream.writes) == 1


def test_request_context_is_bound_through_contextvars_and_reset() -> None:
    stream = io.StringIO()
    configure_access_log(stream)
    log = structlog.get_logger("elsewhere")
    token = bind_request("feedfacefeedfacefeedfacefeedface")
    log.info("inside")
    reset_request(token)
    log.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "feedfacefeedfacefeedfacefeedface"
    assert "request_id" not in outside


def test_keys_named_like_secrets_are_dropped_even_when_bound_elsewhere() -> None:
    stream = io.StringIO()
    configure_access_log(stream)
    structlog.contextvars.bind_contextvars(
        authorization=f"Bearer {TOKEN}", api_key=TOKEN, request_body=PAYLOAD_MARKER
    )
    structlog.get_logger("elsewhere").info("alert.fired", input_digest="ba7816bf8f01cfea")
    AccessLog(stream).write(record())
    structlog_line, access_line = stream.getvalue().splitlines()
    for line in (structlog_line, access_line):
        assert TOKEN not in line
        assert PAYLOAD_MARKER not in line
        assert json.loads(line)["input_digest"] == "ba7816bf8f01cfea"  # allowed by name
    # Access lines have a fixed set of keys: nothing bound elsewhere reaches them.
    assert set(json.loads(access_line)) == {"event", "level", "timestamp", *asdict(record())}


def test_input_digest_is_the_first_16_hex_of_sha256() -> None:
    # SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    assert input_digest(b"abc") == "ba7816bf8f01cfea"


def test_request_ids_are_fresh_random_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # Unpredictable: no two consecutive ids share a hex digit in the same place more than a
    # random pair would (a counter in the clear would keep most of them).
    a, b = new_request_id(), new_request_id()
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 12


def test_a_forked_worker_makes_ids_of_its_own() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same counter position as the parent, but a new key
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    theirs = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", theirs)
    assert theirs != new_request_id()


@pytest.mark.parametrize(
    ("value", "shown"),
    [("iris", "iris"), (None, None), ("Bad Name", "?"), (TOKEN.lower(), "?"), ("x" * 64, "?")],
)
def test_safe_model_keeps_only_model_shaped_names(value: str | None, shown: str | None) -> None:
    assert safe_model(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"), [("3", "3"), (3, "3"), (None, None), ("v3", "?"), ("1" * 10, "?")]
)
def test_safe_version_keeps_only_version_numbers(value: object, shown: str | None) -> None:
    assert safe_version(value) == shown


# -- the middleware -------------------------------------------------------------------------


class FakeAuthentication:
    """Stands in for api._auth: a principal for the right token, 401 otherwise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] == "http" and headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
            await JSONResponse({"error": "invalid API key"}, status_code=401)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = Principal("key:abcdefghijkl", "consumer", None)
        await self.app(scope, receive, send)


async def infer(request: Request) -> Response:
    body = await request.body()
    request.state.rows = 2
    request.state.input_digest = input_digest(body)
    return JSONResponse({"echo": body.decode()})  # echoes the payload: bytes_out, not content


async def boom(_request: Request) -> Response:
    raise RuntimeError("bug")


def make_app(metrics: Metrics | None = None, sink: Sink | None = None) -> Starlette:
    return Starlette(
        routes=[
            Route(INFER, infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/boom", boom),
        ],
        middleware=[
            Middleware(ObserveMiddleware, metrics=metrics, access_log=sink and sink.log),
            Middleware(FakeAuthentication),
        ],
    )


AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Client:
    """Sends requests to the ASGI app in memory, from 10.0.0.7, one event loop per request."""

    def __init__(self, app: ASGIApp, *, raise_app_exceptions: bool = True) -> None:
        self.transport = httpx.ASGITransport(
            app, client=("10.0.0.7", 50123), raise_app_exceptions=raise_app_exceptions
        )

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url="http://modelkeep.test"
            ) as client:
                return await client.request(method, url, **kwargs)  # type: ignore[arg-type]

        return asyncio.run(send())

    def post(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("GET", url, **kwargs)


def test_each_response_has_a_fresh_request_id_matching_its_access_line() -> None:
    sink = Sink()
    client = Client(make_app(sink=sink))
    first = client.post("/v2/models/iris/infer", content=b"{}", headers=AUTH)
    second = client.post("/v2/models/iris/infer", content=b"{}", headers=AUTH)
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert ids[0] != ids[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert [line["request_id"] for line in sink.lines()] == ids


def test_access_line_describes_the_request_by_route_template_and_shape() -> None:
    sink = Sink()
    client = Client(make_app(sink=sink))
    body = b'{"inputs": [1, 2]}'
    response = client.post("/v2/models/iris/versions/3/infer?x=1", content=body, headers=AUTH)
    (line,) = sink.lines()
    latency = line.pop("latency_ms")
    line.pop("request_id")
    line.pop("timestamp")
    assert line == {
        "event": "access",
        "level": "info",
        "principal": "key:abcdefghijkl",
        "method": "POST",
        "route": "/v2/models/{model}/versions/{version}/infer",
        "model": "iris",
        "version": "3",
        "status": 200,
        "rows": 2,
        "input_digest": input_digest(body),
        "bytes_in": len(body),
        "bytes_out": len(response.content),
        "client": "10.0.0.7",
    }
    assert isinstance(latency, float)
    assert latency >= 0


def test_token_payload_and_query_secret_never_reach_the_log_stream() -> None:
    sink = Sink()
    stream = sink.stream
    configure_access_log(stream)  # structlog's lines, if any, go to the same stream
    client = Client(make_app(sink=sink))
    body = json.dumps({"inputs": PAYLOAD_MARKER}).encode()
    ok = client.post(f"/v2/models/iris/infer?api_key={QUERY_SECRET}", content=body, headers=AUTH)
    odd = client.post(f"/v2/models/{TOKEN.lower()}/infer", content=body, headers=AUTH)
    refused = client.post(
        f"/v2/models/iris/infer?token={QUERY_SECRET}",
        content=body,
        headers={"Authorization": f"Bearer {TOKEN}x"},
    )
    assert PAYLOAD_MARKER in ok.text  # the marker did travel through the app...
    assert (ok.status_code, odd.status_code, refused.status_code) == (200, 200, 401)
    sink.log.flush()
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["status"] for line in lines] == [200, 200, 401]
    for secret in (TOKEN, TOKEN.lower(), PAYLOAD_MARKER, QUERY_SECRET, "Bearer"):
        assert secret not in output  # ...but never into the log
    assert lines[1]["model"] == "?"


def test_refused_request_is_logged_as_anonymous_with_no_route() -> None:
    sink = Sink()
    client = Client(make_app(sink=sink))
    response = client.post("/v2/models/iris/infer", content=b"{}")
    (line,) = sink.lines()
    assert response.status_code == 401
    assert (line["principal"], line["route"], line["model"], line["status"]) == (
        "anonymous",
        None,
        None,
        401,
    )
    assert response.headers["X-Request-Id"] == line["request_id"]


def test_unhandled_error_is_logged_and_counted_as_500() -> None:
    metrics = Metrics()
    sink = Sink()
    client = Client(make_app(metrics, sink), raise_app_exceptions=False)
    response = client.get("/boom", headers=AUTH)
    (line,) = sink.lines()
    assert (response.status_code, line["status"], line["route"]) == (500, 500, "/boom")
    assert (
        b'modelkeep_requests_total{model="",route="/boom",status="500",version=""} 1.0'
        in (metrics.render()[0])
    )


def test_middleware_counts_requests_with_bounded_labels(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = Metrics()
    metrics.set_known_models({"iris": [3]})
    client = Client(make_app(metrics))  # no access log
    client.post("/v2/models/iris/infer", content=b"{}", headers=AUTH)
    client.post("/v2/models/iris/versions/3/infer", content=b"{}", headers=AUTH)
    client.post("/v2/models/nope/infer", content=b"{}", headers=AUTH)
    client.post("/no/such/route", content=b"{}", headers=AUTH)
    body = metrics.render()[0].decode()
    assert capsys.readouterr().out == ""  # without an AccessLog nothing is written
    expected = [
        'modelkeep_requests_total{model="iris",route="/v2/models/{model}/infer",'
        'status="200",version="default"} 1.0',
        'modelkeep_requests_total{model="iris",route="/v2/models/{model}/versions/{version}/infer",'
        'status="200",version="3"} 1.0',
        'modelkeep_requests_total{model="other",route="/v2/models/{model}/infer",'
        'status="200",version="other"} 1.0',
        'modelkeep_requests_total{model="",route="unmatched",status="404",version=""} 1.0',
    ]
    for sample in expected:
        assert sample in body


def test_a_failing_observer_does_not_fail_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenMetrics(Metrics):
        def observe_request(self, **_kwargs: object) -> None:
            raise RuntimeError("metrics backend gone")

    client = Client(make_app(BrokenMetrics()))
    response = client.post("/v2/models/iris/infer", content=b"{}", headers=AUTH)
    assert response.status_code == 200
    assert "request observation failed" in caplog.text


def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, _receive: Receive, _send: Send) -> None:
        seen.append(scope)

    async def receive() -> dict[str, object]:
        return {"type": "lifespan.startup"}

    async def send(_message: object) -> None:
        pass

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    sink = Sink()
    asyncio.run(ObserveMiddleware(app, Metrics(), sink.log)(scope, receive, send))
    assert seen == [scope]
    assert sink.lines() == []


def test_fast_path_state_gives_route_and_served_version_and_body_in_state_stays_out() -> None:
    """A pure-ASGI handler that bypasses the router reports through the state."""

    async def fast_infer(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        state = scope.setdefault("state", {})
        scope["path_params"] = {"model": "iris"}
        state.update(
            route=INFER,
            principal=Principal("key:abcdefghijkl", "consumer", None),
            body=message["body"],  # the fast path keeps the body here: never to be logged
            rows=4,
            input_digest=input_digest(message["body"]),
            version=7,  # the version actually served
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    stream = io.StringIO()
    metrics = Metrics()
    metrics.set_known_models({"iris": [7]})
    body = json.dumps({"inputs": PAYLOAD_MARKER}).encode()
    log = AccessLog(stream)
    response = Client(ObserveMiddleware(fast_infer, metrics, log)).post(
        "/v2/models/iris/infer", content=body
    )
    log.flush()
    output = stream.getvalue()
    line = json.loads(output)
    assert response.headers["X-Request-Id"] == line["request_id"]
    assert (line["route"], line["model"], line["version"], line["rows"]) == (INFER, "iris", "7", 4)
    assert line["input_digest"] == input_digest(body)
    assert PAYLOAD_MARKER not in output
    assert (
        b'modelkeep_requests_total{model="iris",route="/v2/models/{model}/infer",'
        b'status="200",version="7"} 1.0'
    ) in metrics.render()[0]
