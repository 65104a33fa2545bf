"""Running one inference call: the bounded queue, inline or threaded execution, the timeout.

Part of the data plane (``dataplane.py``), so that every protocol is queued and shed the same way.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from modelkeep.audit.metrics import Metrics
from modelkeep.errors import Unavailable
from modelkeep.settings import Settings

# A model whose calls take longer than this runs in the thread pool, not on the event loop.
INLINE_BUDGET_S = 0.002
# Bounds the per-model cost table (model names in the path come from clients).
_MAX_TRACKED = 10_000

T = TypeVar("T")


class InferRunner:
    """Per worker: at most ``max_queue`` infer calls waiting or running, the rest shed (503).

    Small requests to fast models run inline on the event loop: a thread hand-off costs more
    than a small model's inference (bench/README.md) and, with many threads contending for the
    GIL, makes the tail latency much worse. Everything else runs in the thread pool under the
    timeout: large requests, models whose recent calls took longer than ``INLINE_BUDGET_S``
    (inline they would hold the loop, and requests would queue in the kernel, unbounded and
    unshed, instead of here), and any request whose admission talks to Redis.

    Calls that are slow or large run at most ``inference_threads`` at a time (default one per
    CPU); the rest wait in the queue. Running more at once would only share the same cores,
    slowing every call and the event loop with them, so that overload would be noticed and
    shed late. Calls in a thread only because admission talks to Redis are not limited so:
    they mostly wait on the network.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.in_flight = 0
        self.max_queue = settings.max_queue
        self.timeout = settings.inference_timeout_s
        # Bodies larger than this are heavy: a thread, and a compute slot.
        self.heavy_bytes = settings.inline_max_bytes
        # Bodies up to this run inline; none when admission talks to Redis.
        self.inline_max_bytes = self.heavy_bytes if settings.limits_storage == "memory://" else -1
        # Per model: a moving average of how long a call took, in seconds.
        self._cost: dict[str, float] = {}
        self.compute_threads = settings.inference_threads or usable_cpus()
        self._compute = anyio.CapacityLimiter(self.compute_threads)

    async def run(self, model: str, size: int, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` for a request of ``size`` bytes to ``model``, queued.

        (Positional arguments only: a ``**kwargs`` dict per request costs for nothing.)
        """
        metrics = self.metrics
        if self.in_flight >= self.max_queue:
            metrics.shed(model=model)
            raise Unavailable("the server is overloaded; retry shortly", retry_after=1)
        self.in_flight += 1
        heavy = size > self.heavy_bytes or (self._cost.get(model, 0.0) >= INLINE_BUDGET_S)
        inline = not heavy and size <= self.inline_max_bytes
        try:
            if inline:
                # Runs to the end without yielding the loop, so nothing (a /metrics scrape
                # included) can see the queue in between: the gauge need not move.
                return self._timed(model, call, *args)
            metrics.set_queue_depth(self.in_flight)
            timed = functools.partial(self._timed, model, call, *args)
            with anyio.fail_after(self.timeout):
                # Abandoned on timeout: the caller gets its 503 now, the thread finishes later
                # (and keeps its compute slot until then).
                return await anyio.to_thread.run_sync(
                    timed, abandon_on_cancel=True, limiter=self._compute if heavy else None
                )
        except TimeoutError:
            raise Unavailable("inference timed out", retry_after=1) from None
        finally:
            self.in_flight -= 1
            if not inline:
                metrics.set_queue_depth(self.in_flight)

    def _timed(self, model: str, call: Callable[..., T], *args: Any) -> T:
        """The call, its duration (not its wait in the queue) added to the model's cost."""
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            elapsed = time.perf_counter() - started
            if len(self._cost) < _MAX_TRACKED or model in self._cost:
                self._cost[model] = 0.8 * self._cost.get(model, elapsed) + 0.2 * elapsed


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
