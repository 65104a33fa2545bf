"""PRADA: model-extraction detection from the shape of a client's query distances.

Juuti et al. 2019 ("PRADA: Protecting against DNN Model Stealing Attacks") observe that the
distances between a benign client's natural queries are roughly normally distributed, while
extraction attacks (synthetic Jacobian-augmented samples, boundary probing, step-wise searches)
produce distances concentrated at a few step sizes. Per client and per predicted class, each new
query's minimum L2 distance to that class's *growing set* of earlier queries is recorded; the
query joins the growing set when that distance exceeds the class threshold
``T_c = max(T_c, mean(D_c) - std(D_c))`` over the distances that admitted earlier members. The
Shapiro-Wilk statistic W of all recorded distances falls when they stop looking normal; W below
the configured threshold raises the alarm.

Departures from the paper, each to bound or harden the server: the client's distances are a
sliding window of ``max_samples``; growing sets keep their newest ``max_growing`` members and at
most ``max_classes`` classes are tracked per client; an exact repeat of an earlier query (distance
0) is not recorded, since it tells an attacker nothing new and a benign client re-sending a fixed
probe would otherwise look abnormal; rows with non-finite values are ignored; W is checked at
several rows within one call, so an attack packed into a single request is judged as if its
rows had come one by one.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from scipy.spatial.distance import cdist

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.guard._detector_state import DetectionResult, DetectorState, InMemoryDetectorState

__all__ = ["PradaConfig", "PradaDetector", "calibrate_prada", "shapiro_w"]

_PREFIX = "prada/"
_DISTANCES = _PREFIX + "d"
_CLASS_COUNT = _PREFIX + "classes"
# scipy's p-value (which we do not use) is only documented up to 5000 samples; W is fine past
# that, but a window this large already costs milliseconds per request.
_MAX_WINDOW = 5000


@dataclass(frozen=True, slots=True)
class PradaConfig:
    """PRADA settings; raises ``ConfigError`` when out of range.

    ``threshold``: W below it raises the alarm. Calibrate it per model on benign traffic with
    :func:`calibrate_prada`: W of natural traffic depends on the data. The default leaves room
    under what 450 simulated benign clients of a digits classifier reached (their lowest W was
    0.85; natural nearest-neighbour distances are right-skewed) and above the attacks measured
    on the same model (0.57-0.81). ``min_samples``: distances recorded before any verdict;
    below about 50 the W of natural traffic scatters too widely (down to 0.78 with under 30).
    ``max_samples``: the sliding window of distances. ``max_growing``: members kept per class
    growing set. ``max_classes``: classes tracked per client. ``checks_per_call``: how many
    times W is checked within one call (after every row of a batch up to that size).
    ``check_every``: distances recorded between two checks of W (the server uses 8, so a
    one-row request pays for a Shapiro-Wilk test on average once in 8 calls, and an alarm
    comes at most 7 distances late). A
    client's memory is at most
    ``max_samples + max_classes * (max_growing * (features + 1) + 1) + 3`` floats.
    """

    threshold: float = 0.80
    min_samples: int = 50
    max_samples: int = 2000
    max_growing: int = 256
    max_classes: int = 1000
    checks_per_call: int = 16
    check_every: int = 1

    def __post_init__(self) -> None:
        if type(self.threshold) not in (int, float) or not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("the PRADA threshold must be a number in [0, 1]")
        object.__setattr__(self, "threshold", float(self.threshold))
        if type(self.min_samples) is not int or self.min_samples < 3:
            raise ConfigError("PRADA min_samples must be an integer >= 3")
        if type(self.max_samples) is not int or not (
            self.min_samples <= self.max_samples <= _MAX_WINDOW
        ):
            raise ConfigError(
                f"PRADA max_samples must be an integer in [min_samples, {_MAX_WINDOW}]"
            )
        for name in ("max_growing", "max_classes", "checks_per_call", "check_every"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"PRADA {name} must be a positive integer")


class PradaDetector:
    """Watches each client's query stream; see the module docstring for the method.

    ``state`` defaults to a private :class:`InMemoryDetectorState`. Calls are serialized within
    the process; replicas sharing a state store may interleave a client's updates (a few
    distances can be lost, never invented).
    """

    def __init__(self, config: PradaConfig, *, state: DetectorState | None = None) -> None:
        if not isinstance(config, PradaConfig):
            raise ConfigError("PradaDetector needs a PradaConfig")
        self.config = config
        self._state: DetectorState = InMemoryDetectorState() if state is None else state
        self._lock = threading.Lock()

    def observe(self, client: str, x: np.ndarray, predicted: np.ndarray) -> DetectionResult:
        """Record the queries ``x`` (rows x features) that the model labelled ``predicted``.

        Rows are taken in order, as if sent one by one. ``score`` is the lowest W of the
        client's window at the checks made during this call (see ``checks_per_call``), ``None``
        while fewer than ``min_samples`` distances are recorded; ``alarm`` is ``score <
        threshold``. ``predicted`` holds one integer or string label per row. Raises
        ``InvalidInput`` when the shapes disagree, a value is not numeric, or the feature count
        differs from the client's earlier queries.
        """
        return self.observe_calls(client, x, predicted, [len(x)])

    def observe_calls(
        self, client: str, x: np.ndarray, predicted: np.ndarray, sizes: Sequence[int]
    ) -> DetectionResult:
        """Record several calls of ``client`` at once: ``x`` holds their rows end to end,
        ``sizes`` the rows of each call. W is checked at the same rows as separate
        :meth:`observe` calls would check it, so the client's state and the lowest score are the
        same; one state read and write serve them all (how the server feeds a batch).
        """
        _check_client(client)
        rows = _rows(x)
        labels = _labels(predicted, rows.shape[0])
        if sum(sizes) != rows.shape[0] or min(sizes, default=1) < 1:
            raise InvalidInput("the call sizes must be positive and add up to the rows")
        with self._lock:
            return self._observe(client, rows, labels, sizes)

    def reset(self, client: str) -> None:
        """Forget everything about ``client`` (after an operator cleared an alarm, say)."""
        _check_client(client)
        with self._lock:
            self._state.clear(client, _PREFIX)

    def _observe(
        self, client: str, rows: np.ndarray, labels: list[str], sizes: Sequence[int]
    ) -> DetectionResult:
        config = self.config
        stream = _Stream(self._state, client, config)
        # Rows with non-finite values are ignored; told apart for the whole call at once.
        finite = np.isfinite(rows).all(axis=1)
        # Each row's distance (NaN: not recorded), one class at a time: a row's distance only
        # depends on earlier rows of its own class.
        distances = stream.measure(rows, labels, finite)
        recorded = ~np.isnan(distances)
        new = distances[recorded]
        # Distances recorded up to and including each row; W is checked where the rows of
        # separate calls would have checked it.
        through = np.cumsum(recorded).tolist()
        lowest: float | None = None
        checked = stream.checked - stream.recorded
        for index, check in enumerate(_check_rows(sizes, config.checks_per_call)):
            if check and through[index] - checked >= config.check_every:
                checked = through[index]
                window = stream.window(new[:checked])
                if window.size >= config.min_samples:
                    score = shapiro_w(window)
                    lowest = score if lowest is None else min(lowest, score)
        window = stream.save(new, stream.recorded + checked)
        alarm = lowest is not None and lowest < config.threshold
        return DetectionResult(alarm=alarm, score=lowest, samples=int(window.size))


def _check_rows(sizes: Sequence[int], checks_per_call: int) -> list[bool]:
    """Per row of calls of ``sizes`` rows: whether W may be checked after it.

    W is checked after every row of a small call and at evenly spaced rows of a large one:
    packing an attack into one request must not average its telltale dip away.
    """
    checks: list[bool] = []
    for size in sizes:
        stride = max(1, -(-size // checks_per_call))
        checks.extend((i + 1) % stride == 0 or i == size - 1 for i in range(size))
    return checks


class _Stream:
    """One client's PRADA state for the length of one call: read lazily, written once."""

    def __init__(self, state: DetectorState, client: str, config: PradaConfig) -> None:
        self._state, self._client, self._config = state, client, config
        stored = state.get(client, _DISTANCES)
        self._stored: np.ndarray = np.zeros(0) if stored is None else stored
        # [classes tracked, distances ever recorded, recorded at the last check of W]
        count = state.get(client, _CLASS_COUNT)
        self._class_count = 0 if count is None else int(count[0])
        self.recorded = 0 if count is None or count.size < 3 else int(count[1])
        self.checked = 0 if count is None or count.size < 3 else int(count[2])
        # Per class: the growing set, and [T_c, distances that admitted its members...].
        self._members: dict[str, np.ndarray] = {}
        self._admitted: dict[str, np.ndarray] = {}
        self._touched: set[str] = set()

    def measure(self, rows: np.ndarray, labels: list[str], finite: np.ndarray) -> np.ndarray:
        """Each row's minimum distance to its class's growing set (NaN where none is
        recorded), growing the sets as the rows, taken in order, would one by one."""
        distances = np.full(rows.shape[0], np.nan)
        by_class: dict[str, list[int]] = {}
        for index in np.flatnonzero(finite).tolist():
            by_class.setdefault(labels[index], []).append(index)
        # Classes in order of first appearance: the order in which they would be founded.
        for label, indices in by_class.items():
            if not self._load(label, rows[indices[0]]):
                if label not in self._members:  # no room for another class
                    continue
                indices = indices[1:]  # the founding row has no distance
            # Blocks no longer than a growing set: a block's own members are never evicted
            # while the block is measured.
            limit = self._config.max_growing
            for start in range(0, len(indices), limit):
                block = indices[start : start + limit]
                distances[block] = self._grow(label, rows[block])
        return distances

    def _grow(self, label: str, block: np.ndarray) -> np.ndarray:
        """The distances of ``block`` (rows of one class, in order), and the class's growing
        set and threshold moved on past them.

        The distances to the stored set and among the block's rows are computed in two
        matrix calls; only the admissions, which change what later rows are measured
        against, are taken row by row. Saves the per-row numpy calls of a row-by-row update
        (most of the detectors' cost on a stream of one-row requests).
        """
        limit = self._config.max_growing
        group, history = self._members[label], self._admitted[label]
        with np.errstate(over="ignore", invalid="ignore"):  # absurd rows: inf, skipped below
            to_group = cdist(block, group)
            within = cdist(block, block)
        # A set grown past ``limit`` loses its oldest members: a row is measured against
        # group[evicted:], whose minimum is its row of suffix[:, evicted].
        suffix = np.minimum.accumulate(to_group[:, ::-1], axis=1)[:, ::-1]
        # Each row's distance to the rows of the block admitted before it.
        to_admitted = np.full(block.shape[0], np.inf)
        # Each row's distance to the set as it stands: one flat list, read row by row and
        # remade after each admission (rare once a set has grown), not a list per row.
        nearest_now = suffix[:, 0].tolist()
        threshold = float(history[0])
        spread = history[1:].tolist()
        admitted: list[int] = []
        result = [math.nan] * block.shape[0]
        for i in range(block.shape[0]):
            nearest = nearest_now[i]
            if nearest == 0.0 or not math.isfinite(nearest):
                continue
            result[i] = nearest
            # 3. Far enough from every member: the query joins the set and T_c moves up.
            if nearest > threshold:
                admitted.append(i)
                spread = [*spread, nearest][-limit:]
                values = np.asarray(spread)
                threshold = max(threshold, float(values.mean() - values.std()))
                if i + 1 < block.shape[0]:
                    np.minimum(to_admitted, within[:, i], out=to_admitted)
                    # At most block size - 1 < limit admitted so far: evicted < len(group).
                    evicted = max(0, group.shape[0] + len(admitted) - limit)
                    nearest_now[i + 1 :] = np.minimum(
                        suffix[i + 1 :, evicted], to_admitted[i + 1 :]
                    ).tolist()
        if admitted:
            self._members[label] = np.concatenate([group, block[admitted]])[-limit:]
            self._admitted[label] = np.asarray([threshold, *spread])
            self._touched.add(label)
        return np.asarray(result)

    def _load(self, label: str, row: np.ndarray) -> bool:
        # True when the class has a growing set to measure against, False when the row was
        # used to found one (or the client already has max_classes classes).
        found = self._state.get(self._client, _members_key(label))
        if found is None:
            if self._class_count >= self._config.max_classes:
                return False
            # 1. A class's first query founds its growing set; there is no distance yet.
            self._class_count += 1
            self._members[label] = row[None, :].copy()
            self._admitted[label] = np.zeros(1)
            self._touched.add(label)
            return False
        if found.ndim != 2 or found.shape[1] != row.shape[0]:
            raise InvalidInput(
                "the queries have a different number of features than this client's earlier "
                "ones; key the detector by model as well as by caller"
            )
        admitted = self._state.get(self._client, _admitted_key(label))
        self._members[label] = found
        self._admitted[label] = np.zeros(1) if admitted is None or admitted.size == 0 else admitted
        return True

    def window(self, new: np.ndarray) -> np.ndarray:
        """The sliding window once ``new`` distances (in order) follow the stored ones."""
        limit = self._config.max_samples
        if not new.size:
            return self._stored[-limit:]
        recent = new[-limit:]
        older = self._stored[max(0, self._stored.size - (limit - recent.size)) :]
        return np.concatenate([older, recent])

    def save(self, new: np.ndarray, checked: int) -> np.ndarray:
        """Write the grown sets, the window with ``new`` and the counts; return the window."""
        for label in self._touched:
            self._state.put(self._client, _members_key(label), self._members[label])
            self._state.put(self._client, _admitted_key(label), self._admitted[label])
        window = self.window(new)
        self._state.put(self._client, _DISTANCES, window)
        recorded = self.recorded + int(new.size)
        counts = np.array([self._class_count, recorded, checked], np.float64)
        self._state.put(self._client, _CLASS_COUNT, counts)
        return window


def shapiro_w(values: np.ndarray) -> float:
    """The Shapiro-Wilk W of ``values`` (3 to 5000); 0.0 when they are all equal.

    Equal distances come from a grid or a fixed-step walk, the least normal stream there is.
    """
    if not 3 <= values.size <= _MAX_WINDOW:
        raise InvalidInput(
            f"the Shapiro-Wilk statistic takes 3 to {_MAX_WINDOW} values, not {values.size}"
        )
    # Array methods, not np.max and friends: this runs every few rows a server watches, and
    # the wrappers' dispatch cost about a fifth of the whole test on a 2000-value window.
    low, high = float(values.min()), float(values.max())
    spread = high - low
    if spread <= 1e-12 * max(1.0, abs(low), abs(high)):
        return 0.0
    # W does not depend on location or scale; standardizing keeps huge distances finite.
    scaled = (values - values.mean()) / spread
    # scipy's axis/NaN-policy decorator costs about 2 ms a call, ten times the test itself,
    # on the inference path; what it would check (a finite 1-D array) holds here. No warning
    # filter either (it cost a tenth of the test): scipy warns only for fewer than 3 or more
    # than 5000 values or a zero range, all excluded above.
    return float(stats.shapiro(scaled, _no_deco=True)[0])


def calibrate_prada(
    benign_streams: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    target_false_alarm: float = 0.0,
    margin: float = 0.10,
    config: PradaConfig | None = None,
) -> float:
    """A PRADA threshold from benign traffic: the W that ``target_false_alarm`` of the benign
    clients fall below, minus ``margin``, clipped to [0, 1].

    Each stream is ``(x, predicted)`` for one benign client, replayed row by row through a fresh
    detector with ``config`` (default :class:`PradaConfig`), and the lowest W it reaches once
    ``min_samples`` distances are recorded is its score; W is checked after every row, which is
    the most alarm-prone way a server can check it. With the default ``target_false_alarm=0``
    no calibration client would have raised an alarm; a fresh benign client still falls below
    the lowest of N calibration clients with probability about 1/(N + 1), and by how much
    depends on how heavy the benign tail is, which is what ``margin`` is for. On digits, the
    lowest W of 100 calibration clients was 0.90 and that of 50 other benign clients 0.85,
    hence the default. Calibrate on as many clients as you can. Raises ``InvalidInput`` when
    no stream is long enough to score.
    """
    if not 0.0 <= target_false_alarm < 1.0:
        raise InvalidInput("target_false_alarm must be in [0, 1)")
    if not 0.0 <= margin <= 1.0:
        raise InvalidInput("margin must be in [0, 1]")
    base = PradaConfig() if config is None else config
    lowest: list[float] = []
    for x, predicted in benign_streams:
        rows = _rows(x)
        labels = _labels(predicted, rows.shape[0])
        # One call that checks W after every row: the same scores as row-by-row calls.
        probe = replace(base, threshold=0.0, checks_per_call=rows.shape[0])
        score = PradaDetector(probe)._observe("benign", rows, labels, [rows.shape[0]]).score
        if score is not None:
            lowest.append(score)
    if not lowest:
        raise InvalidInput(
            f"no benign stream reached {base.min_samples} distances; calibrate on longer streams"
        )
    reached = float(np.quantile(np.asarray(lowest), target_false_alarm, method="lower"))
    return min(1.0, max(0.0, reached - margin))


def _check_client(client: str) -> None:
    if not isinstance(client, str) or not client:
        raise InvalidInput("a detector client must be a non-empty string")


def _rows(x: np.ndarray) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim < 2 or array.shape[0] == 0 or array.size == 0:
        raise InvalidInput("detector queries must be a non-empty array of rows x features")
    if array.dtype.kind not in "biuf":
        raise InvalidInput("detector queries must be numeric")
    return array.reshape(array.shape[0], -1).astype(np.float64)


def _labels(predicted: np.ndarray, count: int) -> list[str]:
    array = np.asarray(predicted)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.shape[0] != count:
        raise InvalidInput("one predicted label per query row is needed")
    if array.dtype.kind in "biu":
        return [str(int(value)) for value in array.tolist()]
    if array.dtype.kind in "OUS":
        # String labels are hashed: model-chosen text never becomes part of a storage key.
        return ["s" + _digest(value) for value in array.tolist()]
    raise InvalidInput("predicted labels must be integers or strings")


def _digest(value: object) -> str:
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:24]


def _members_key(label: str) -> str:
    return f"{_PREFIX}g/{label}"


def _admitted_key(label: str) -> str:
    return f"{_PREFIX}t/{label}"
