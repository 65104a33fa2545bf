"""How failures reach the person or script running ``modelkeep``: one line, one exit code.

The table below is the only place that relates HTTP status, error class and exit code. The
client turns an error answer into the matching ``ModelkeepError``; the command line turns any
``ModelkeepError`` (from the server or raised locally) into ``error: <message>`` on stderr and the
exit code of its ``code``.
"""

from __future__ import annotations

import socket
import ssl
from typing import NamedTuple

import httpx

from modelkeep.errors import (
    Conflict,
    Forbidden,
    InternalError,
    InvalidInput,
    ModelkeepError,
    ModelRefused,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

#: Any failure not in the table: bad request, server error, connection trouble, bad settings.
EXIT_FAILURE = 1
#: Typer's own code for a malformed command line.
EXIT_USAGE = 2


class _Row(NamedTuple):
    status: int
    error: type[ModelkeepError]
    exit_code: int
    meaning: str


ERROR_TABLE: tuple[_Row, ...] = (
    _Row(400, InvalidInput, EXIT_FAILURE, "malformed request"),
    _Row(401, Unauthenticated, 3, "no valid API key (missing, unknown, expired or revoked)"),
    _Row(403, Forbidden, 4, "the key's role does not allow this"),
    _Row(404, NotFound, 5, "no such model, version, label or key"),
    _Row(409, Conflict, 6, "conflict"),
    _Row(413, TooLarge, 7, "too large"),
    _Row(422, ModelRefused, 8, "model refused (not ONNX, external data, custom operators...)"),
    _Row(429, RateLimited, 9, "rate limited"),
    _Row(500, InternalError, EXIT_FAILURE, "server error"),
    _Row(503, Unavailable, EXIT_FAILURE, "server unavailable"),
)

_ERROR_BY_STATUS = {row.status: row.error for row in ERROR_TABLE}
_EXIT_BY_CODE = {row.error.code: row.exit_code for row in ERROR_TABLE}


def exit_code_for(error: ModelkeepError) -> int:
    """The process exit code for ``error``, chosen by its neutral ``code`` alone."""
    return _EXIT_BY_CODE.get(error.code, EXIT_FAILURE)


#: What a command's own help says of exit codes; the table is in ``modelkeep --help`` only.
SEE_EXIT_CODES = "Exit codes: 0 on success; the others are listed once, in `modelkeep --help`."


def exit_codes_epilog() -> str:
    """The exit code table as help text, built from ``ERROR_TABLE`` so the two never disagree."""
    lines = [
        "0  success",
        "1  any other failure (server error, cannot connect...)",
        "2  usage error",
    ]
    lines += [
        f"{row.exit_code}  {row.meaning} (HTTP {row.status})"
        for row in ERROR_TABLE
        if row.exit_code != EXIT_FAILURE
    ]
    return "Exit codes:\n\n" + "\n".join(lines)


def error_from_response(response: httpx.Response) -> ModelkeepError:
    """The ``ModelkeepError`` for an error answer, carrying the server's own ``error`` message."""
    message = _server_message(response)
    retry_after = _retry_after(response)
    error_class = _ERROR_BY_STATUS.get(response.status_code)
    if error_class is None:
        if 400 <= response.status_code < 500:
            error_class = InvalidInput
        elif response.status_code in (502, 504):
            error_class = Unavailable
        else:
            error_class = InternalError
    if retry_after is not None:
        message = f"{message} (retry after {retry_after:g} s)"
    return error_class(message, retry_after=retry_after)


def _server_message(response: httpx.Response) -> str:
    fallback = f"server answered HTTP {response.status_code} {response.reason_phrase}".rstrip()
    try:
        body = response.json()
    except ValueError:
        return fallback
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str) and error.strip():
            return error
    return fallback


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        # An HTTP date is allowed too; it is rare enough that the message alone will do.
        return None
    return seconds if seconds >= 0 else None


def transport_failure(url: str, exc: httpx.TransportError) -> ModelkeepError:
    """A human sentence for a request that never got an answer: refused, TLS, DNS, timeout."""
    if isinstance(exc, httpx.ConnectTimeout):
        return Unavailable(f"cannot connect to {url}: timed out")
    if isinstance(exc, httpx.ConnectError):
        return Unavailable(f"cannot connect to {url}: {_connect_reason(exc)}")
    if isinstance(exc, httpx.ReadTimeout):
        return Unavailable(f"no answer from {url}: timed out waiting for the server")
    if isinstance(exc, httpx.WriteTimeout):
        return Unavailable(f"sending to {url} timed out")
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(f"talking to {url} timed out")
    return Unavailable(f"connection to {url} failed: {_describe(exc)}")


def _connect_reason(exc: BaseException) -> str:
    # httpx wraps the socket and ssl errors; the original cause says what actually happened.
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or "certificate not trusted"
            return (
                f"TLS certificate verification failed ({detail}); pass the server's CA "
                "certificate with --cacert or MODELKEEP_CACERT"
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or 'unknown reason'})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(cause, socket.gaierror):
            return "unknown host name"
    return _describe(exc)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "TLS certificate verification failed; pass the server's CA certificate with "
            "--cacert or MODELKEEP_CACERT"
        )
    if "Connection refused" in text:
        return "connection refused (is the server running?)"
    return text or type(exc).__name__
