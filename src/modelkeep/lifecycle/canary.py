"""Canary and shadow traffic: who is routed where, what is compared, when a canary is withdrawn.

Pure functions and small records; the service (``service/canary.py``) keeps the state and acts.

- A caller is in a canary when ``bucket(key, model, label, canary id) < share``: a stable hash,
  so a caller sees one version for the whole canary, and over many callers the canary's share
  of them is ``share`` percent (binomially close).
- Two versions agree on a row when their top-1 answers are equal: the arg-max of the first
  output when it is a float matrix of class scores, else the output's value itself.
- A canary is withdrawn when, over the last ``window_s`` seconds and after ``min_requests``
  requests to it, its error rate, its 99th latency percentile or its agreement with the primary
  crosses a threshold set with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from modelkeep.errors import InvalidInput

__all__ = ["Thresholds", "WindowStats", "agreement", "bucket", "check_share", "crossed", "top1"]

_MAX_WINDOW_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a canary is withdrawn; ``None`` thresholds are not checked."""

    max_error_rate: float | None = None  # share of its requests that failed, 0..1
    max_p99_ms: float | None = None  # 99th percentile latency of its runs, milliseconds
    min_agreement: float | None = None  # share of compared rows where it agrees, 0..1
    min_requests: int = 20  # requests to the canary in the window before it is judged
    window_s: float = 300.0  # the sliding window judged, seconds

    def __post_init__(self) -> None:
        for name in ("max_error_rate", "min_agreement"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and 0.0 <= value <= 1.0):
                raise InvalidInput(f"{name.replace('_', '-')} must be between 0 and 1")
        if self.max_p99_ms is not None and not (_finite(self.max_p99_ms) and self.max_p99_ms > 0):
            raise InvalidInput("max-p99-ms must be a positive number of milliseconds")
        if isinstance(self.min_requests, bool) or not 1 <= self.min_requests <= 1_000_000:
            raise InvalidInput("min-requests must be between 1 and 1000000")
        if not (_finite(self.window_s) and 1.0 <= self.window_s <= _MAX_WINDOW_S):
            raise InvalidInput(f"window must be between 1 and {int(_MAX_WINDOW_S)} seconds")

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Thresholds:
        return cls(**json.loads(text))


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_share(share: float, what: str) -> float:
    """``share`` if it is a percentage in (0, 100], else InvalidInput."""
    if not (_finite(share) and 0.0 < share <= 100.0):
        raise InvalidInput(f"{what} must be a percentage above 0 and at most 100")
    return float(share)


def bucket(key_id: str, model: str, label: str, canary_id: str) -> float:
    """Where a caller falls in [0, 100) for one canary: the same every time (sticky), and
    independent between canaries (a new canary draws its callers afresh)."""
    digest = hashlib.sha256(f"{canary_id}\0{model}\0{label}\0{key_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def top1(outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Each row's top-1 answer, from the first output; None when there is none to compare."""
    for value in outputs.values():
        array = np.asarray(value)
        if array.ndim == 0:
            return array.reshape(1)
        if array.ndim >= 2 and array.dtype.kind == "f" and array.shape[-1] > 1:
            found: np.ndarray = np.argmax(array.reshape(array.shape[0], -1), axis=1)
            return found
        return array.reshape(array.shape[0], -1)[:, 0] if array.ndim >= 2 else array
    return None


def agreement(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(rows agreeing, rows compared)`` between two versions' outputs on the same inputs."""
    first, second = top1(a), top1(b)
    if first is None or second is None or first.shape != second.shape:
        return 0, 0
    return int(np.count_nonzero(first == second)), int(first.shape[0])


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One version's numbers over a window (or since the canary started)."""

    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    agreed: int  # rows where it agreed with the primary
    compared: int  # rows compared

    @property
    def error_rate(self) -> float | None:
        return None if self.requests == 0 else self.errors / self.requests

    @property
    def agreement(self) -> float | None:
        return None if self.compared == 0 else self.agreed / self.compared


def crossed(stats: WindowStats, thresholds: Thresholds) -> str | None:
    """Why a canary with ``stats`` over its window must be withdrawn, or None (also while it
    has fewer than ``min_requests`` requests: too few to judge)."""
    if stats.requests < thresholds.min_requests:
        return None
    rate, agreed, limits = stats.error_rate, stats.agreement, thresholds
    if limits.max_error_rate is not None and rate is not None and rate > limits.max_error_rate:
        return f"error rate {rate:.4f} above {limits.max_error_rate:.4f}"
    p99 = stats.p99_ms
    if limits.max_p99_ms is not None and p99 is not None and p99 > limits.max_p99_ms:
        return f"p99 latency {p99:.2f} ms above {limits.max_p99_ms:.2f} ms"
    if (
        limits.min_agreement is not None
        and agreed is not None
        and stats.compared >= limits.min_requests
        and agreed < limits.min_agreement
    ):
        return f"agreement {agreed:.4f} below {limits.min_agreement:.4f}"
    return None
