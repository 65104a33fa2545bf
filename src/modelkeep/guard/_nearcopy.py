"""Near-copy probing: many slightly different copies of one input from the same caller.

Label-only membership attacks (Choquette-Choo et al. 2021) and boundary searches send the same
point again and again with a little noise, and read how often the answer holds. Natural traffic
rarely holds more than a couple of near-identical rows in a short stretch. The detector keeps,
per client, locality-sensitive signatures of its last ``window`` rows and flags a client when
one row has ``threshold`` or more near-copies among them. Exact repeats are not counted: they
teach an attacker nothing a deterministic model has not already said.

Signatures (p-stable LSH, Datar et al. 2004): each row is scaled to unit length (so the test is
relative to the row's size, whatever the model's units), projected on ``tables * projections``
fixed random Gaussian directions, and each table's projections are cut into buckets of width
``width``; the bucket numbers of a table hash to one number. Two rows are near-copies when any
table's hashes agree. A client's memory is ``window * (tables + 1)`` floats, whatever it sends.
Hand-written because no maintained LSH library fits a few hundred floats per caller kept in a
shared store; the projection is plain numpy.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.guard._detector_state import DetectionResult, DetectorState, InMemoryDetectorState

__all__ = ["NearCopyConfig", "NearCopyDetector", "calibrate_nearcopy"]

_PREFIX = "nearcopy/"
_WINDOW = _PREFIX + "w"
# Hashes are kept below 2**52 so that the float64 store holds them exactly.
_HASH_MASK = (1 << 52) - 1
_SEED = 20_221_115
# Widths tried by calibration, widest (catches the noisiest copies) first.
_WIDTHS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
# New rows compared at once with the rows they can see: at most _BLOCK x (window + _BLOCK) x
# tables booleans at a time, however many rows one call brings.
_BLOCK = 256


@dataclass(frozen=True, slots=True)
class NearCopyConfig:
    """Near-copy detector settings; raises ``ConfigError`` when out of range.

    ``threshold``: near-copies of one row within the window that raise the alarm (the row
    itself not counted). ``window``: rows remembered per client. ``tables`` and
    ``projections``: LSH tables, and projections per table. ``width``: bucket width on the
    unit-length row (calibrate it on benign rows with :func:`calibrate_nearcopy`); copies whose
    noise is a few percent of the row's length share a bucket in some table almost always,
    distinct natural rows rarely. The defaults were chosen on digits: copies with Gaussian
    noise up to about 10% of a row's length are caught, and 50 simulated benign clients never
    reached the threshold (tests/unit/guard). ``min_features``: inputs with fewer features are
    not watched (the server sets 16 for an uncalibrated detector: in few dimensions natural
    rows are near-copies of one another at the default width).
    """

    threshold: int = 10
    window: int = 256
    tables: int = 6
    projections: int = 4
    width: float = 0.2
    min_features: int = 1

    def __post_init__(self) -> None:
        for name in ("threshold", "window", "tables", "projections", "min_features"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= 4096:
                raise ConfigError(f"near-copy {name} must be an integer in [1, 4096]")
        if self.threshold >= self.window:
            raise ConfigError("the near-copy threshold must be below the window")
        if type(self.width) not in (int, float) or not 0.0 < self.width <= 10.0:
            raise ConfigError("the near-copy bucket width must be a number in (0, 10]")


class NearCopyDetector:
    """Watches each client's rows for near-copies; see the module docstring.

    State lives in ``state`` (default: a private in-memory store), so replicas sharing a Redis
    store see one window per client. Calls are serialized within the process.
    """

    def __init__(self, config: NearCopyConfig, *, state: DetectorState | None = None) -> None:
        self.config = config
        self._state: DetectorState = InMemoryDetectorState() if state is None else state
        self._lock = threading.Lock()
        self._planes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        mixers = np.random.default_rng(_SEED).integers(1, 2**63, config.projections, np.int64)
        self._mixers = (mixers.astype(np.uint64) << np.uint64(1)) | np.uint64(1)

    def observe(self, client: str, x: np.ndarray) -> DetectionResult:
        """Record the rows ``x`` (rows x features) as if sent one by one.

        ``score`` is the most near-copies any row of this call had in the client's window;
        ``alarm`` is ``score >= threshold``. ``samples`` is the rows remembered. Raises
        ``InvalidInput`` for rows that are not a numeric matrix.
        """
        if not isinstance(client, str) or not client:
            raise InvalidInput("a detector client must be a non-empty string")
        rows = np.asarray(x)
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.dtype.kind not in "biuf":
            raise InvalidInput("detector queries must be a non-empty numeric rows x features array")
        rows = rows.reshape(rows.shape[0], -1)
        if rows.shape[1] < self.config.min_features:
            return DetectionResult(alarm=False, score=None, samples=0)
        signatures = self._signatures(rows.astype(np.float64, copy=False))
        with self._lock:
            stored = self._state.get(client, _WINDOW)
            width = self.config.tables + 1
            window = np.empty((0, width)) if stored is None else stored.reshape(-1, width)
            window = np.concatenate([window, signatures])
            start = window.shape[0] - signatures.shape[0]
            worst = _most_near_copies(window, start, self.config.window)
            window = window[-self.config.window :]
            self._state.put(client, _WINDOW, window)
        return DetectionResult(
            alarm=worst >= self.config.threshold, score=float(worst), samples=window.shape[0]
        )

    def reset(self, client: str) -> None:
        """Forget ``client``'s window."""
        with self._lock:
            self._state.clear(client, _PREFIX)

    def _signatures(self, rows: np.ndarray) -> np.ndarray:
        """Per row: [exact hash, one LSH hash per table], NaN for rows with non-finite values."""
        config = self.config
        planes, offsets = self._planes_for(rows.shape[1])
        finite = np.all(np.isfinite(rows), axis=1)
        safe = np.where(finite[:, None], rows, 0.0)
        norms = np.sqrt(np.einsum("ij,ij->i", safe, safe))[:, None]
        unit = safe / np.where(norms > 0.0, norms, 1.0)
        buckets = np.floor(unit @ planes / config.width + offsets).astype(np.int64)
        buckets = buckets.reshape(rows.shape[0], config.tables, config.projections)
        # A random linear hash of each table's bucket numbers (wrapping uint64 arithmetic); a
        # collision only makes two rows look closer, which helps no one evade.
        mixed = (buckets.view(np.uint64) * self._mixers).sum(axis=2, dtype=np.uint64)
        result = np.full((rows.shape[0], config.tables + 1), np.nan)
        result[:, 1:] = (mixed & np.uint64(_HASH_MASK)).astype(np.float64)
        # A cryptographic hash here: rows an attacker made to collide with each other would
        # pass as exact repeats, which are not counted. One pass over the rows' bytes, the
        # digests gathered into one array.
        data = memoryview(np.ascontiguousarray(rows, dtype=np.float64).tobytes())
        size = rows.shape[1] * 8
        kept = np.flatnonzero(finite).tolist()
        digests = b"".join(
            hashlib.blake2b(data[i * size : (i + 1) * size], digest_size=8).digest() for i in kept
        )
        exact = np.frombuffer(digests, dtype="<u8") & np.uint64(_HASH_MASK)
        result[kept, 0] = exact.astype(np.float64)
        result[~finite] = np.nan
        return result

    def _planes_for(self, features: int) -> tuple[np.ndarray, np.ndarray]:
        found = self._planes.get(features)
        if found is None:
            config = self.config
            # Fixed seed: every replica (and restart) must compute the same signatures.
            rng = np.random.default_rng([_SEED, features])
            count = config.tables * config.projections
            found = (rng.standard_normal((features, count)), rng.uniform(0.0, 1.0, count))
            self._planes[features] = found
        return found


def _most_near_copies(window: np.ndarray, start: int, span: int) -> int:
    """The most distinct near-copies that a row of ``window`` from ``start`` on has among the
    ``span`` rows before it (rows are signatures: exact hash, then one hash per table).

    A near-copy shares a table's hash with the row without being an exact repeat of it; a
    neighbour re-sent many times is still one near-copy. Compared a block of rows against all
    the rows they can see at once, instead of row by row; the row-by-row numpy calls were
    the near-copy detector's cost. Repeats of one row have one signature, so a neighbour is
    counted at its first appearance in the row's span: where the last earlier row with its
    exact hash (``previous``) falls before the span.
    """
    exact, hashes = window[:, 0], window[:, 1:]
    order = np.argsort(exact, kind="stable")
    same = exact[order[1:]] == exact[order[:-1]]  # NaN (no signature) never equals
    previous = np.full(exact.shape[0], -1)
    previous[order[1:][same]] = order[:-1][same]
    worst = 0
    for first in range(start, window.shape[0], _BLOCK):
        rows = np.arange(first, min(first + _BLOCK, window.shape[0]))
        lowest = np.maximum(0, rows - span)
        seen = np.arange(lowest[0], rows[-1])
        if seen.size == 0:
            continue
        # Rows with non-finite values have NaN hashes: they share nothing with anything.
        near = np.zeros((rows.size, seen.size), dtype=bool)
        for table in range(hashes.shape[1]):
            near |= hashes[rows, table][:, None] == hashes[seen, table]
        near &= (seen >= lowest[:, None]) & (seen < rows[:, None])
        near &= exact[seen] != exact[rows][:, None]
        near &= previous[seen] < lowest[:, None]
        worst = max(worst, int(near.sum(axis=1).max()))
    return worst


def calibrate_nearcopy(
    benign_streams: Sequence[np.ndarray], *, config: NearCopyConfig | None = None
) -> float:
    """The widest bucket width at which no benign stream reaches half the alarm threshold.

    Each stream is one benign client's rows, replayed one by one through a fresh detector.
    Where natural rows are dense (few features, such as iris), near-copies are natural too, and
    only a narrow width tells probing apart from traffic. Raises ``InvalidInput`` without rows.
    """
    base = NearCopyConfig() if config is None else config
    streams = [np.asarray(s, dtype=np.float64) for s in benign_streams if len(s)]
    if not streams:
        raise InvalidInput("calibrating the near-copy detector needs benign rows")
    for width in _WIDTHS:
        detector = NearCopyDetector(replace(base, width=width))
        worst = 0.0
        for index, stream in enumerate(streams):
            for row in stream:
                worst = max(worst, detector.observe(f"benign{index}", row[None, :]).score or 0.0)
            if 2 * worst >= base.threshold:
                break
        if 2 * worst < base.threshold:
            return width
    return _WIDTHS[-1]
