"""Detectors fed off the request path: alarms still come (within a flush of the queue), the queue
is bounded and never blocks a request, and batched feeding computes what one-by-one feeding does.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from modelkeep.guard._deferred import DeferredFeed
from modelkeep.guard.admission import Admission
from modelkeep.guard.detection import (
    InMemoryDetectorState,
    NearCopyConfig,
    NearCopyDetector,
    PradaConfig,
    PradaDetector,
)
from modelkeep.guard.gate import Alarm, InferenceGate
from modelkeep.guard.policy import ModelPolicy
from modelkeep.runtime.signature import ModelSignature

DIGITS = load_digits().data
SIGNATURE = ModelSignature.from_json(
    {
        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 64]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
)


def walk(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed-step walk away from one digit (PRADA's least normal stream), one row a request,
    each answered with the same label."""
    start = DIGITS[0]
    direction = np.ones(64) / 8.0
    return [((start + i * direction)[None, :], np.array([1])) for i in range(steps)]


def copies(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noisy copies of one digit, one row a request (near-copy probing)."""
    rng = np.random.default_rng(3)
    base = DIGITS[5]
    noise = rng.normal(size=(count, 64)) * 0.01 * np.linalg.norm(base) / 8.0
    return [((base + n)[None, :], np.array([1])) for n in noise]


def natural(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = DIGITS[rng.integers(0, len(DIGITS), count)]
    labels = rng.integers(0, 10, count)
    sizes = rng.integers(1, 5, count)
    out, start = [], 0
    for size in sizes:
        if start >= count:
            break
        out.append((rows[start : start + size], labels[start : start + size]))
        start += size
    return out


def run(
    gate: InferenceGate,
    policy: ModelPolicy,
    requests: list[tuple[np.ndarray, np.ndarray]],
    *,
    deferred: bool,
) -> list[Alarm]:
    raised: list[Alarm] = []

    def sink(_key: str, _model: str, _policy: ModelPolicy, alarms: list[Alarm]) -> None:
        raised.extend(alarms)

    for x, label in requests:
        raised.extend(
            gate.observe(
                "k1",
                "m",
                1,
                policy,
                {"x": x},
                {"label": label},
                SIGNATURE,
                sink=sink if deferred else None,
            )
        )
    assert gate.feed.flush(timeout=30.0)
    return raised


ALERT = ModelPolicy(detect=frozenset({"prada", "nearcopy"}), on_alarm="alert")


@pytest.mark.parametrize(("requests", "detector"), [(walk(120), "prada"), (copies(40), "nearcopy")])
def test_deferred_feeding_still_raises_the_alarm(
    requests: list[tuple[np.ndarray, np.ndarray]], detector: str
) -> None:
    gate = InferenceGate(Admission())
    # Nothing comes back on the request path in alert mode, and the alarm reaches the sink
    # once the queue is fed (at most linger + one batch later).
    raised: list[Alarm] = []
    for x, label in requests:
        returned = gate.observe(
            "k1",
            "m",
            1,
            ALERT,
            {"x": x},
            {"label": label},
            SIGNATURE,
            sink=lambda _k, _m, _p, alarms: raised.extend(alarms),
        )
        assert returned == []
    assert gate.feed.flush(timeout=30.0)
    assert detector in {alarm.detector for alarm in raised}


def test_deferred_alarms_arrive_within_a_bounded_time_without_a_flush() -> None:
    gate = InferenceGate(Admission())
    arrived = threading.Event()

    def sink(_key: str, _model: str, _policy: ModelPolicy, alarms: list[Alarm]) -> None:
        if any(alarm.detector == "nearcopy" for alarm in alarms):
            arrived.set()

    for x, label in copies(40):
        gate.observe("k1", "m", 1, ALERT, {"x": x}, {"label": label}, SIGNATURE, sink=sink)
    # The feeder waits 100 ms for a batch; 10 s is a margin for a loaded machine.
    assert arrived.wait(10.0)


@pytest.mark.parametrize("requests", [walk(150), copies(60), natural(600, 7)])
def test_deferred_feeding_computes_what_synchronous_feeding_does(
    requests: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    states: list[InMemoryDetectorState] = []

    def factory(_namespace: str) -> InMemoryDetectorState:
        states.append(InMemoryDetectorState())
        return states[-1]

    at_once = InferenceGate(Admission(), state_factory=factory)
    sync_alarms = run(at_once, ALERT, requests, deferred=False)
    sync_states = list(states)
    states.clear()
    batched = InferenceGate(Admission(), state_factory=factory)
    # Hold the feeder so the whole stream is fed as one batch, the farthest from one by one.
    batched.feed = DeferredFeed(batched._feed_batch, linger=3600.0)
    deferred_alarms: list[Alarm] = []
    for x, label in requests:
        batched.observe(
            "k1",
            "m",
            1,
            ALERT,
            {"x": x},
            {"label": label},
            SIGNATURE,
            sink=lambda _k, _m, _p, alarms: deferred_alarms.extend(alarms),
        )
    batched.feed.drain()
    # The same history per detector, key by key...
    assert len(states) == len(sync_states) == 2
    for sync_state, batch_state in zip(sync_states, states, strict=True):
        sync_keys = dict(sync_state._clients["k1@1"])
        batch_keys = dict(batch_state._clients["k1@1"])
        assert sync_keys.keys() == batch_keys.keys()
        for key, value in sync_keys.items():
            np.testing.assert_array_equal(value, batch_keys[key], err_msg=key)
    # ...and the same verdict: an alarm of each detector iff one-by-one feeding raised one,
    # with the worst score of the stream (lowest W, most near-copies).
    for name, worst in (("prada", min), ("nearcopy", max)):
        sync_scores = [a.score for a in sync_alarms if a.detector == name]
        batch_scores = [a.score for a in deferred_alarms if a.detector == name]
        assert bool(sync_scores) == bool(batch_scores)
        if sync_scores:
            assert batch_scores == [worst(sync_scores)]


def test_prada_calls_fed_together_check_w_where_separate_calls_would() -> None:
    rng = np.random.default_rng(11)
    sizes = [int(s) for s in rng.integers(1, 40, 30)]
    x = DIGITS[rng.integers(0, len(DIGITS), sum(sizes))] + rng.normal(size=(sum(sizes), 64))
    labels = rng.integers(0, 3, sum(sizes))
    config = PradaConfig(min_samples=20, check_every=3)
    one_by_one = PradaDetector(config)
    scores, start = [], 0
    for size in sizes:
        score = one_by_one.observe("c", x[start : start + size], labels[start : start + size]).score
        if score is not None:
            scores.append(score)
        start += size
    together = PradaDetector(config).observe_calls("c", x, labels, sizes)
    assert together.score == min(scores)


def test_nearcopy_rows_fed_together_score_the_worst_of_separate_calls() -> None:
    rows = np.vstack([x for x, _ in copies(30)])
    one_by_one = NearCopyDetector(NearCopyConfig())
    worst = max(one_by_one.observe("c", row[None, :]).score or 0.0 for row in rows)
    assert NearCopyDetector(NearCopyConfig()).observe("c", rows).score == worst


def test_the_queue_is_bounded_drops_its_oldest_and_never_blocks() -> None:
    release = threading.Event()
    seen: list[list[int]] = []
    drops: list[int] = []

    def process(batch: list[int]) -> None:
        release.wait(30.0)
        seen.append(batch)

    feed: DeferredFeed[int] = DeferredFeed(
        process, capacity=8, linger=0.0, on_drop=lambda: drops.append(1)
    )
    feed.put(-1)  # the feeder takes it and blocks in process
    deadline = time.monotonic() + 10.0
    while feed.pending() and time.monotonic() < deadline:
        time.sleep(0.001)
    for item in range(100):
        feed.put(item)  # a blocked feeder never holds up a put
    assert feed.pending() == 8
    assert feed.dropped == len(drops) == 92
    release.set()
    assert feed.flush(timeout=30.0)
    # The newest items survive, in order.
    assert seen == [[-1], list(range(92, 100))]


def test_a_failing_batch_does_not_stop_the_feeder() -> None:
    seen: list[int] = []

    def process(batch: list[int]) -> None:
        if 0 in batch:
            raise RuntimeError("boom")
        seen.extend(batch)

    feed: DeferredFeed[int] = DeferredFeed(process, linger=0.0)
    feed.put(0)
    assert feed.flush(timeout=30.0)
    feed.put(1)
    assert feed.flush(timeout=30.0)
    assert seen == [1]


def test_throttle_and_block_are_fed_on_the_request_path() -> None:
    gate = InferenceGate(Admission())
    policy = ModelPolicy(detect=frozenset({"nearcopy"}), on_alarm="block")
    alarms: list[Alarm] = []
    for x, label in copies(40):
        alarms.extend(
            gate.observe(
                "k1",
                "m",
                1,
                policy,
                {"x": x},
                {"label": label},
                SIGNATURE,
                sink=lambda *_: pytest.fail("a blocking alarm went to the background"),
            )
        )
    assert gate.feed.pending() == 0
    assert "nearcopy" in {alarm.detector for alarm in alarms}


def test_the_queue_is_bounded_in_cost_too() -> None:
    feed: DeferredFeed[int] = DeferredFeed(lambda _batch: None, max_cost=100, linger=3600.0)
    for item in range(10):
        feed.put(item, cost=30)
    # Three items of 30 fit in 100; the seven oldest were forgotten.
    assert (feed.pending(), feed.dropped) == (3, 7)


def test_a_large_request_is_fed_on_the_request_path() -> None:
    gate = InferenceGate(Admission())
    policy = ModelPolicy(detect=frozenset({"nearcopy"}), on_alarm="alert")
    # One request of 40 noisy copies of 1,700 features: more elements than the queue takes.
    base = np.tile(DIGITS[5], 27)[:1700] + 1.0
    rows = base + np.random.default_rng(0).normal(size=(40, 1700)) * 0.001
    alarms = gate.observe(
        "k1",
        "m",
        1,
        policy,
        {"x": rows},
        {"label": np.ones(40, dtype=np.int64)},
        SIGNATURE,
        sink=lambda *_: pytest.fail("a large request went to the queue"),
    )
    assert gate.feed.pending() == 0
    assert "nearcopy" in {alarm.detector for alarm in alarms}
