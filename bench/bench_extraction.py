"""Model extraction against modelkeep's defences: output hardening, PRADA and the OOD monitor.

The target is a small neural network (scikit-learn MLP) trained on the digits data set (8x8
images, 1797 natural samples), exported with skl2onnx and run by ``OnnxModel``, exactly as the
server runs it; every answer goes through ``harden`` with the policy under test. Disjoint pools
of natural rows: the target's training rows, the attacker's rows, calibration clients' rows,
and held-out rows that benign clients replay and on which fidelity is measured.

Attacks (each a budget of queries, deterministic seeds):

* natural: the attacker owns natural rows of the task (a 300-row pool) and queries them all;
* jacobian: Papernot et al. 2017, two natural seed rows per class, then rounds of
  ``x + 0.1 * range * sign(gradient)`` of a surrogate, until the budget is spent.

The attacker's surrogate is a logistic regression fitted on what the API returned: the score
rows as soft labels when there are scores (distillation), the labels otherwise. "logit fit" is
a second attacker on the natural rows that regresses a linear model on log-scores, the kind of
attacker reverse_sigmoid is designed to mislead. Fidelity is the share of held-out rows on which
the surrogate's top-1 agrees with the target's.

Detection does not depend on the policy (PRADA and the OOD monitor see the queries and the
model's label, which every policy keeps), so it is a second table: queries until the first
alarm (one request per round for Jacobian, one query per request otherwise), and false alarms
among 50 benign clients replaying 300 held-out natural rows each.

Usage: python bench/bench_extraction.py [--budget 300]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier

from modelkeep.guard.detection import (
    OodMonitor,
    OodReference,
    PradaConfig,
    PradaDetector,
    calibrate_prada,
)
from modelkeep.guard.hardening import OutputPolicy, harden
from modelkeep.runtime.onnx import OnnxModel

POLICIES = ["full", "top_k=3", "top_k=1", "round=2", "round=1", "reverse_sigmoid",
            "reverse_sigmoid=3.0:0.5", "label_only"]  # fmt: skip
CLASSES = 10
BENIGN_CLIENTS = 50
STEP = 1.6  # Papernot's 0.1 of the input range; digits pixels are 0..16

Answer = tuple[np.ndarray, np.ndarray | None]  # labels, score rows (None under label_only)


@dataclass(frozen=True)
class World:
    model: OnnxModel
    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    attacker: np.ndarray
    calibration: np.ndarray
    held_out: np.ndarray

    def ask(self, rows: np.ndarray, policy: OutputPolicy) -> Answer:
        outputs = self.model.run({"input": np.asarray(rows, dtype=np.float32)})
        shown = harden(policy, outputs, score_outputs=["probabilities"])
        scores = shown.get("probabilities")
        return shown["label"], None if scores is None else scores.astype(np.float64)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self.ask(rows, OutputPolicy("label_only"))[0]


def build_world() -> World:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    train, attacker, calibration, held_out = np.split(order, [600, 900, 1300])
    network = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        network.fit(x[train] / 16.0, y[train])
    # The network was trained on x / 16; fold the scaling into the first layer so the served
    # model takes raw pixels like every other client-facing input here.
    network.coefs_[0] = network.coefs_[0] / 16.0
    onnx_model = convert_sklearn(
        network,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(network): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    model = OnnxModel.load(onnx_model.SerializeToString())
    return World(model, x.astype(np.float64), y, train, attacker, calibration, held_out)


# --- surrogates ---------------------------------------------------------------------------


class Surrogate:
    """The attacker's model: a logistic regression on pixels scaled to 0..1."""

    def __init__(self) -> None:
        self.model = LogisticRegression(max_iter=500)

    def fit(
        self, rows: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
    ) -> Surrogate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(rows / 16.0, labels, sample_weight=weights)
        return self

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(rows / 16.0))

    def gradient_sign(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """sign(d p_label / dx): the direction Papernot's augmentation steps along."""
        model = self.model
        probabilities = model.predict_proba(rows / 16.0)
        own = model.coef_[np.searchsorted(model.classes_, labels)]
        return np.sign(own - probabilities @ model.coef_)


def fit_surrogate(rows: np.ndarray, answer: Answer) -> Surrogate:
    """Distillation when scores are shown (soft labels as per-class sample weights), else
    plain labels. Scores that are not a distribution (zeroed by top_k) are renormalized."""
    labels, scores = answer
    surrogate = Surrogate()
    if scores is None:
        if len(np.unique(labels)) < 2:
            raise RuntimeError("the attacker saw a single class")
        return surrogate.fit(rows, labels)
    weights = np.clip(scores, 0.0, None)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    repeated = np.repeat(np.arange(CLASSES)[None, :], len(rows), axis=0)
    keep = weights.ravel() > 0
    return surrogate.fit(
        np.repeat(rows, CLASSES, axis=0)[keep], repeated.ravel()[keep], weights.ravel()[keep]
    )


def logit_fit(rows: np.ndarray, answer: Answer) -> Callable[[np.ndarray], np.ndarray]:
    """A linear model of the log-scores (what exact probabilities of a softmax give away)."""
    scores = answer[1]
    if scores is None:
        surrogate = fit_surrogate(rows, answer)
        return surrogate.predict
    logs = np.log(np.clip(scores, 1e-6, 1.0))
    regression = Ridge(alpha=1.0).fit(rows / 16.0, logs - logs.mean(axis=1, keepdims=True))
    return lambda x: np.argmax(regression.predict(x / 16.0), axis=1)


def fidelity(world: World, predict: Callable[[np.ndarray], np.ndarray]) -> float:
    rows = world.x[world.held_out]
    return float(np.mean(predict(rows) == world.labels(rows)))


# --- attacks ------------------------------------------------------------------------------


def natural_rows(world: World, budget: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    pool = world.attacker
    return world.x[rng.choice(pool, min(budget, len(pool)), replace=False)]


def jacobian_attack(
    world: World,
    policy: OutputPolicy,
    budget: int,
    *,
    seeds_per_class: int = 2,
    step: float = STEP,
    seed: int = 0,
) -> tuple[list[np.ndarray], Surrogate]:
    """Papernot's augmentation; returns the requests sent and the final surrogate."""
    rng = np.random.default_rng(seed)
    pool = world.attacker
    first = np.concatenate(
        [rng.choice(pool[world.y[pool] == k], seeds_per_class, replace=False) for k in range(10)]
    )
    known = world.x[first]
    labels, scores = world.ask(known, policy)
    requests = [known]
    while len(known) < budget:
        surrogate = fit_surrogate(known, (labels, scores))
        fresh = known + step * surrogate.gradient_sign(known, labels)
        fresh = np.clip(fresh, 0.0, 16.0)[: budget - len(known)]
        fresh_labels, fresh_scores = world.ask(fresh, policy)
        requests.append(fresh)
        known = np.vstack([known, fresh])
        labels = np.concatenate([labels, fresh_labels])
        scores = None if scores is None else np.vstack([scores, fresh_scores])
    return requests, fit_surrogate(known, (labels, scores))


def bisection_requests(world: World, budget: int, *, steps: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    pool = world.x[world.attacker]
    pool_labels = world.labels(pool)
    requests: list[np.ndarray] = []
    while len(requests) < budget:
        a, b = rng.choice(len(pool), 2, replace=False)
        if pool_labels[a] == pool_labels[b]:
            continue
        inside, outside = pool[a], pool[b]
        for _ in range(steps):
            middle = (inside + outside) / 2
            requests.append(middle[None, :])
            if world.labels(middle[None, :])[0] == pool_labels[a]:
                inside = middle
            else:
                outside = middle
    return requests[:budget]


def benign_stream(world: World, pool: np.ndarray, seed: int, length: int = 300) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return world.x[rng.choice(pool, min(length, len(pool)), replace=False)]


# --- detection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """One client's verdicts per request: queries sent so far, PRADA's W, the OOD alarm."""

    sent: list[int]
    w: list[float | None]
    ood: list[bool]

    def prada_alarm_at(self, threshold: float) -> int | None:
        # The detector's state does not depend on its threshold: one pass serves every one.
        hits = (
            n for n, w in zip(self.sent, self.w, strict=True) if w is not None and w < threshold
        )
        return next(hits, None)

    def ood_alarm_at(self) -> int | None:
        return next((n for n, hit in zip(self.sent, self.ood, strict=True) if hit), None)

    def lowest_w(self) -> float:
        return min((w for w in self.w if w is not None), default=float("nan"))


def trace(world: World, reference: OodReference, requests: Sequence[np.ndarray]) -> Trace:
    prada = PradaDetector(PradaConfig(threshold=0.0))
    monitor = OodMonitor(reference)
    result = Trace([], [], [])
    for rows in requests:
        result.sent.append((result.sent[-1] if result.sent else 0) + len(rows))
        result.w.append(prada.observe("c", rows, world.labels(rows)).score)
        result.ood.append(monitor.observe("c", rows).alarm)
    return result


def when(at: int | None, total: int) -> str:
    return f"none in {total}" if at is None else str(at)


def one_per_request(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[i : i + 1] for i in range(len(rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=300, help="queries per attacker")
    budget = parser.parse_args().budget
    started = time.perf_counter()
    world = build_world()
    held = world.x[world.held_out]
    accuracy = float(np.mean(world.labels(held) == world.y[world.held_out]))
    streams = [benign_stream(world, world.calibration, 500 + i) for i in range(100)]
    calibrated = calibrate_prada([(s, world.labels(s)) for s in streams])
    default = PradaConfig().threshold
    reference = OodMonitor.fit(world.x[world.train])
    print(f"target: MLP(64) on digits, held-out accuracy {accuracy:.3f}; budget {budget} queries")
    print(
        f"PRADA: default threshold {default:.2f}; calibrated on 100 benign clients of a separate "
        f"pool: {calibrated:.3f}. OOD reference fitted on the target's training rows."
    )
    print()

    header = ("policy", "benign top-1 kept", "natural: distill", "natural: logit fit",
              "jacobian: distill", "jacobian: PRADA alarm", "jacobian: OOD alarm")  # fmt: skip
    table = [header]
    natural = natural_rows(world, budget)
    truth = world.labels(held)
    for text in POLICIES:
        policy = OutputPolicy.parse(text)
        labels, scores = world.ask(held, policy)
        top1 = labels if scores is None else np.argmax(scores, axis=1)
        answer = world.ask(natural, policy)
        distilled = fit_surrogate(natural, answer)
        # The Jacobian attacker's queries depend on what it is shown, so detection is per policy.
        requests, jacobian_surrogate = jacobian_attack(world, policy, budget)
        run = trace(world, reference, requests)
        table.append(
            (
                text,
                f"{float(np.mean(top1 == truth)):.1%}",
                f"{fidelity(world, distilled.predict):.1%}",
                f"{fidelity(world, logit_fit(natural, answer)):.1%}",
                f"{fidelity(world, jacobian_surrogate.predict):.1%}",
                when(run.prada_alarm_at(default), run.sent[-1]),
                when(run.ood_alarm_at(), run.sent[-1]),
            )
        )
    print("Surrogate fidelity (agreement with the target on held-out rows) by output policy")
    print_table(table)
    # Every policy keeps the top-1 class, so an attacker who trains on argmax of whatever it
    # gets is unaffected by the policy: its fidelity is the label_only row, whatever is set.
    labels_only = OutputPolicy("label_only")
    plain = fit_surrogate(natural, world.ask(natural, labels_only))
    argmax_jacobian = fidelity(world, jacobian_attack(world, labels_only, budget)[1].predict)
    print(
        "An attacker training on the argmax of any policy's scores gets the label_only figures "
        f"under every policy: natural {fidelity(world, plain.predict):.1%}, "
        f"jacobian {argmax_jacobian:.1%}."
    )
    print()

    full = OutputPolicy("full")
    attacks: list[tuple[str, list[np.ndarray]]] = [
        ("natural rows, 1 per request", one_per_request(natural)),
        ("jacobian 2 seeds/class, step 1.6", jacobian_attack(world, full, budget)[0]),
        ("jacobian 5 seeds/class, step 3.2",
         jacobian_attack(world, full, budget, seeds_per_class=5, step=3.2)[0]),
        ("  same, 4x the budget",
         jacobian_attack(world, full, 4 * budget, seeds_per_class=5, step=3.2)[0]),
        ("bisection probe, 1 per request", bisection_requests(world, budget)),
    ]  # fmt: skip
    detection = [("client (policy full)", "lowest W", f"PRADA W<{default:.2f} (default)",
                  f"PRADA W<{calibrated:.3f} (calibrated)", "OOD monitor")]  # fmt: skip
    for name, requests in attacks:
        run = trace(world, reference, requests)
        total = run.sent[-1]
        detection.append(
            (
                name,
                f"{run.lowest_w():.3f}",
                when(run.prada_alarm_at(default), total),
                when(run.prada_alarm_at(calibrated), total),
                when(run.ood_alarm_at(), total),
            )
        )
    benign = [
        trace(world, reference, one_per_request(benign_stream(world, world.held_out, i)))
        for i in range(BENIGN_CLIENTS)
    ]
    detection.append(
        (
            f"{BENIGN_CLIENTS} benign clients: false alarms",
            f"{min(run.lowest_w() for run in benign):.3f}",
            f"{sum(run.prada_alarm_at(default) is not None for run in benign)}/{BENIGN_CLIENTS}",
            f"{sum(run.prada_alarm_at(calibrated) is not None for run in benign)}/{BENIGN_CLIENTS}",
            f"{sum(run.ood_alarm_at() is not None for run in benign)}/{BENIGN_CLIENTS}",
        )
    )
    print("Queries until the first alarm (detectors see queries and labels; labels are the same")
    print("under every policy, so only the Jacobian attacker's own choices vary with it)")
    print_table(detection)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
