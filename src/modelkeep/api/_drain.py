"""SIGTERM drains a server process instead of stopping it at once.

Kubernetes sends SIGTERM when a pod is to go away, and keeps routing to it until the endpoint
update has reached every node. So, on SIGTERM:

1. readiness (``/v2/health/ready``) answers 503 at once, so the pod leaves the Service, and
   every response carries ``Connection: close`` from then on, so keep-alive clients open their
   next connection elsewhere (``_connections.drain``);
2. requests are still accepted and served for ``shutdown_delay_s`` while that spreads;
3. then uvicorn's own shutdown runs: the listening socket closes, requests in flight get
   ``shutdown_grace_s`` to finish, connections close after their response or when idle for
   the keep-alive timeout (never while a request may be on its way, ``_connections``), and the
   app's lifespan ends (access log flushed, audit ``server.stop`` entry and checkpoint
   written).

uvicorn installs its SIGTERM handler before the lifespan starts; ``install`` puts this one in
front of it and calls it after the delay. uvicorn then raises SIGTERM again once it has
stopped, which ``api.server.run_server`` turns into a clean exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from modelkeep.service import Service

from ._connections import drain

log = logging.getLogger(__name__)

__all__ = ["install"]


def install(service: Service, delay_s: float) -> None:
    """Drain ``service`` on SIGTERM, then hand the signal to the server's own handler.

    Does nothing outside the main thread (signals go to the main thread only) or when the
    server installed no handler of its own (nothing would ever stop the process).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    stop: Any = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return
    loop = asyncio.get_running_loop()
    stop_server: Callable[[int, FrameType | None], Any] = stop

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if service.draining:
            stop_server(sig, frame)  # a second SIGTERM: stop now
            return
        service.drain()
        drain()
        log.info("SIGTERM: not ready; stopping in %.1f s", delay_s)
        # The handler runs on the loop's thread; call_soon_threadsafe also wakes the loop.
        loop.call_soon_threadsafe(loop.call_later, delay_s, stop_server, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
