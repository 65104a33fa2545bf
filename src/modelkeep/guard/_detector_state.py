"""Where extraction detectors keep each client's history, and what they report.

A detector's memory is a few float arrays per client, behind :class:`DetectorState`. The
in-process :class:`InMemoryDetectorState` is the embedded default; a shared store (Redis) only
has to implement the same three methods for every replica to see one history per client.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelkeep.errors import ConfigError

__all__ = ["DetectionResult", "DetectorState", "InMemoryDetectorState"]


@dataclass(frozen=True, slots=True)
class DetectionResult:
    """One detector's verdict on a client after its latest queries.

    ``score`` is the detector's statistic (PRADA: the Shapiro-Wilk W of the client's distances;
    OOD: the share of recent queries far from the training data), ``None`` until ``samples``
    reaches the detector's minimum; ``alarm`` is never raised before that.
    """

    alarm: bool
    score: float | None
    samples: int


class DetectorState(Protocol):
    """Per-client storage of float arrays under short string keys.

    Keys are namespaced by each detector (``prada/...``, ``ood/...``) so one store can serve
    several. Values put are never modified afterwards by the detectors, and values got must
    not be modified by the caller either.
    """

    def get(self, client: str, key: str) -> np.ndarray | None:
        """The array last put under ``(client, key)``, or ``None``."""
        ...

    def put(self, client: str, key: str, value: np.ndarray) -> None:
        """Store ``value`` under ``(client, key)``, replacing any previous value."""
        ...

    def clear(self, client: str, prefix: str = "") -> None:
        """Forget every key of ``client`` that starts with ``prefix`` (all keys by default)."""
        ...


class InMemoryDetectorState:
    """A thread-safe in-process :class:`DetectorState` holding at most ``max_clients`` clients.

    Past that, the client seen least recently is forgotten: memory stays bounded however many
    identities call, at the cost of restarting detection for a client idle for that long.
    """

    def __init__(self, *, max_clients: int = 100_000) -> None:
        if type(max_clients) is not int or max_clients < 1:
            raise ConfigError("max_clients must be a positive integer")
        self._max_clients = max_clients
        self._clients: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, client: str, key: str) -> np.ndarray | None:
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                return None
            self._clients.move_to_end(client)
            return entries.get(key)

    def put(self, client: str, key: str, value: np.ndarray) -> None:
        stored = np.array(value, dtype=np.float64, copy=True)
        stored.setflags(write=False)
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                entries = self._clients[client] = {}
                while len(self._clients) > self._max_clients:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(client)
            entries[key] = stored

    def clear(self, client: str, prefix: str = "") -> None:
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                return
            for key in [key for key in entries if key.startswith(prefix)]:
                del entries[key]
            if not entries:
                del self._clients[client]

    def clients(self) -> int:
        """How many clients have state (for tests and metrics)."""
        with self._lock:
            return len(self._clients)

    def size(self, client: str) -> int:
        """How many float values ``client`` holds across all keys (bounded by the detectors)."""
        with self._lock:
            entries = self._clients.get(client, {})
            return sum(int(value.size) for value in entries.values())
