"""Which back ends a replica uses and whether each answers: a metric, and part of readiness.

A thread per worker asks each back end a cheap question every few seconds, off the request path
and off the refresh loop (a hanging back end must not delay a revocation):

- database: the change counter (one indexed row);
- limits: a PING when counters are in Redis (always up in memory);
- blobs: the first name in the store (one LIST of one page on S3);
- keys: the key service's current key (a key read on OpenBao, DescribeKey on KMS).

``modelkeep_backend_up{backend, kind}`` is 1 or 0. A replica is ready only while the database
and the limits storage answer: without them it can neither see revocations nor admit a request.
The blob store and the key service are needed only to load a model, so while they are down a
replica keeps serving what it has loaded (fail closed for new loads, DESIGN §9).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from modelkeep.errors import ModelkeepError

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 5.0
# The back ends a request cannot be served without.
REQUIRED = ("database", "limits")


@dataclass(frozen=True)
class Backend:
    name: str  # database, limits, blobs, keys
    kind: str  # sqlite, postgresql, memory, redis, file, s3, local, openbao, awskms
    probe: Callable[[], object]


class BackendProbe:
    """Probes every back end now and then every ``interval_s``; ``up`` holds the last answers."""

    def __init__(
        self,
        backends: list[Backend],
        report: Callable[[str, str, bool], None],
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.backends = backends
        self._report = report
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Optimistic until the first probe: the service has just opened the database.
        self.up: dict[str, bool] = {backend.name: True for backend in backends}

    def probe_all(self) -> None:
        for backend in self.backends:
            try:
                backend.probe()
                answered = True
            except ModelkeepError as exc:
                answered = False
                log.warning(
                    "back end %s (%s) is unreachable: %s", backend.name, backend.kind, exc.message
                )
            except Exception:  # any failure of a foreign client means "not answering"
                answered = False
                log.warning("back end %s (%s) is unreachable", backend.name, backend.kind)
            self.up[backend.name] = answered
            self._report(backend.name, backend.kind, answered)

    def required_up(self) -> bool:
        return all(self.up.get(name, True) for name in REQUIRED)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="modelkeep-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self.probe_all()
            if self._stop.wait(self._interval_s):
                return
