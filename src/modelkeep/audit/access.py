"""The access log: one JSON line per HTTP request, for operators and incident response.

Unlike the audit log (``audit.log``: durable, hash-chained, security events only), the access log
is a plain stream written to stdout for a log collector. Each line describes one request by its
shape, never its content:

    {"event": "access", "request_id": "3f0c...", "principal": "key:abcdefgh2345",
     "method": "POST", "route": "/v2/models/{model}/infer", "model": "iris", "version": "3",
     "status": 200, "latency_ms": 1.234, "rows": 8, "input_digest": "9f86d081884c7d65",
     "bytes_in": 412, "bytes_out": 230, "client": "10.0.0.7", "level": "info",
     "timestamp": "2026-11-25T12:00:00.123456Z"}

What never appears: a request or response body, a credential, a header value, a raw path or a
query string. ``AccessRecord`` has no field that could hold them, values that come from the
client (model, version) are shape-checked before they are written, and the processor pipeline
drops any key named like a secret that other code may have bound to the request context.

``AccessLog`` renders and writes the lines itself (orjson, one write per line) instead of going
through structlog's processor chain: on the infer path that chain cost more than everything
else the server records about a request (bench/README.md). Its keys are fixed by
``AccessRecord`` plus ``event``, ``level`` and ``timestamp``, so nothing bound to the request
context elsewhere can reach an access line.

``bind_request`` sets the current request's id in a ``ContextVar``; every structlog line written
while the request runs (alerts, say) carries it, and payload capture records it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import os
import re
import sys
import threading
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, fields
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from modelkeep.registry.records import NAME_PATTERN

__all__ = [
    "ACCESS_EVENT",
    "AccessLog",
    "AccessRecord",
    "add_request_id",
    "bind_request",
    "configure_access_log",
    "current_request_id",
    "drop_secret_keys",
    "input_digest",
    "new_request_id",
    "reset_request",
    "safe_input_digest",
    "safe_model",
    "safe_version",
]

ACCESS_EVENT = "access"
_INPUT_DIGEST = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"[0-9]{1,9}")
_MAX_VERSION = 999_999_999  # the largest number _VERSION admits
# An API key pasted where a model name goes must not reach the log (see auth.apikeys).
_TOKEN_SHAPE = re.compile(r"mk_[a-z2-7]{12}_")
# Keys no log line may carry, whoever bound them: defence in depth behind AccessRecord.
_SECRET_KEYS = re.compile(
    r"(?i).*(authorization|token|secret|password|passwd|cookie|api[-_]?key|payload|body).*"
)
# "bytes_in", "bytes_out" and "input_digest" describe a body without holding it.
_ALLOWED_KEYS = frozenset({"bytes_in", "bytes_out", "input_digest"})


@dataclass(slots=True)
class AccessRecord:
    """One request, by its shape. Every field is safe to write; none can hold a body or secret.

    ``route`` is the route template (``/v2/models/{model}/infer``), or None when the request
    matched no route (refused before routing, or unknown path). ``model`` and ``version`` are
    what the client asked for, after ``safe_model``/``safe_version``. ``latency_ms`` covers the
    whole request, from the first middleware to the last byte handed to the server.
    """

    request_id: str
    principal: str
    method: str
    route: str | None
    model: str | None
    version: str | None
    status: int
    latency_ms: float
    rows: int | None
    input_digest: str | None
    bytes_in: int
    bytes_out: int
    client: str | None


_RECORD_FIELDS = tuple(f.name for f in fields(AccessRecord))
# Keys every access line has, none of them a secret: skipped without a lookup.
_KNOWN_SAFE = frozenset([*_RECORD_FIELDS, "event", "level", "log_level", "timestamp"])


class AccessLog:
    """Writes each ``AccessRecord`` as one JSON line to ``stream`` (stdout by default).

    Records written on a running event loop are kept, and rendered and written together at
    most ``delay_s`` later (or as soon as ``max_pending`` wait): per request that costs one
    list append instead of rendering a line and making a system call, which on the infer
    path cost more than the inference. A record written where no loop runs (a worker thread,
    a test) goes out at once, with anything still waiting. Output is written and flushed in
    chunks of whole lines of at most ``PIPE_BUF`` bytes under a lock, so lines from threads of
    one process never interleave, and lines from several worker processes sharing a pipe do
    not either (Linux writes up to 4 KiB to a pipe atomically; access lines are a few hundred
    bytes). ``flush`` writes whatever waits; the app calls it when it stops. A worker killed
    with SIGKILL loses the lines of its last ``delay_s``.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        delay_s: float = 0.05,
        max_pending: int = 256,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._delay_s = delay_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[tuple[float, AccessRecord]] = []
        self._scheduled = False
        self._last_loop: tuple[int | None, asyncio.AbstractEventLoop | None] = (None, None)
        # The timestamp's text up to the second, remade once a second.
        self._second: tuple[int, str] = (-1, "")

    def write(self, record: AccessRecord) -> None:
        entry = (time.time(), record)
        loop = self._running_loop()
        with self._lock:
            self._pending.append(entry)
            if loop is None or len(self._pending) >= self._max_pending:
                self._write_pending()
            elif not self._scheduled:
                self._scheduled = True
                loop.call_later(self._delay_s, self.flush)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        # asyncio.get_running_loop() makes a getpid() system call each time; the loop of the
        # thread that wrote last is remembered and checked with cheaper calls.
        thread = threading.get_ident()
        known_thread, loop = self._last_loop  # one read: a pair written together
        if thread == known_thread and loop is not None and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._last_loop = (thread, loop)
        return loop

    def flush(self) -> None:
        """Write the lines still waiting."""
        with self._lock:
            self._scheduled = False
            self._write_pending()

    def _write_pending(self) -> None:
        # Called holding the lock: render what waits, write it in whole-line chunks.
        if not self._pending:
            return
        chunks: list[list[bytes]] = [[]]
        size = 0
        for when, record in self._pending:
            line = self._render(when, record)
            if size + len(line) > _ATOMIC_WRITE and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line)
        self._pending.clear()
        for chunk in chunks:
            self._stream.write(b"".join(chunk).decode())
            self._stream.flush()

    def _render(self, when: float, record: AccessRecord) -> bytes:
        return orjson.dumps(
            {
                "event": ACCESS_EVENT,
                "level": "info",
                "timestamp": self._timestamp(when),
                "request_id": record.request_id,
                "principal": record.principal,
                "method": record.method,
                "route": record.route,
                "model": record.model,
                "version": record.version,
                "status": record.status,
                "latency_ms": record.latency_ms,
                "rows": record.rows,
                "input_digest": record.input_digest,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "client": record.client,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )

    def _timestamp(self, when: float) -> str:
        """ISO 8601 in UTC with microseconds, as structlog's TimeStamper writes it."""
        second = int(when)
        known, text = self._second
        if second != known:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int((when - second) * 1_000_000):06d}Z"


_REQUEST_ID: ContextVar[str | None] = ContextVar("modelkeep_request_id", default=None)

# Linux's PIPE_BUF: a write of at most this many bytes to a pipe is never split.
_ATOMIC_WRITE = 4096


class _RequestIds:
    """Request ids without a system call: a keyed BLAKE2b of a counter.

    Unique (the counter never repeats within a process; the 256-bit key is fresh in every
    process, a forked child included) and unpredictable to anyone without the key, like the
    OS CSPRNG, but without its ``getrandom`` call on every request, which in containers (where
    seccomp filters every system call) cost several microseconds.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._key = os.urandom(32)
        self._counter = itertools.count()

    def new(self) -> str:
        number = next(self._counter)  # atomic under the GIL
        return hashlib.blake2b(
            number.to_bytes(8, "little"), key=self._key, digest_size=16
        ).hexdigest()


_request_ids = _RequestIds()


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex characters, unique and unguessable."""
    return _request_ids.new()


def input_digest(body: bytes) -> str:
    """The first 16 hex characters of SHA-256(body): a correlator for identical inputs.

    It lets an operator see that two requests sent the same bytes without logging them. It is not
    a secret: an input drawn from a small set (one categorical feature, say) can be recovered by
    hashing every candidate, so it must not be published beyond the operators who see the log.
    """
    return hashlib.sha256(body).hexdigest()[:16]


def safe_model(value: object) -> str | None:
    """``value`` if it has the shape of a model name, ``"?"`` otherwise, None when absent.

    Model names come from the URL, i.e. from the client: anything else may be a mistake that
    carries a secret, or an attempt to forge log lines.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return "?"
    return value if _model_shaped(value) else "?"


# Two regexes cost more than the rest of a line; the names in use recur, so the verdicts are
# remembered (for a bounded number of distinct names).
@functools.lru_cache(maxsize=4096)
def _model_shaped(value: str) -> bool:
    return NAME_PATTERN.fullmatch(value) is not None and not _TOKEN_SHAPE.search(value)


def safe_version(value: object) -> str | None:
    """``value`` as text if it is a version number (1-9 digits), else ``"?"``; None if absent."""
    if value is None:
        return None
    if type(value) is int:  # the version served: no regex needed
        return str(value) if 0 <= value <= _MAX_VERSION else "?"
    text = value
    if not isinstance(text, str) or _VERSION.fullmatch(text) is None:
        return "?"
    return text


def safe_input_digest(value: object) -> str | None:
    """``value`` if it is exactly 16 lowercase hex characters (what ``input_digest`` makes)."""
    if isinstance(value, str) and _INPUT_DIGEST.fullmatch(value) is not None:
        return value
    return None


def drop_secret_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: remove every key named like a credential or a body, wherever it came from."""
    for key in [k for k in event_dict if k not in _KNOWN_SAFE and _is_secret_key(k)]:
        del event_dict[key]
    return event_dict


# The regex costs microseconds per key and a log line has a dozen keys that recur on every
# line: the verdicts are remembered (for a bounded number of distinct keys).
@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    return key not in _ALLOWED_KEYS and _SECRET_KEYS.fullmatch(key) is not None


def _json_line(event_dict: EventDict, **_kwargs: Any) -> str:
    # orjson: several times faster than json.dumps on the request path; anything it cannot
    # serialize is written as its str() rather than failing the line.
    return orjson.dumps(event_dict, default=str).decode()


def processors() -> list[Processor]:
    """The access log's pipeline, without the renderer: context, level, time, redaction."""
    return [
        structlog.contextvars.merge_contextvars,
        add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_secret_keys,
    ]


def configure_access_log(
    stream: TextIO | None = None, *, level: int = logging.INFO, cache: bool = False
) -> None:
    """Configure structlog, process-wide, to write each event as one JSON line to ``stream``.

    These are the lines written while requests run (alerts, for instance), beside the access
    lines that ``AccessLog`` writes to the same stream. ``stream`` defaults to stdout; lines
    are written and flushed one at a time, as ``AccessLog`` does. Call once at start-up, before
    serving; calling again replaces the configuration (tests pass their own stream).
    ``cache`` (the server) binds loggers once instead of on every event, which saves several
    microseconds a line; a cached logger does not follow a later reconfiguration.
    """
    structlog.configure(
        processors=[*processors(), structlog.processors.JSONRenderer(serializer=_json_line)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        # Tests leave it off: they reconfigure with their own stream, and capture_logs must
        # see events.
        cache_logger_on_first_use=cache,
    )


def bind_request(request_id: str) -> Token[str | None]:
    """Make ``request_id`` the current request's id; returns the token for ``reset_request``.

    One ``ContextVar`` rather than structlog's ``bind_contextvars``, which costs several times
    as much on every request; the ``add_request_id`` processor puts it on structlog's lines.
    Under ASGI each request runs in its own task with its own copy of the context, so nothing
    leaks between concurrent requests, and worker threads started for the request inherit it.
    """
    return _REQUEST_ID.set(request_id)


def reset_request(token: Token[str | None]) -> None:
    """Undo ``bind_request``."""
    _REQUEST_ID.reset(token)


def current_request_id() -> str | None:
    """The id of the request being served, if any."""
    return _REQUEST_ID.get()


def add_request_id(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: the current request's id, on every line written while a request runs."""
    request_id = _REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict
