"""Limits on connections that nobody has authenticated yet, enforced as bytes arrive.

uvicorn's httptools protocol has none of them: its ``h11_max_incomplete_event_size`` applies
only to h11, its one timeout is keep-alive after a response, and httptools gathers a header
field whole before handing it over, so a 128 MB header was read into memory in full before the
401. ``LimitedHttpToolsProtocol`` adds them to that protocol, in this order:

1. Connections: past ``max_connections`` open in this worker, or ``max_connections_per_client``
   from one address, a new connection gets 503 and is closed at once.
2. Idle: a connection with no request started is closed after the keep-alive timeout, the
   first wait included (uvicorn times only the wait after a response).
3. Head size: bytes are fed to the parser only while the request line and headers are within
   ``max_header_bytes``; a head not complete by then gets 431 and the connection is closed,
   so no more than the cap is ever buffered (for a request pipelined behind another in the
   same network read, at most that read more).
4. Header count: the field after ``max_headers`` stops the parse: 431 and close.
5. Head time: a head not complete ``header_timeout_s`` after its first byte gets 408.
6. Body rate: while a body is being read, each window of ``body_timeout_s`` must bring at
   least ``body_min_rate`` bytes per second, unless the server itself paused reading or is
   yet to send ``100 Continue``; a slower body gets 408 (or, once a response has started, a
   plain close).

A response sent before its request's body arrived (a 401 to a push without a key, a 413)
leaves the connection reading the rest of the body as uvicorn does, discarded as it arrives
and still under the body rate: clients send their whole body before they read, and cutting
the connection would turn their 401 into a reset.

Shutting down (``drain``, on SIGTERM) ends connections only where that cannot race a request
the client is sending. From then on every response carries ``Connection: close``, and the
connection closes once it is sent, as the client expects. uvicorn's own shutdown closes every
connection between requests, so a client that had just sent its next request on a keep-alive
connection, or its first on a connection just made, found it closed without an answer; here
such a connection is left to the idle timeout (keep-alive) or to its next request's
``Connection: close``, and uvicorn waits for it within the grace period.

A connection given up on stops reading at once and is cut ``linger_s`` after its answer
(``_end``), so a refused client neither gets more read nor holds the socket.

The TLS handshake ends before a protocol sees its connection, so its timeout is the event
loop's (``new_event_loop``). Timers cost nothing on the usual path: one is armed only when a
network read ends with a head or a body still incomplete (so a request that arrives in one
read never arms one), it checks the state it finds when it fires, and it is dropped when its
request has arrived.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import httptools
import uvloop
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from modelkeep.settings import Settings

from ._transport import CoalescingHttpToolsProtocol

# What the protocol is reading. IDLE: between requests; HEAD: a request line and headers;
# BODY: a body; CLOSED: nothing more (answered or gone).
IDLE, HEAD, BODY, CLOSED = range(4)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits of one worker's connections; the defaults and reasons are on Settings."""

    max_header_bytes: int
    max_headers: int
    max_connections: int
    max_connections_per_client: int
    tls_handshake_timeout_s: float
    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@functools.cache
def current_limits() -> ConnectionLimits:
    """This worker's limits, from the MODELKEEP_* environment: uvicorn builds the loop and the
    protocols itself, in each worker process, and passes them nothing of ours."""
    return ConnectionLimits.from_settings(Settings())


class LimitedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol (with coalesced writes) under ``ConnectionLimits``."""

    linger_s = 1.0  # how long a refused client has to read the answer before the cut
    # The worker is shutting down: responses end their connection (``drain``). One flag for
    # the process, read once per request.
    draining: ClassVar[bool] = False

    def __init__(self, *args: Any, limits: ConnectionLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or current_limits()
        self._phase = IDLE
        self._head_room = self.limits.max_header_bytes  # head bytes the parser may still take
        self._too_many_headers = False
        self._body_bytes = 0  # counted from the reads that follow the head
        self._paused = False  # reading was paused during the current body window
        self._window_bytes = 0  # body bytes when the current window began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase = IDLE  # what the timer was armed for

    # 1. and 2. Connections, and the first idle wait.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self._over_connection_limit()
        if refusal is not None:
            self._answer_and_close(503, refusal, (b"retry-after", b"1"))
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _over_connection_limit(self) -> str | None:
        connections: set[Any] = self.connections  # this one included
        if len(connections) > self.limits.max_connections:
            return "the server has too many connections; retry shortly"
        per_client = self.limits.max_connections_per_client
        if self.client is not None and len(connections) > per_client:
            host = self.client[0]
            same = sum(1 for c in connections if c.client is not None and c.client[0] == host)
            if same > per_client:
                return "too many connections from this address; retry shortly"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    # 3. Head size: replaces uvicorn's data_received, which feeds the parser everything.
    def data_received(self, data: bytes) -> None:
        if self._phase == CLOSED:
            return
        self._unset_keepalive_if_required()
        if self._phase == BODY:
            self._body_bytes += len(data)
            self._feed(data)
            if self.flow.read_paused:
                self._paused = True
        elif len(data) < self._head_room:
            self._head_room -= len(data)
            self._feed(data)
        else:
            self._feed_capped(data)
        if self._phase == IDLE and self._head_room < self.limits.max_header_bytes:
            self._phase = HEAD  # a head has begun and is not complete
        if self._timer is None and self._phase in (HEAD, BODY):
            self._arm()

    def _feed_capped(self, data: bytes) -> None:
        """Feed ``data`` a head's remaining room at a time; 431 once a head fills it."""
        while data and self._phase != CLOSED:
            if self._phase == BODY:
                part, data = data, b""
            else:
                part, data = data[: self._head_room], data[self._head_room :]
                self._head_room -= len(part)
            self._feed(part)
            if self._head_room == 0 and self._phase in (IDLE, HEAD):
                # The cap is reached and the head is not complete: read nothing more.
                self._answer_and_close(431, "the request headers are too large")

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._too_many_headers:
                self._answer_and_close(431, "the request has too many header fields")
            else:
                self.logger.warning("Invalid HTTP request received.")
                self._phase = CLOSED
                self.send_400_response("Invalid HTTP request received.")

    # Parser callbacks: each keeps uvicorn's and notes where the request is.
    def on_header(self, name: bytes, value: bytes) -> None:
        # 4. Header count. Raising stops the parser; _feed answers 431.
        if len(self.headers) >= self.limits.max_headers:
            self._too_many_headers = True
            raise OverflowError("too many header fields")
        # uvicorn's on_header, inline: this runs for every header of every request.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = BODY
        self._body_bytes = 0
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown of this connection, without its race.

        uvicorn closes a connection between requests at once; but its client may have just
        sent a request on it, which would then be lost. Here a request being served gets
        ``Connection: close`` (as in uvicorn), and so does the next one on an idle connection;
        one that stays idle is closed by the keep-alive timeout, as at any other time.
        """
        drain()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._phase = IDLE
        self._head_room = self.limits.max_header_bytes
        if self._timer is not None:  # it timed this request: the next one starts afresh
            self._timer.cancel()
            self._timer = None
        super().on_message_complete()

    # 5. and 6. Head time and body rate. Armed at the end of the read that began the head, so
    # the head's deadline counts from its first byte.
    def _arm(self) -> None:
        if self._phase == HEAD:
            delay = self.limits.header_timeout_s
        else:
            self._window_bytes, self._paused = self._body_bytes, self.flow.read_paused
            delay = self.limits.body_timeout_s
        self._timer_phase = self._phase
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase not in (HEAD, BODY):
            return
        if self._phase != self._timer_phase:
            self._arm()  # the head is complete: time the body from now
        elif self._phase == HEAD:
            self._answer_and_close(408, "the request headers did not arrive in time")
        elif self._body_progressing():
            self._arm()  # a new window
        else:
            self._answer_and_close(408, "the request body is arriving too slowly")

    def _body_progressing(self) -> bool:
        if self._paused or self.flow.read_paused:
            return True  # the server held the client back
        cycle = self.cycle
        if cycle is not None and cycle.waiting_for_100_continue:
            return True  # the client waits for the app to ask for the body
        needed = self.limits.body_min_rate * self.limits.body_timeout_s
        return self._body_bytes - self._window_bytes >= needed

    # Ending a connection the protocol gives up on.
    def _answer_and_close(self, status: int, message: str, *extra: tuple[bytes, bytes]) -> None:
        """Answer ``status`` if the request it is about has no response yet, and end.

        While a body is read, ``cycle`` is that request's; otherwise it is the previous one's,
        which must have ended for an answer not to interleave with it. A request still in the
        app is told the client went away, so whatever it sends afterwards is dropped.
        """
        cycle = self.cycle
        if self._phase == BODY:
            answer = not cycle.response_started
        else:
            answer = cycle is None or cycle.response_complete
        if answer:
            self.transport.write(self._answer(status, message, extra))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._end()

    def _end(self) -> None:
        """Read nothing more, and cut the connection ``linger_s`` later.

        Not ``close()``: a TLS close goes on reading, and discarding, what the client sends
        until its close_notify comes or the TLS timeout passes, so a client streaming a
        128 MB header would still have it all read. Paused, the connection takes in at most
        the TLS layer's read buffer more; the wait gives the client time to read the answer
        before the reset that closing a socket with unread data sends.
        """
        self._phase = CLOSED
        self._unset_keepalive_if_required()
        if self._timer is not None:
            self._timer.cancel()
        self.transport.pause_reading()
        self._timer = self.loop.call_later(self.linger_s, self.transport.abort)

    def _answer(self, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...]) -> bytes:
        body = json.dumps({"error": message}).encode()
        headers = [*self.server_state.default_headers, *extra]  # date and security headers
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        lines = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        return STATUS_LINE[status] + lines + b"\r\n" + body


def drain() -> None:
    """From now on, every response of this worker carries ``Connection: close``: clients open
    their next connection elsewhere (on SIGTERM, api/_drain.py; and at uvicorn's shutdown)."""
    LimitedHttpToolsProtocol.draining = True


class TlsTimeoutLoop(uvloop.Loop):
    """uvloop, with a TLS handshake and shutdown timeout for every server it creates.

    uvicorn calls ``create_server`` without them, so asyncio's defaults applied: 60 s for a
    handshake and 30 s for the peer's close_notify.
    """

    def __init__(self, tls_timeout_s: float) -> None:
        super().__init__()
        self.tls_timeout_s = tls_timeout_s

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.tls_timeout_s)
            kwargs.setdefault("ssl_shutdown_timeout", self.tls_timeout_s)
        return await super().create_server(*args, **kwargs)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """For uvicorn's ``loop`` setting (an import string; each worker calls it for its loop)."""
    return TlsTimeoutLoop(current_limits().tls_handshake_timeout_s)
