"""Extraction detection against real attacks on a real model.

The target is a logistic regression trained on scikit-learn's digits (8x8 images, 64 features,
1797 natural samples), exported with skl2onnx and queried through ``OnnxModel``. Digits rather
than iris: iris has 150 rows, too few for 50 benign clients to replay *natural* held-out samples
without inventing some (jitter would be synthetic data, which is what the attacks send), while
digits has hundreds of held-out natural rows per pool. Every random choice has a fixed seed.

Pools are disjoint: the target trains on ``train``; attackers start from ``attacker``;
calibration clients replay ``calibration``; the evaluated benign clients replay ``benign``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.guard.detection import (
    DetectionResult,
    InMemoryDetectorState,
    OodMonitor,
    OodReference,
    PradaConfig,
    PradaDetector,
    calibrate_prada,
    shapiro_w,
)
from modelkeep.runtime.onnx import OnnxModel

BUDGET = 300
BENIGN_CLIENTS = 50


@dataclass(frozen=True)
class World:
    target: OnnxModel
    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    attacker: np.ndarray
    calibration: np.ndarray
    benign: np.ndarray

    def label(self, rows: np.ndarray) -> np.ndarray:
        return self.target.run({"input": np.asarray(rows, dtype=np.float32)})["label"]


@pytest.fixture(scope="module")
def world() -> World:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    train, attacker, calibration, benign = np.split(order, [700, 900, 1300])
    classifier = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    onnx_model = convert_sklearn(
        classifier,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    target = OnnxModel.load(onnx_model.SerializeToString())
    world = World(target, x.astype(np.float64), y, train, attacker, calibration, benign)
    assert float(np.mean(world.label(x[benign]) == y[benign])) > 0.9
    return world


Request = tuple[np.ndarray, np.ndarray]


def benign_requests(world: World, pool: np.ndarray, seed: int) -> list[Request]:
    """A benign client: BUDGET natural rows of ``pool`` in random order, 1-8 rows a request."""
    rng = np.random.default_rng(1000 + seed)
    rows = world.x[rng.choice(pool, BUDGET, replace=False)]
    labels = world.label(rows)
    requests, start = [], 0
    while start < BUDGET:
        size = int(rng.integers(1, 9))
        requests.append((rows[start : start + size], labels[start : start + size]))
        start += size
    return requests


def jacobian_requests(
    world: World, *, step: float = 1.6, seed: int = 0, seeds_per_class: int = 2
) -> list[Request]:
    """Papernot et al. 2017: a surrogate trained on the target's labels, grown each round by
    ``x + step * sign(d p_label / dx)`` of the surrogate. A few natural seed rows per class; the
    step is their 0.1 of the feature range (pixels are 0..16). One request per round."""
    rng = np.random.default_rng(seed)
    pool = world.attacker
    seeds = [
        rng.choice(pool[world.y[pool] == k], seeds_per_class, replace=False) for k in range(10)
    ]
    known = world.x[np.concatenate(seeds)]
    labels = world.label(known)
    requests = [(known, labels)]
    while len(known) < BUDGET:
        surrogate = LogisticRegression(max_iter=500).fit(known, labels)
        probabilities = surrogate.predict_proba(known)
        own = surrogate.coef_[np.searchsorted(surrogate.classes_, labels)]
        gradient = own - probabilities @ surrogate.coef_  # d softmax_label / dx, up to p > 0
        fresh = np.clip(known + step * np.sign(gradient), 0.0, 16.0)
        fresh_labels = world.label(fresh)
        requests.append((fresh, fresh_labels))
        known, labels = np.vstack([known, fresh]), np.concatenate([labels, fresh_labels])
    return _truncate(requests)


def bisection_requests(world: World, *, seed: int = 0, steps: int = 8) -> list[Request]:
    """Boundary probing: bisect between natural rows the target labels differently, one
    query per request, each query chosen from the last answer."""
    rng = np.random.default_rng(seed)
    pool = world.x[world.attacker]
    pool_labels = world.label(pool)
    requests: list[Request] = []
    while len(requests) < BUDGET:
        a, b = rng.choice(len(pool), 2, replace=False)
        if pool_labels[a] == pool_labels[b]:
            continue
        inside, outside = pool[a], pool[b]
        for _ in range(steps):
            middle = (inside + outside) / 2
            answer = world.label(middle[None, :])
            requests.append((middle[None, :], answer))
            if answer[0] == pool_labels[a]:
                inside = middle
            else:
                outside = middle
    return requests[:BUDGET]


def _truncate(requests: list[Request]) -> list[Request]:
    kept, total = [], 0
    for rows, labels in requests:
        take = min(len(rows), BUDGET - total)
        kept.append((rows[:take], labels[:take]))
        total += take
        if total == BUDGET:
            break
    return kept


def replay(
    detector: PradaDetector, client: str, requests: list[Request]
) -> Iterator[tuple[int, DetectionResult]]:
    """Each request's verdict, with the number of queries sent so far."""
    sent = 0
    for rows, labels in requests:
        sent += len(rows)
        yield sent, detector.observe(client, rows, labels)


def queries_until_alarm(detector: PradaDetector, requests: list[Request]) -> int | None:
    return next((sent for sent, result in replay(detector, "x", requests) if result.alarm), None)


def lowest_score(detector: PradaDetector, requests: list[Request]) -> float:
    scores = [result.score for _, result in replay(detector, "x", requests)]
    return min(score for score in scores if score is not None)


@pytest.fixture(scope="module")
def benign_clients(world: World) -> list[list[Request]]:
    return [benign_requests(world, world.benign, seed) for seed in range(BENIGN_CLIENTS)]


@pytest.fixture(scope="module")
def calibrated(world: World) -> float:
    streams = []
    for seed in range(2 * BENIGN_CLIENTS):
        requests = benign_requests(world, world.calibration, 500 + seed)
        streams.append(
            (np.vstack([r for r, _ in requests]), np.concatenate([p for _, p in requests]))
        )
    return calibrate_prada(streams)


@pytest.fixture(scope="module")
def attacks(world: World) -> dict[str, list[Request]]:
    return {"jacobian": jacobian_requests(world), "bisection": bisection_requests(world)}


# --- PRADA against attackers and benign clients -------------------------------------------


@pytest.mark.parametrize("attack", ["jacobian", "bisection"])
def test_attackers_are_flagged_within_300_queries_by_the_default_config(
    attacks: dict[str, list[Request]], attack: str
) -> None:
    sent = queries_until_alarm(PradaDetector(PradaConfig()), attacks[attack])
    assert sent is not None
    assert sent <= BUDGET


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jacobian_attackers_from_other_seed_rows_are_flagged_too(world: World, seed: int) -> None:
    requests = jacobian_requests(world, seed=seed)
    assert queries_until_alarm(PradaDetector(PradaConfig()), requests) is not None


def test_fifty_benign_clients_replaying_natural_rows_raise_no_alarm(
    benign_clients: list[list[Request]],
) -> None:
    detector = PradaDetector(PradaConfig())
    alarms = [
        client
        for client, requests in enumerate(benign_clients)
        for _, result in replay(detector, f"benign-{client}", requests)
        if result.alarm
    ]
    assert alarms == []


def test_calibrated_threshold_separates_benign_clients_from_attackers(
    calibrated: float, benign_clients: list[list[Request]], attacks: dict[str, list[Request]]
) -> None:
    config = PradaConfig(threshold=calibrated)
    assert 0.5 < calibrated < 1.0
    benign_lowest = min(lowest_score(PradaDetector(config), r) for r in benign_clients)
    assert benign_lowest > calibrated
    for requests in attacks.values():
        sent = queries_until_alarm(PradaDetector(config), requests)
        assert sent is not None
        assert sent <= BUDGET


def test_packing_the_attack_into_one_request_does_not_hide_it(
    attacks: dict[str, list[Request]],
) -> None:
    rows = np.vstack([r for r, _ in attacks["jacobian"]])
    labels = np.concatenate([p for _, p in attacks["jacobian"]])
    assert len(rows) == BUDGET
    result = PradaDetector(PradaConfig()).observe("x", rows, labels)
    assert result.alarm


def test_calibration_allowing_false_alarms_gives_a_higher_threshold(world: World) -> None:
    streams = []
    for seed in range(10):
        requests = benign_requests(world, world.calibration, 900 + seed)
        streams.append(
            (np.vstack([r for r, _ in requests]), np.concatenate([p for _, p in requests]))
        )
    strict = calibrate_prada(streams)
    lenient = calibrate_prada(streams, target_false_alarm=0.5)
    no_margin = calibrate_prada(streams, margin=0.0)
    assert strict < lenient
    assert no_margin - 0.10 == pytest.approx(strict)


def test_calibration_refuses_streams_too_short_to_score() -> None:
    rows = np.random.default_rng(0).normal(size=(30, 4))
    with pytest.raises(InvalidInput):
        calibrate_prada([(rows, np.zeros(30, dtype=np.int64))])


# --- state, bounds and bookkeeping -------------------------------------------------------


def test_clients_are_judged_independently(
    attacks: dict[str, list[Request]], benign_clients: list[list[Request]]
) -> None:
    detector = PradaDetector(PradaConfig())
    attack_results = [r.alarm for _, r in replay(detector, "attacker", attacks["bisection"])]
    benign_results = [r.alarm for _, r in replay(detector, "honest", benign_clients[0])]
    assert any(attack_results)
    assert not any(benign_results)


def test_reset_forgets_a_client(attacks: dict[str, list[Request]]) -> None:
    detector = PradaDetector(PradaConfig())
    last = list(replay(detector, "x", attacks["bisection"]))[-1][1]
    assert last.samples > 0
    detector.reset("x")
    rows, labels = attacks["bisection"][0]
    assert detector.observe("x", rows, labels) == DetectionResult(False, None, 0)


def test_two_detectors_sharing_a_state_see_one_stream(attacks: dict[str, list[Request]]) -> None:
    shared = InMemoryDetectorState()
    replicas = [PradaDetector(PradaConfig(), state=shared) for _ in range(2)]
    alone = PradaDetector(PradaConfig())
    for index, (rows, labels) in enumerate(attacks["jacobian"] + attacks["bisection"]):
        expected = alone.observe("x", rows, labels)
        assert expected == replicas[index % 2].observe("x", rows, labels)


def test_a_custom_state_store_receives_namespaced_keys() -> None:
    class Recording(InMemoryDetectorState):
        def __init__(self) -> None:
            super().__init__()
            self.keys: set[str] = set()

        def put(self, client: str, key: str, value: np.ndarray) -> None:
            self.keys.add(key)
            super().put(client, key, value)

    state = Recording()
    rows = np.random.default_rng(1).normal(size=(40, 3))
    PradaDetector(PradaConfig(), state=state).observe("c", rows, np.arange(40) % 2)
    classes = {f"prada/{kind}/{label}" for kind in "gt" for label in (0, 1)}
    assert state.keys == {"prada/d", "prada/classes", *classes}


def test_memory_per_client_is_bounded() -> None:
    config = PradaConfig(min_samples=10, max_samples=300, max_growing=20, max_classes=4)
    state = InMemoryDetectorState()
    detector = PradaDetector(config, state=state)
    rng = np.random.default_rng(2)
    features = 16
    for _ in range(20):
        rows = rng.normal(size=(250, features)) * rng.uniform(0.1, 10.0)
        detector.observe("c", rows, rng.integers(0, 9, size=250))
    # + 3: the counts (classes, distances recorded, recorded at the last check of W)
    bound = config.max_samples + config.max_classes * (config.max_growing * (features + 1) + 1) + 3
    assert 0 < state.size("c") <= bound
    assert len(state.get("c", "prada/d")) == config.max_samples  # type: ignore[arg-type]


def test_one_call_of_many_rows_grows_the_sets_as_one_row_calls_do() -> None:
    """A call's rows are measured a block at a time (guard/_prada.py, ``_grow``); a call of
    one row is the row-by-row update itself. Both must leave the same state and lowest W,
    with sets that evict members, a class limit, exact repeats and non-finite rows."""
    config = PradaConfig(min_samples=5, max_samples=60, max_growing=3, max_classes=2)
    rng = np.random.default_rng(11)
    rows = np.round(rng.normal(size=(300, 3)), 1)
    rows[rng.random(300) < 0.05, 1] = np.nan
    rows[150:160] = rows[140]  # exact repeats
    labels = rng.integers(0, 3, size=300)
    one_by_one_state, at_once_state = InMemoryDetectorState(), InMemoryDetectorState()
    one_by_one = PradaDetector(config, state=one_by_one_state)
    scores = [
        one_by_one.observe("c", row[None, :], label[None]).score
        for row, label in zip(rows, labels, strict=True)
    ]
    at_once = PradaDetector(config, state=at_once_state)
    result = at_once.observe_calls("c", rows, labels, [1] * len(rows))
    assert result.score == min(score for score in scores if score is not None)
    assert result.alarm == (result.score is not None and result.score < config.threshold)
    expected, actual = dict(one_by_one_state._clients["c"]), dict(at_once_state._clients["c"])
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        np.testing.assert_array_equal(value, actual[key], err_msg=key)
    assert int(actual["prada/classes"][0]) == 2  # the class limit held
    assert len([key for key in actual if key.startswith("prada/g/")]) == 2


def test_exact_repeats_are_not_recorded() -> None:
    detector = PradaDetector(PradaConfig())
    row = np.arange(8, dtype=np.float64)[None, :]
    for _ in range(100):
        result = detector.observe("c", row, np.asarray([3]))
    assert result == DetectionResult(alarm=False, score=None, samples=0)


def test_a_fixed_step_walk_is_flagged() -> None:
    # Growing-set distances of a straight walk alternate between one and two steps.
    walk = np.outer(np.arange(80), np.ones(4))
    result = PradaDetector(PradaConfig()).observe("c", walk, np.zeros(80, dtype=np.int64))
    assert (result.alarm, result.samples) == (True, 79)
    assert result.score is not None
    assert result.score < 0.7


def test_string_labels_are_tracked_per_class() -> None:
    rows = np.random.default_rng(3).normal(size=(60, 5))
    labels = np.asarray(["cat", "dog", "bird/../x"] * 20, dtype=object)
    state = InMemoryDetectorState()
    result = PradaDetector(PradaConfig(), state=state).observe("c", rows, labels)
    assert result.samples == 57
    # classes tracked, distances recorded, recorded when W was last checked
    assert state.get("c", "prada/classes").tolist() == [3.0, 57.0, 57.0]  # type: ignore[union-attr]


def test_rows_with_non_finite_values_are_ignored() -> None:
    rows = np.random.default_rng(4).normal(size=(60, 5))
    rows[::2, 0] = np.nan
    result = PradaDetector(PradaConfig()).observe("c", rows, np.zeros(60, dtype=np.int64))
    assert result.samples == 29


def test_a_change_in_feature_count_is_refused() -> None:
    detector = PradaDetector(PradaConfig())
    detector.observe("c", np.ones((2, 4)) * [[0], [1]], np.asarray([1, 1]))
    with pytest.raises(InvalidInput):
        detector.observe("c", np.ones((1, 5)), np.asarray([1]))


@pytest.mark.parametrize(
    ("x", "predicted"),
    [
        (np.ones(4), np.asarray([1])),
        (np.ones((0, 4)), np.zeros(0, dtype=np.int64)),
        (np.ones((3, 4)), np.asarray([1, 2])),
        (np.asarray([["a", "b"]]), np.asarray([1])),
        (np.ones((2, 4)), np.asarray([0.5, 1.5])),
        (np.ones((2, 4)), np.ones((2, 2), dtype=np.int64)),
    ],
)
def test_malformed_queries_are_refused(x: np.ndarray, predicted: np.ndarray) -> None:
    with pytest.raises(InvalidInput):
        PradaDetector(PradaConfig()).observe("c", x, predicted)


def test_an_empty_client_name_is_refused() -> None:
    with pytest.raises(InvalidInput):
        PradaDetector(PradaConfig()).observe("", np.ones((1, 2)), np.asarray([0]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.5},
        {"threshold": -0.1},
        {"threshold": float("nan")},
        {"min_samples": 2},
        {"max_samples": 10},
        {"max_samples": 6000},
        {"max_growing": 0},
        {"max_classes": 0},
        {"checks_per_call": 0},
        {"min_samples": 50.0},
    ],
)
def test_prada_config_out_of_range_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PradaConfig(**kwargs)  # type: ignore[arg-type]


def test_shapiro_w_is_high_for_normal_samples_and_low_for_spikes() -> None:
    rng = np.random.default_rng(5)
    assert shapiro_w(rng.normal(size=200)) > 0.98
    spiky = np.concatenate([np.full(150, 2.0), rng.normal(10.0, 0.1, size=50)])
    assert shapiro_w(spiky) < 0.7
    assert shapiro_w(np.full(10, 3.0)) == 0.0


@pytest.mark.parametrize("size", [2, 5001])
def test_shapiro_w_refuses_sizes_scipy_would_warn_about(size: int) -> None:
    # W is computed without a warning filter: sizes scipy warns about must not reach it.
    with pytest.raises(InvalidInput, match="3 to 5000"):
        shapiro_w(np.random.default_rng(0).normal(size=size))


def test_in_memory_state_forgets_the_least_recent_client_past_its_limit() -> None:
    state = InMemoryDetectorState(max_clients=2)
    state.put("a", "k", np.ones(1))
    state.put("b", "k", np.ones(1))
    assert state.get("a", "k") is not None  # "a" is now the most recent
    state.put("c", "k", np.ones(1))
    assert (state.clients(), state.get("b", "k")) == (2, None)
    stored = state.get("a", "k")
    assert stored is not None
    assert not stored.flags.writeable


# --- OOD monitor ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(world: World) -> OodReference:
    return OodMonitor.fit(world.x[world.train])


def test_ood_reference_survives_a_json_round_trip(world: World, reference: OodReference) -> None:
    text = orjson.dumps(reference.to_json())
    restored = OodReference.from_json(orjson.loads(text))
    rows = world.x[world.benign]
    assert (restored.kind, restored.threshold, restored.quantile) == (
        reference.kind,
        reference.threshold,
        reference.quantile,
    )
    assert reference.distances(rows).tolist() == restored.distances(rows).tolist()


def test_ood_threshold_leaves_few_natural_held_out_rows_beyond_it(
    world: World, reference: OodReference
) -> None:
    assert reference.kind == "mahalanobis"
    beyond = float(np.mean(reference.distances(world.x[world.benign]) > reference.threshold))
    assert beyond < 0.05


def test_ood_benign_clients_raise_no_alarm(
    reference: OodReference, benign_clients: list[list[Request]]
) -> None:
    monitor = OodMonitor(reference)
    alarms = [
        client
        for client, requests in enumerate(benign_clients)
        for rows, _ in requests
        if monitor.observe(f"benign-{client}", rows).alarm
    ]
    assert alarms == []


def test_ood_flags_large_step_jacobian_and_noise_clients(
    world: World, reference: OodReference
) -> None:
    # Steps of twice Papernot's size keep PRADA's distances looking natural; they leave the
    # data manifold instead, which is what this monitor sees.
    requests = jacobian_requests(world, step=3.2)
    monitor = OodMonitor(reference)
    assert any(monitor.observe("jacobian", rows).alarm for rows, _ in requests)
    noise = np.random.default_rng(6).uniform(0.0, 16.0, size=(40, 64))
    result = OodMonitor(reference).observe("noise", noise)
    assert result == DetectionResult(alarm=True, score=1.0, samples=40)


def test_ood_counts_non_finite_rows_as_far_and_resets(reference: OodReference) -> None:
    monitor = OodMonitor(reference, min_samples=5, window=10)
    result = monitor.observe("c", np.full((6, 64), np.nan))
    assert result == DetectionResult(alarm=True, score=1.0, samples=6)
    monitor.reset("c")
    assert monitor.observe("c", np.full((1, 64), np.inf)) == DetectionResult(False, None, 1)


def test_ood_window_keeps_only_the_latest_queries(world: World, reference: OodReference) -> None:
    monitor = OodMonitor(reference, window=30, min_samples=30)
    monitor.observe("c", np.full((30, 64), 100.0))
    result = monitor.observe("c", world.x[world.benign[:30]])
    assert result.samples == 30
    assert result.score is not None
    assert result.score < 0.2
    assert not result.alarm


def test_ood_diagonal_reference_for_wide_inputs_round_trips() -> None:
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(60, 600))
    rows[:, 5] = 0.0  # a constant feature must not make distances infinite
    reference = OodMonitor.fit(rows)
    assert reference.kind == "diagonal"
    restored = OodReference.from_json(orjson.loads(orjson.dumps(reference.to_json())))
    probe = rng.normal(size=(5, 600))
    assert reference.distances(probe).tolist() == restored.distances(probe).tolist()
    assert bool(np.all(np.isfinite(reference.distances(probe))))


def test_ood_rejects_queries_of_the_wrong_width(reference: OodReference) -> None:
    with pytest.raises(InvalidInput):
        OodMonitor(reference).observe("c", np.ones((2, 63)))


@pytest.mark.parametrize(
    "change",
    [
        {"format": "other/1"},
        {"kind": "cosine"},
        {"mean": "0,0"},
        {"mean": []},
        {"mean": [True] * 64},
        {"mean": ["1"] * 64},
        {"matrix": [[1.0] * 64] * 63},
        {"matrix": [[1.0] * 64] * 63 + [[1.0] * 63]},
        {"matrix": [[float("nan")] * 64] * 64},
        {"threshold": -1.0},
        {"threshold": float("inf")},
        {"threshold": "5"},
        {"quantile": 1.0},
        {"quantile": None},
    ],
)
def test_ood_reference_json_that_to_json_could_not_write_is_refused(
    reference: OodReference, change: dict[str, object]
) -> None:
    data = {**reference.to_json(), **change}
    with pytest.raises(InvalidInput):
        OodReference.from_json(data)


@pytest.mark.parametrize(
    ("rows", "kwargs"),
    [
        (np.ones((10, 3)), {}),
        (np.ones((40, 3)), {}),
        (np.full((40, 3), np.nan), {}),
        (np.random.default_rng(0).normal(size=(40, 3)), {"quantile": 1.0}),
        (np.random.default_rng(0).normal(size=(40, 3)), {"covariance": "sparse"}),
    ],
)
def test_ood_fit_refuses_unusable_reference_rows(
    rows: np.ndarray, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidInput):
        OodMonitor.fit(rows, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"max_rate": 1.0}, {"window": 0}, {"min_samples": 200}, {"max_rate": -0.1}]
)
def test_ood_monitor_settings_out_of_range_are_config_errors(
    reference: OodReference, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ConfigError):
        OodMonitor(reference, **kwargs)  # type: ignore[arg-type]
