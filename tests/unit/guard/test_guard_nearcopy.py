"""Near-copy probing is a signal: noisy copies of one input raise the detector within a bounded
number of queries, ordinary callers sampling real data do not, and memory per caller is bounded."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_iris

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.guard._redis_state import RedisDetectorState
from modelkeep.guard.detection import (
    InMemoryDetectorState,
    NearCopyConfig,
    NearCopyDetector,
    calibrate_nearcopy,
)

DIGITS = load_digits().data
COPIES = 16


def noisy_copies(rng: np.random.Generator, base: np.ndarray, share: float) -> np.ndarray:
    """``COPIES`` copies of ``base`` with Gaussian noise of ``share`` of its length."""
    noise = rng.normal(size=(COPIES, base.size)) * share * np.linalg.norm(base) / np.sqrt(base.size)
    return base + noise


def first_alarm(detector: NearCopyDetector, client: str, rows: np.ndarray) -> int | None:
    for index, row in enumerate(rows):
        if detector.observe(client, row[None, :]).alarm:
            return index + 1
    return None


@pytest.mark.parametrize("share", [0.01, 0.05])
def test_noisy_copies_of_one_point_are_flagged_within_a_bounded_number_of_queries(
    share: float,
) -> None:
    rng = np.random.default_rng(0)
    detector = NearCopyDetector(NearCopyConfig())
    probes = np.vstack([noisy_copies(rng, DIGITS[i], share) for i in rng.integers(0, 1797, 4)])
    found = first_alarm(detector, "attacker", probes)
    # The 11th copy of the first point has 10 distinct near-copies before it.
    assert found is not None
    assert found <= COPIES


def test_fifty_benign_callers_sampling_real_data_raise_no_alarm() -> None:
    rng = np.random.default_rng(1)
    detector = NearCopyDetector(NearCopyConfig())
    alarms = []
    for caller in range(50):
        # Sampled with replacement: exact repeats happen, as in real traffic.
        rows = DIGITS[rng.integers(0, len(DIGITS), 300)]
        if first_alarm(detector, f"benign-{caller}", rows) is not None:
            alarms.append(caller)
    assert alarms == []


def test_a_whole_probe_in_one_request_is_judged_row_by_row() -> None:
    rng = np.random.default_rng(2)
    result = NearCopyDetector(NearCopyConfig()).observe("c", noisy_copies(rng, DIGITS[7], 0.02))
    assert result.alarm
    assert result.score == COPIES - 1


def test_exact_repeats_are_not_near_copies() -> None:
    detector = NearCopyDetector(NearCopyConfig())
    for _ in range(100):
        result = detector.observe("c", DIGITS[3][None, :])
    assert (result.alarm, result.score) == (False, 0.0)


def test_memory_per_caller_is_bounded() -> None:
    config = NearCopyConfig(window=64)
    state = InMemoryDetectorState()
    detector = NearCopyDetector(config, state=state)
    for start in range(0, 1000, 50):
        detector.observe("c", DIGITS[start : start + 50])
    assert state.size("c") == config.window * (config.tables + 1)


def test_calibration_narrows_the_width_where_natural_rows_are_dense() -> None:
    iris = load_iris().data
    rng = np.random.default_rng(3)
    assert calibrate_nearcopy([DIGITS[rng.integers(0, 1797, 150)] for _ in range(10)]) == 0.2
    width = calibrate_nearcopy([iris[rng.integers(0, 150, 150)] for _ in range(10)])
    assert width < 0.2
    detector = NearCopyDetector(NearCopyConfig(width=width))
    benign = [first_alarm(detector, f"b{c}", iris[rng.integers(0, 150, 300)]) for c in range(20)]
    assert benign == [None] * 20
    assert first_alarm(detector, "attacker", noisy_copies(rng, iris[5], 0.001)) is not None


def test_few_features_are_not_watched_below_min_features() -> None:
    detector = NearCopyDetector(NearCopyConfig(min_features=16))
    result = detector.observe("c", np.tile(load_iris().data[:1], (30, 1)) + 1e-3)
    assert (result.alarm, result.score, result.samples) == (False, None, 0)


def test_bad_settings_and_rows_are_refused() -> None:
    with pytest.raises(ConfigError):
        NearCopyConfig(threshold=300, window=256)
    with pytest.raises(ConfigError):
        NearCopyConfig(width=0.0)
    with pytest.raises(InvalidInput):
        NearCopyDetector(NearCopyConfig()).observe("c", np.array(["a", "b"]))


def test_rows_with_non_finite_values_are_skipped() -> None:
    rows = np.tile(DIGITS[0], (20, 1))
    rows[:, 0] = np.nan
    result = NearCopyDetector(NearCopyConfig()).observe("c", rows)
    assert (result.alarm, result.score) == (False, 0.0)


@pytest.mark.integration
def test_two_replicas_sharing_redis_see_one_window(redis_url: str) -> None:
    namespace = f"modelkeep-test:{secrets.token_hex(6)}"
    replicas = [
        NearCopyDetector(NearCopyConfig(), state=RedisDetectorState(redis_url, namespace=namespace))
        for _ in range(2)
    ]
    copies = noisy_copies(np.random.default_rng(4), DIGITS[11], 0.02)
    # Alternating replicas: neither alone holds more than 8 copies, together they hold 16.
    results = [replicas[i % 2].observe("c", row[None, :]) for i, row in enumerate(copies)]
    assert results[-1].alarm
    assert results[-1].score == COPIES - 1
    replicas[0].reset("c")
    assert replicas[1].observe("c", copies[0][None, :]).score == 0.0


def test_one_call_of_many_rows_counts_as_one_row_calls_do() -> None:
    """A call's rows are compared with the window a block at a time; the window and the most
    near-copies must be what one-row calls give, past the window and across blocks."""
    config = NearCopyConfig(window=40, threshold=5)
    rng = np.random.default_rng(3)
    base = DIGITS[rng.integers(0, len(DIGITS), size=600)]
    rows = base + rng.normal(size=base.shape) * (rng.random((600, 1)) < 0.5)
    # One row sent again and again, exactly and with a little noise: a noisy copy's exact
    # neighbours count once each, however often they were sent.
    rows[rng.integers(0, 600, size=100)] = DIGITS[7]
    noisy = rng.integers(0, 600, size=100)
    rows[noisy] = DIGITS[7] + rng.normal(size=(100, DIGITS.shape[1])) * 0.1
    rows[rng.random(600) < 0.02, 0] = np.inf
    one_by_one = NearCopyDetector(config)
    worst = max(one_by_one.observe("c", row[None, :]).score or 0.0 for row in rows)
    at_once = NearCopyDetector(config)
    assert at_once.observe("c", rows).score == worst
    np.testing.assert_array_equal(
        one_by_one._state.get("c", "nearcopy/w"), at_once._state.get("c", "nearcopy/w")
    )


def test_a_neighbour_sent_many_times_is_one_near_copy() -> None:
    detector = NearCopyDetector(NearCopyConfig())
    point = DIGITS[7]
    scores = [detector.observe("c", point[None, :]).score for _ in range(20)]
    assert scores == [0.0] * 20  # exact repeats are not near-copies of each other
    noisy = point + np.random.default_rng(4).normal(size=point.size) * 0.001 * np.linalg.norm(point)
    assert detector.observe("c", noisy[None, :]).score == 1.0
