"""Population drift: are a model's inputs, taken together, still distributed as at calibration?

This is not the per-caller OOD detector (``_ood.py``), which asks whether one client's queries
are far from the training data; here every caller's inputs to a model pool into one sliding
window, compared feature by feature with the reference fitted from the benign rows of
``policy calibrate``:

* the **population stability index** over the reference's deciles,
  ``PSI = sum((a - e) * ln(a / e))`` with ``e`` the reference share of a bin and ``a`` the
  window's; by the usual rule of thumb below 0.1 is stable and above 0.25 a real shift;
* a **two-sample Kolmogorov-Smirnov test** of the window against the reference (kept as 100
  quantiles per feature), Bonferroni-corrected over the features.

A model drifts when its worst feature's PSI reaches ``psi_threshold`` or any feature's KS test
rejects at ``ks_alpha``. The monitor is fed off the request path: ``offer`` costs a dictionary
lookup for a model without a reference and a queue append otherwise, and it sheds (counts and
drops) rather than queue when ``shed`` says the server is busy. The scores are computed by the
feeder's thread every ``window // 4`` new rows.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from modelkeep.errors import InvalidInput
from modelkeep.guard._deferred import DeferredFeed

__all__ = ["DriftConfig", "DriftMonitor", "DriftScores"]

log = logging.getLogger(__name__)

_FORMAT = "modelkeep.drift/1"
#: Features watched per model: the first this many of the (flattened) first input.
MAX_FEATURES = 128
_QUANTILES = 100
_MIN_REFERENCE_ROWS = 50
_EPSILON = 1e-4
_DECILES = np.linspace(0.1, 0.9, 9)


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """A model's drift reference and settings; build one with :meth:`fit`."""

    edges: tuple[np.ndarray, ...] = field(repr=False)  # per feature, inner bin edges
    expected: tuple[np.ndarray, ...] = field(repr=False)  # per feature, reference bin shares
    sample: np.ndarray = field(repr=False)  # (features, _QUANTILES) reference quantiles
    rows: int
    window: int = 500
    psi_threshold: float = 0.25
    ks_alpha: float = 0.01

    @property
    def features(self) -> int:
        return int(self.sample.shape[0])

    @property
    def min_rows(self) -> int:
        return max(20, self.window // 4)

    @classmethod
    def fit(cls, rows: np.ndarray, **settings: Any) -> DriftConfig:
        """The reference of ``rows`` (at least 50, finite), first MAX_FEATURES features."""
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim < 2:
            raise InvalidInput("drift reference rows must be a matrix of numbers")
        x = x.reshape(len(x), -1)[:, :MAX_FEATURES]
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) < _MIN_REFERENCE_ROWS:
            raise InvalidInput(
                f"a drift reference needs at least {_MIN_REFERENCE_ROWS} finite rows"
            )
        edges, expected = [], []
        for column in x.T:
            inner = np.unique(np.quantile(column, _DECILES))
            edges.append(inner)
            expected.append(_shares(column, inner))
        sample = np.quantile(x, np.linspace(0.0, 1.0, _QUANTILES), axis=0).T.copy()
        return cls(tuple(edges), tuple(expected), sample, len(x)).with_settings(**settings)

    def with_settings(
        self,
        *,
        window: int | None = None,
        psi_threshold: float | None = None,
        ks_alpha: float | None = None,
    ) -> DriftConfig:
        """A copy with the given settings changed, each checked (InvalidInput)."""
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or not 50 <= window <= 100_000
        ):
            raise InvalidInput("drift window must be a whole number of rows from 50 to 100000")
        for name, value, low, high in (
            ("psi_threshold", psi_threshold, 0.001, 10.0),
            ("ks_alpha", ks_alpha, 1e-12, 0.5),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"drift {name} must be a number")
            if not (math.isfinite(value) and low <= value <= high):
                raise InvalidInput(f"drift {name} must be between {low:g} and {high:g}")
        return replace(
            self,
            window=self.window if window is None else window,
            psi_threshold=self.psi_threshold if psi_threshold is None else float(psi_threshold),
            ks_alpha=self.ks_alpha if ks_alpha is None else float(ks_alpha),
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "edges": [e.tolist() for e in self.edges],
                "expected": [e.tolist() for e in self.expected],
                "sample": self.sample.tolist(),
                "rows": self.rows,
                "window": self.window,
                "psi_threshold": self.psi_threshold,
                "ks_alpha": self.ks_alpha,
            }
        )

    @classmethod
    def loads(cls, text: str) -> DriftConfig:
        """Inverse of :meth:`dumps` (only ever reads what the server wrote)."""
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise InvalidInput("not a drift config")
        edges = tuple(np.asarray(e, dtype=np.float64) for e in data["edges"])
        expected = tuple(np.asarray(e, dtype=np.float64) for e in data["expected"])
        sample = np.asarray(data["sample"], dtype=np.float64)
        config = cls(edges, expected, sample, int(data["rows"]))
        return config.with_settings(
            window=int(data["window"]),
            psi_threshold=float(data["psi_threshold"]),
            ks_alpha=float(data["ks_alpha"]),
        )

    def settings(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "reference_rows": self.rows,
            "window": self.window,
            "psi_threshold": self.psi_threshold,
            "ks_alpha": self.ks_alpha,
        }


@dataclass(frozen=True, slots=True)
class DriftScores:
    """One evaluation of a model's window."""

    rows: int
    psi: float  # worst feature
    ks: float  # largest KS statistic
    drifted_features: int  # KS rejections after Bonferroni
    drifted: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "psi": round(self.psi, 6),
            "ks_statistic": round(self.ks, 6),
            "drifted_features": self.drifted_features,
            "drifted": self.drifted,
        }


def _shares(column: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, column, side="right"), minlength=len(edges) + 1)
    return np.maximum(counts / max(1, len(column)), _EPSILON)


def score(config: DriftConfig, window: np.ndarray) -> DriftScores:
    """PSI and KS of ``window`` (rows x features) against ``config``'s reference."""
    psi_worst, ks_worst, rejected = 0.0, 0.0, 0
    alpha = config.ks_alpha / config.features
    for j in range(config.features):
        column = window[:, j]
        actual = _shares(column, config.edges[j])
        expected = config.expected[j]
        psi = float(np.sum((actual - expected) * np.log(actual / expected)))
        result = stats.ks_2samp(column, config.sample[j])
        psi_worst = max(psi_worst, psi)
        ks_worst = max(ks_worst, float(result.statistic))
        rejected += int(float(result.pvalue) < alpha)
    drifted = psi_worst >= config.psi_threshold or rejected > 0
    return DriftScores(len(window), psi_worst, ks_worst, rejected, drifted)


class _Window:
    """A ring buffer of the latest ``size`` rows of one model."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.rows = np.empty((config.window, config.features))
        self.filled = 0
        self.position = 0
        self.fresh = 0
        self.last: DriftScores | None = None

    def add(self, x: np.ndarray) -> None:
        x = x[-len(self.rows) :]
        end = self.position + len(x)
        if end <= len(self.rows):
            self.rows[self.position : end] = x
        else:
            split = len(self.rows) - self.position
            self.rows[self.position :] = x[:split]
            self.rows[: end - len(self.rows)] = x[split:]
        self.position = end % len(self.rows)
        self.filled = min(len(self.rows), self.filled + len(x))
        self.fresh += len(x)

    def due(self) -> bool:
        return self.filled >= self.config.min_rows and self.fresh >= self.config.min_rows

    def contents(self) -> np.ndarray:
        return self.rows[: self.filled]


# What the monitor reports: (model, scores, whether the drifted state just changed).
ScoreSink = Callable[[str, DriftScores, bool], None]


class DriftMonitor:
    """Per model sliding windows of inputs, scored against each model's reference."""

    def __init__(
        self,
        sink: ScoreSink,
        *,
        shed: Callable[[], bool] | None = None,
        on_drop: Callable[[], None] | None = None,
        capacity: int = 512,
    ) -> None:
        self._sink = sink
        self._shed = shed
        self._on_drop = on_drop
        self._texts: dict[str, str] = {}
        self._configs: dict[str, DriftConfig] = {}
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.shed_count = 0
        # Its own small queue, apart from the detectors': drift work is the first to go.
        self.feed: DeferredFeed[tuple[str, np.ndarray]] = DeferredFeed(
            self._process, capacity=capacity, max_cost=1 << 20, linger=0.2, on_drop=on_drop
        )

    def configure(self, texts: Mapping[str, str]) -> None:
        """Set every model's config (model -> JSON); unchanged ones keep their window."""
        configs: dict[str, DriftConfig] = {}
        for model, text in texts.items():
            if self._texts.get(model) == text and model in self._configs:
                configs[model] = self._configs[model]
                continue
            try:
                configs[model] = DriftConfig.loads(text)
            except (InvalidInput, ValueError, KeyError, TypeError):
                log.error("model %s: its drift config is not readable; drift not monitored", model)
        with self._lock:
            self._texts = dict(texts)
            self._configs = configs
            self._windows = {m: w for m, w in self._windows.items() if configs.get(m) is w.config}

    def offer(self, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        """On the request path: queue the request's first input if ``model`` is monitored."""
        if model not in self._configs:
            return
        first = next(iter(inputs.values()), None)
        if first is None or first.ndim == 0 or first.dtype.kind not in "biuf" or not first.size:
            return
        if self._shed is not None and self._shed():
            self.shed_count += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        self.feed.put((model, first), first.size)

    def status(self, model: str) -> DriftScores | None:
        window = self._windows.get(model)
        return None if window is None else window.last

    def _process(self, batch: list[tuple[str, np.ndarray]]) -> None:
        by_model: dict[str, list[np.ndarray]] = {}
        for model, x in batch:
            by_model.setdefault(model, []).append(x)
        for model, arrays in by_model.items():
            config = self._configs.get(model)
            if config is None:
                continue
            with self._lock:
                window = self._windows.get(model)
                if window is None or window.config is not config:
                    window = self._windows[model] = _Window(config)
            for x in arrays:
                rows = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
                if rows.shape[1] < config.features:
                    continue  # another shape than the reference's: not comparable
                rows = rows[:, : config.features]
                window.add(rows[np.isfinite(rows).all(axis=1)])
            if not window.due():
                continue
            window.fresh = 0
            scores = score(config, window.contents())
            changed = (window.last.drifted if window.last else False) != scores.drifted
            window.last = scores
            self._sink(model, scores, changed)
