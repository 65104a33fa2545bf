"""Detector feeding off the request path: a bounded queue drained in batches by one thread.

In ``log`` and ``alert`` mode a detector's verdict never changes the answer being sent, so the
request only appends what the detectors need to a queue (a few hundred nanoseconds) and a daemon
thread feeds them. The thread waits ``linger`` seconds after the first pending item so that
several requests gather, then hands the whole queue to ``process`` at once: the gate feeds each
caller's rows of the batch to each detector in one call, which pays the detector's fixed cost
(state read and write, signature setup, locks) once per caller and batch instead of once per
request. An item waits at most ``linger`` plus the time to process the batch before it with a
full queue; the queue holds ``capacity`` items of at most ``max_cost`` total cost (the caller's
measure of an item's memory, tensor elements for the gate) and, when full, forgets its oldest
(counted, ``on_drop`` called) rather than ever blocking a request.

Hand-written rather than ``queue.Queue``: that one blocks or refuses when full, and we need
drop-oldest with a counter and a take-everything drain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["DeferredFeed"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class DeferredFeed(Generic[T]):
    """Items put by request threads, handed in batches (oldest first) to ``process``."""

    def __init__(
        self,
        process: Callable[[list[T]], None],
        *,
        capacity: int = 4096,
        max_cost: int = 1 << 22,
        linger: float = 0.1,
        chunk: int = 128,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._process = process
        # Items and their costs side by side: a (cost, item) pair per request would be one
        # more object for the garbage collector to track while it waits (see gate.py).
        self._items: deque[T] = deque()
        self._costs: deque[int] = deque()
        self._capacity = capacity
        self._max_cost = max_cost
        self._cost = 0
        self._linger = linger
        self._chunk = chunk
        self.on_drop = on_drop
        self.dropped = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._thread: threading.Thread | None = None

    def put(self, item: T, cost: int = 1) -> None:
        """Queue ``item`` (``cost`` at most ``max_cost``); never blocks. A full queue forgets its
        oldest items until this one fits."""
        dropped = 0
        with self._lock:
            while self._items and (
                len(self._items) >= self._capacity or self._cost + cost > self._max_cost
            ):
                self._items.popleft()
                self._cost -= self._costs.popleft()
                dropped += 1
            self.dropped += dropped
            self._items.append(item)
            self._costs.append(cost)
            self._cost += cost
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="modelkeep-detectors", daemon=True
                )
                self._thread.start()
            elif len(self._items) == 1:
                self._wake.notify_all()
        if self.on_drop is not None:
            for _ in range(dropped):
                self.on_drop()

    def pending(self) -> int:
        with self._lock:
            return len(self._items)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every item queued so far is processed; False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._items and not self._busy, timeout)

    def drain(self) -> None:
        """Process what is queued now, in the calling thread (tests, shutdown)."""
        batch = self._take()
        if batch:
            self._process(batch)

    def _process_slice(self, items: list[T]) -> None:
        try:
            self._process(items)
        except Exception:  # one bad batch must not stop detection for good
            log.exception("extraction detectors failed on a batch of %d requests", len(items))

    def _take(self) -> list[T]:
        with self._lock:
            batch = list(self._items)
            self._items.clear()
            self._costs.clear()
            self._cost = 0
        return batch

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._items))
                self._busy = True
            # Let a few more requests arrive: the batch is what makes feeding cheap.
            threading.Event().wait(self._linger)
            batch = self._take()
            try:
                for start in range(0, len(batch), self._chunk):
                    if start:
                        # Between slices the request thread gets the GIL back: a large batch
                        # must not hold up requests for more than one slice's worth.
                        time.sleep(0)
                    self._process_slice(batch[start : start + self._chunk])
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
