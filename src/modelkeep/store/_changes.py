"""Change notifications between processes: PostgreSQL LISTEN/NOTIFY over the polled counter.

Every write transaction bumps ``state.generation`` (see ``metadata.py``); on PostgreSQL it also
sends ``NOTIFY modelkeep_changes``, which the server delivers to every listening connection when
the transaction commits. Each worker of each replica keeps one listening connection and wakes its
refresh loop on a notification, so a revocation, label move, policy change or block reaches every
replica in milliseconds rather than at the next poll.

Polling the generation stays the fallback and the source of truth: a notification only says
"look now". A dropped connection, a missed notification or SQLite (which has no notifications)
delay a change to the next poll, never lose it. After a reconnect the listener wakes the loop
once, since changes may have been committed while it was not listening.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
import sqlalchemy as sa

log = logging.getLogger(__name__)

CHANNEL = "modelkeep_changes"
# The SQL each write transaction runs on PostgreSQL; delivered only if the transaction commits.
NOTIFY = sa.text(f"SELECT pg_notify('{CHANNEL}', '')")

_POLL_S = 0.5  # how often the listening thread looks at its stop flag
_RETRY_S = (0.5, 1.0, 2.0, 5.0)  # backoff between reconnects


def libpq_url(url: sa.URL) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as the plain libpq URL psycopg connects to."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """A thread that calls ``on_change`` whenever any process commits a metadata change."""

    def __init__(self, conninfo: str, on_change: Callable[[], None]) -> None:
        self._conninfo = conninfo
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="modelkeep-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    failures = 0
                    # Anything committed while this connection was not yet listening.
                    self._on_change()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=_POLL_S, stop_after=1):
                            self._on_change()
            except psycopg.Error as exc:
                self.listening.clear()
                delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                failures += 1
                # The error's class only: a message may carry the connection string.
                log.warning(
                    "change notifications unavailable (%s); polling meanwhile, retrying in %.1fs",
                    type(exc).__name__,
                    delay,
                )
                self._stop.wait(delay)
        self.listening.clear()
