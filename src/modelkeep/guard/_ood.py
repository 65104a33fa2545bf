"""Out-of-distribution monitoring: how many of a client's queries are far from the training data.

Synthetic extraction queries (Jacobian augmentation, noise, adversarial steps) drift away from
the data a model was trained on; natural traffic mostly does not. An :class:`OodReference` is
fitted once, when a version is pushed, on rows representative of the training data: their mean,
a shrunk covariance (Ledoit-Wolf) so the Mahalanobis distance is defined even for constant or
collinear features, and the distance that ``quantile`` of held-out reference rows stay under.
:class:`OodMonitor` then counts, per client, the share of its recent queries beyond that
distance. For very wide inputs the covariance would not fit in a policy record, so past
``_FULL_LIMIT`` features a per-feature (diagonal) scale is used instead.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.guard._detector_state import DetectionResult, DetectorState, InMemoryDetectorState

__all__ = ["OodMonitor", "OodReference"]

_FORMAT = "modelkeep.ood/1"
_PREFIX = "ood/"
_FLAGS = _PREFIX + "w"
_FULL_LIMIT = 512
_MAX_FEATURES = 1 << 20
_MIN_ROWS = 20

Covariance = Literal["auto", "full", "diagonal"]


@dataclass(frozen=True, eq=False, slots=True)
class OodReference:
    """What "in distribution" means for one model version; build it with :meth:`OodMonitor.fit`.

    ``kind`` is ``"mahalanobis"`` (``matrix`` is the d x d precision) or ``"diagonal"``
    (``matrix`` holds d inverse scales). ``threshold`` is the distance beyond which a query
    counts as out of distribution.
    """

    kind: Literal["mahalanobis", "diagonal"]
    mean: np.ndarray
    matrix: np.ndarray
    threshold: float
    quantile: float

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, x: np.ndarray) -> np.ndarray:
        """The distance of each row of ``x`` to the reference; ``inf`` for non-finite rows."""
        rows = _rows(x, self.features)
        with np.errstate(over="ignore", invalid="ignore"):
            result = _distances(self.kind, self.mean, self.matrix, rows)
        return np.where(np.isfinite(result), result, np.inf)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reads it back to identical distances."""
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "mean": self.mean.tolist(),
            "matrix": self.matrix.tolist(),
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OodReference:
        """Inverse of :meth:`to_json`; raises ``InvalidInput`` on anything it could not write."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise InvalidInput(f"an OOD reference must be an object with format {_FORMAT!r}")
        kind = data.get("kind")
        if kind not in ("mahalanobis", "diagonal"):
            raise InvalidInput("an OOD reference kind is 'mahalanobis' or 'diagonal'")
        mean = _float_array(data.get("mean"), "mean", 1)
        width = mean.shape[0]
        if not 1 <= width <= _MAX_FEATURES:
            raise InvalidInput("an OOD reference mean must have at least one feature")
        matrix = _float_array(data.get("matrix"), "matrix", 2 if kind == "mahalanobis" else 1)
        expected = (width, width) if kind == "mahalanobis" else (width,)
        if matrix.shape != expected:
            raise InvalidInput("an OOD reference matrix does not match its mean")
        threshold, quantile = data.get("threshold"), data.get("quantile")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise InvalidInput("an OOD reference threshold must be a number")
        if not 0.0 <= threshold < float("inf"):
            raise InvalidInput("an OOD reference threshold must be a finite number >= 0")
        if not isinstance(quantile, int | float) or isinstance(quantile, bool):
            raise InvalidInput("an OOD reference quantile must be a number")
        if not 0.0 < quantile < 1.0:
            raise InvalidInput("an OOD reference quantile must be in (0, 1)")
        return cls(kind, mean, matrix, float(threshold), float(quantile))


class OodMonitor:
    """The share of each client's last ``window`` queries beyond the reference threshold.

    The alarm is raised when at least ``min_samples`` queries are in the window and more than
    ``max_rate`` of them are out of distribution. ``state`` defaults to a private in-memory store.
    """

    def __init__(
        self,
        reference: OodReference,
        *,
        max_rate: float = 0.5,
        window: int = 100,
        min_samples: int = 20,
        state: DetectorState | None = None,
    ) -> None:
        if not isinstance(reference, OodReference):
            raise ConfigError("OodMonitor needs an OodReference")
        if type(max_rate) not in (int, float) or not 0.0 <= max_rate < 1.0:
            raise ConfigError("the OOD max_rate must be a number in [0, 1)")
        if type(window) is not int or window < 1:
            raise ConfigError("the OOD window must be a positive integer")
        if type(min_samples) is not int or not 1 <= min_samples <= window:
            raise ConfigError("the OOD min_samples must be an integer in [1, window]")
        self.reference = reference
        self.max_rate = float(max_rate)
        self.window = window
        self.min_samples = min_samples
        self._state: DetectorState = InMemoryDetectorState() if state is None else state
        self._lock = threading.Lock()

    @classmethod
    def fit(
        cls, reference: np.ndarray, *, quantile: float = 0.99, covariance: Covariance = "auto"
    ) -> OodReference:
        """Fit an :class:`OodReference` on ``reference`` rows (at least 20, all finite).

        The threshold is the ``quantile`` of distances of rows the estimate did not see (two
        folds, even and odd rows), so about ``1 - quantile`` of fresh natural rows exceed it;
        in-sample distances would understate it. ``covariance="auto"`` is Mahalanobis up to 512
        features and diagonal beyond. Raises ``InvalidInput`` for unusable rows.
        """
        if type(quantile) not in (int, float) or not 0.0 < quantile < 1.0:
            raise InvalidInput("the OOD quantile must be in (0, 1)")
        if covariance not in ("auto", "full", "diagonal"):
            raise InvalidInput("covariance must be 'auto', 'full' or 'diagonal'")
        rows = _rows(reference, None)
        if rows.shape[0] < _MIN_ROWS or not np.all(np.isfinite(rows)):
            raise InvalidInput(f"an OOD reference needs at least {_MIN_ROWS} finite rows")
        wide = rows.shape[1] > _FULL_LIMIT
        diagonal = covariance == "diagonal" or (covariance == "auto" and wide)
        kind: Literal["mahalanobis", "diagonal"] = "diagonal" if diagonal else "mahalanobis"
        held_out: list[np.ndarray] = []
        for fit_rows, test_rows in ((rows[0::2], rows[1::2]), (rows[1::2], rows[0::2])):
            mean, matrix = _estimate(kind, fit_rows)
            held_out.append(_distances(kind, mean, matrix, test_rows))
        threshold = float(np.quantile(np.concatenate(held_out), quantile))
        mean, matrix = _estimate(kind, rows)
        return OodReference(kind, mean, matrix, threshold, float(quantile))

    def observe(self, client: str, x: np.ndarray) -> DetectionResult:
        """Record the queries ``x`` (rows x features) of ``client`` and judge its window.

        ``score`` is the share of out-of-distribution queries in the window. Rows with
        non-finite values count as out of distribution. Raises ``InvalidInput`` when ``x`` does
        not have the reference's feature count.
        """
        if not isinstance(client, str) or not client:
            raise InvalidInput("a detector client must be a non-empty string")
        far = (self.reference.distances(x) > self.reference.threshold).astype(np.float64)
        with self._lock:
            stored = self._state.get(client, _FLAGS)
            flags = far if stored is None else np.concatenate([stored, far])
            flags = flags[-self.window :]
            self._state.put(client, _FLAGS, flags)
        samples = int(flags.size)
        if samples < self.min_samples:
            return DetectionResult(alarm=False, score=None, samples=samples)
        rate = float(np.mean(flags))
        return DetectionResult(alarm=rate > self.max_rate, score=rate, samples=samples)

    def reset(self, client: str) -> None:
        """Forget ``client``'s window."""
        with self._lock:
            self._state.clear(client, _PREFIX)


def _estimate(kind: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = rows.mean(axis=0)
    centered = rows - mean
    if kind == "diagonal":
        scale = centered.std(axis=0)
        # Constant features get the typical scale, so a change there counts but stays finite.
        floor = max(float(np.mean(scale)), 1e-12) * 1e-3
        return mean, 1.0 / np.maximum(scale, floor)
    return mean, _shrunk_precision(centered)


def _shrunk_precision(centered: np.ndarray) -> np.ndarray:
    # Ledoit-Wolf: shrink the sample covariance S toward mu*I, mu = tr(S)/d, by the weight that
    # minimizes the expected squared error; computed from its closed form.
    count, width = centered.shape
    sample = centered.T @ centered / count
    mu = float(np.trace(sample)) / width
    if mu <= 0.0:
        raise InvalidInput("the OOD reference rows do not vary")
    target_gap = float(np.sum((sample - mu * np.eye(width)) ** 2))
    fourth = float(np.sum(np.sum(centered**2, axis=1) ** 2))
    noise = max(0.0, (fourth - count * float(np.sum(sample**2))) / count**2)
    shrinkage = 1.0 if target_gap == 0.0 else min(noise, target_gap) / target_gap
    covariance = (1.0 - shrinkage) * sample + shrinkage * mu * np.eye(width)
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, mu * 1e-9)
    precision: np.ndarray = (vectors / values) @ vectors.T
    symmetric: np.ndarray = (precision + precision.T) / 2.0
    return symmetric


def _distances(kind: str, mean: np.ndarray, matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    centered = rows - mean
    if kind == "diagonal":
        squared = np.sum((centered * matrix) ** 2, axis=1)
    else:
        squared = np.einsum("ij,jk,ik->i", centered, matrix, centered)
    result: np.ndarray = np.sqrt(np.maximum(squared, 0.0))
    return result


def _rows(x: np.ndarray, features: int | None) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim < 2 or array.shape[0] == 0 or array.dtype.kind not in "biuf":
        raise InvalidInput("OOD queries must be a non-empty numeric array of rows x features")
    rows = array.reshape(array.shape[0], -1).astype(np.float64)
    if features is not None and rows.shape[1] != features:
        raise InvalidInput(
            f"the queries have {rows.shape[1]} features; this model's reference has {features}"
        )
    return rows


def _float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    # Only what to_json writes: (nested) lists of JSON numbers; numpy would also take strings
    # and booleans, which no reference ever holds.
    rows = value if ndim == 2 and isinstance(value, list) else [value]
    if not isinstance(value, list) or not all(
        isinstance(row, list) and all(type(item) in (int, float) for item in row) for row in rows
    ):
        raise InvalidInput(f"an OOD reference {name} must be a list of numbers")
    try:
        array: np.ndarray = np.asarray(value, dtype=np.float64)
    except (ValueError, OverflowError):
        raise InvalidInput(f"an OOD reference {name} has rows of different lengths") from None
    if array.ndim != ndim or array.size == 0 or not np.all(np.isfinite(array)):
        raise InvalidInput(f"an OOD reference {name} has the wrong shape or a non-finite value")
    return array
