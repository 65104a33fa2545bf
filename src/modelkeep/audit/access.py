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

Request context travels through ``structlog.contextvars``: ``bind_request`` binds the request id
so that every structlog line written while the request runs carries it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from contextvars import Token
from dataclasses import dataclass, fields
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from modelkeep.registry.records import NAME_PATTERN

__all__ = [
    "ACCESS_EVENT",
    "AccessRecord",
    "bind_request",
    "configure_access_log",
    "drop_secret_keys",
    "input_digest",
    "log_access",
    "new_request_id",
    "reset_request",
    "safe_input_digest",
    "safe_model",
    "safe_version",
]

ACCESS_EVENT = "access"
LOGGER_NAME = "modelkeep.access"
_INPUT_DIGEST = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"[0-9]{1,9}")
# An API key pasted where a model name goes must not reach the log (see auth.apikeys).
_TOKEN_SHAPE = re.compile(r"mk_[a-z2-7]{12}_")
# Keys no log line may carry, whoever bound them: defence in depth behind AccessRecord.
_SECRET_KEYS = re.compile(
    r"(?i).*(authorization|token|secret|password|passwd|cookie|api[-_]?key|payload|body).*"
)
# "bytes_in", "bytes_out" and "input_digest" describe a body without holding it.
_ALLOWED_KEYS = frozenset({"bytes_in", "bytes_out", "input_digest"})

_log = structlog.get_logger(LOGGER_NAME)


@dataclass(frozen=True, slots=True)
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


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex characters (a uuid4), unguessable and unique."""
    return uuid.uuid4().hex


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
    if (
        not isinstance(value, str)
        or NAME_PATTERN.fullmatch(value) is None
        or _TOKEN_SHAPE.search(value)
    ):
        return "?"
    return value


def safe_version(value: object) -> str | None:
    """``value`` as text if it is a version number (1-9 digits), else ``"?"``; None if absent."""
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
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


def _is_secret_key(key: str) -> bool:
    # The regex costs microseconds per key and a log line has a dozen keys that recur on every
    # line: remember the verdicts (for a bounded number of distinct keys).
    verdict = _secret_key_verdicts.get(key)
    if verdict is None:
        verdict = key not in _ALLOWED_KEYS and _SECRET_KEYS.fullmatch(key) is not None
        if len(_secret_key_verdicts) < 4096:
            _secret_key_verdicts[key] = verdict
    return verdict


_secret_key_verdicts: dict[str, bool] = {}


def _json_line(event_dict: EventDict, **_kwargs: Any) -> str:
    # orjson: several times faster than json.dumps on the request path; anything it cannot
    # serialize is written as its str() rather than failing the line.
    return orjson.dumps(event_dict, default=str).decode()


def processors() -> list[Processor]:
    """The access log's pipeline, without the renderer: context, level, time, redaction."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_secret_keys,
    ]


def configure_access_log(
    stream: TextIO | None = None, *, level: int = logging.INFO, cache: bool = False
) -> None:
    """Configure structlog, process-wide, to write each event as one JSON line to ``stream``.

    ``stream`` defaults to stdout. Each line is written and flushed in one call under a lock, so
    lines from threads of one process never interleave; lines from several worker processes
    sharing stdout do not either, as long as a line stays under the pipe's atomic write size
    (4 KiB on Linux; access lines are a few hundred bytes). Call once at start-up, before
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


def log_access(record: AccessRecord) -> None:
    """Write ``record`` as one access-log event (``event == "access"``) through structlog."""
    _log.info(ACCESS_EVENT, **{name: getattr(record, name) for name in _RECORD_FIELDS})


def bind_request(request_id: str, **context: Any) -> Mapping[str, Token[Any]]:
    """Bind ``request_id`` (and ``context``) to the structlog context of the current request.

    Returns the tokens to pass to ``reset_request`` when the request ends. Under ASGI each
    request runs in its own task with its own copy of the context, so nothing leaks between
    concurrent requests; resetting keeps a reused task clean too.
    """
    return structlog.contextvars.bind_contextvars(request_id=request_id, **context)


def reset_request(tokens: Mapping[str, Token[Any]]) -> None:
    """Undo ``bind_request``."""
    structlog.contextvars.reset_contextvars(**tokens)
