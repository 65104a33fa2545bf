"""Membership inference against modelkeep's output policies: the shadow-model likelihood-ratio
attack (LiRA, Carlini et al. 2022, "Membership Inference Attacks From First Principles").

Targets: an over-fitting gradient-boosted tree ensemble and an MLP, each trained on a random
half of scikit-learn's digits (1797 rows, shipped with scikit-learn, no download), exported to
ONNX with skl2onnx, pushed to a real ``modelkeep serve`` and queried over HTTPS with a consumer
key, once with the model's defaults (no policy set) and once per output policy (set with the
admin key, which is what ``modelkeep policy set MODEL --output P`` does).

The attack, as in the paper (section IV):

1. Train ``--shadows`` shadow models of the same architecture, each on a random half of the
   data (so each row is "in" about half of them). Paper: 256 or more; we use 16 by default
   (``--shadows``) so that a run takes minutes on two shared cores.
2. For every row ``(x, y)`` and every model, take the score of the true class ``p = f(x)_y``
   as the API shows it and scale it by ``phi = log(p) - log(sum of the other scores)`` (the
   paper's stable logit of the true-class confidence). The attacker knows the output policy
   and applies the same hardening to its shadows' scores, so the Gaussians are fitted on what
   the target can show (an adaptive attacker: the strongest one we can build).
3. Online: per row, fit N(mu_in, s_in^2) on phi of the shadows that trained on it and
   N(mu_out, s_out^2) on those that did not; the score is the likelihood ratio
   log N(phi_target; in) - log N(phi_target; out). Offline: only the "out" Gaussian; the score
   is the one-sided test log Pr[Z < phi_target], Z ~ N(mu_out, s_out^2). Variances are per row
   and, as the paper recommends with few shadow models, global (one variance over all rows);
   the table reports the stronger of the two, which favours the attacker.
4. Members are the target's training rows, non-members the other half; AUC and the true
   positive rate at 1% false positives come from scikit-learn's ``roc_auc_score`` and
   ``roc_curve``.

Not done (the paper's optional parts): query augmentations (the targets are not trained with
augmentation) and the paper's 256+ shadow models. Every policy keeps the top-1 label: the bench
checks that the consumer's labels equal the admin's full-output labels on every row.

Usage: python bench/bench_privacy.py [--shadows 16] [--models gbt,mlp] [--in-process]
``--in-process`` applies ``harden`` here instead of querying a server (for quick what-ifs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from scipy import stats
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import ClassifierMixin
from sklearn.datasets import load_digits
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neural_network import MLPClassifier

from modelkeep.guard.hardening import OutputPolicy, harden
from modelkeep.runtime.onnx import OnnxModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import Pinning, workspace
from bench_infer import start_modelkeep as start_server

POLICIES = ["full", "top_k=1", "round=2", "round=1", "confidence=10", "confidence=2",
            "confidence=1", "reverse_sigmoid", "reverse_sigmoid=3.0:0.5", "label_only"]  # fmt: skip
DEFAULTS = "defaults"
CLASSES = 10
_EPS = 1e-12  # scores are clipped this far from 0 before the log
_MIN_STD = 1e-3  # a per-row Gaussian of hardened (discrete) scores can have no spread
_BATCH = 200  # rows per request


def train_gbt(x: np.ndarray, y: np.ndarray, seed: int) -> ClassifierMixin:
    # 100 stages of depth-3 trees: 100% train accuracy on half of digits, ~95% held out.
    return GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=seed).fit(x, y)


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int) -> ClassifierMixin:
    # No weight decay and long training: memorises its half of the data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(
            hidden_layer_sizes=(128,), alpha=1e-6, max_iter=400, random_state=seed
        ).fit(x, y)


TRAINERS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray, int], ClassifierMixin]]] = {
    "gbt": ("gradient-boosted trees (100 x depth 3)", train_gbt),
    "mlp": ("MLP (128 hidden, no weight decay)", train_mlp),
}


@dataclass(frozen=True)
class Outcome:
    auc: float
    tpr_at_1pct: float


def true_class_phi(scores: np.ndarray | None, labels: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's logit scaling of the true-class score of each row, from what the API showed.

    Without scores (``label_only``) the true-class score is 1 when the label is right, else 0.
    """
    if scores is None:
        shown = np.zeros((len(y), CLASSES))
        shown[np.arange(len(y)), labels] = 1.0
    else:
        shown = np.clip(scores.astype(np.float64), 0.0, None)
    rows = np.arange(len(y))
    true = shown[rows, y]
    others = shown.sum(axis=1) - true
    return np.log(true + _EPS) - np.log(np.clip(others, 0.0, None) + _EPS)


def lira_scores(
    shadow_phi: np.ndarray, shadow_in: np.ndarray, target_phi: np.ndarray
) -> dict[str, np.ndarray]:
    """Online and offline LiRA scores per row (higher: more likely a member), each with per-row
    and global variances. ``shadow_phi``/``shadow_in``: models x rows."""
    result: dict[str, np.ndarray] = {}
    inside = np.where(shadow_in, shadow_phi, np.nan)
    outside = np.where(shadow_in, np.nan, shadow_phi)
    mu_in, mu_out = np.nanmean(inside, axis=0), np.nanmean(outside, axis=0)
    per_row = (
        np.maximum(np.nanstd(inside, axis=0), _MIN_STD),
        np.maximum(np.nanstd(outside, axis=0), _MIN_STD),
    )
    pooled = (
        max(float(np.nanstd(inside - mu_in)), _MIN_STD),
        max(float(np.nanstd(outside - mu_out)), _MIN_STD),
    )
    for variance, (s_in, s_out) in (("per-row", per_row), ("global", pooled)):
        online = stats.norm.logpdf(target_phi, mu_in, s_in) - stats.norm.logpdf(
            target_phi, mu_out, s_out
        )
        offline = stats.norm.logcdf(target_phi, mu_out, s_out)
        result[f"online/{variance}"] = online
        result[f"offline/{variance}"] = offline
    return result


def outcome(members: np.ndarray, scores: np.ndarray) -> Outcome:
    fpr, tpr, _ = roc_curve(members, scores)
    return Outcome(float(roc_auc_score(members, scores)), float(np.max(tpr[fpr <= 0.01])))


def strongest(members: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, Outcome]:
    """Online and offline outcomes, each the stronger of its two variance estimates."""
    found: dict[str, Outcome] = {}
    for variant in ("online", "offline"):
        candidates = [outcome(members, s) for k, s in scores.items() if k.startswith(variant)]
        found[variant] = max(candidates, key=lambda o: (o.tpr_at_1pct, o.auc))
    return found


# -- what the target shows -----------------------------------------------------------------


Shown = tuple[np.ndarray, np.ndarray | None]  # labels, score rows (None when removed)


def shown_in_process(model: OnnxModel, x: np.ndarray, policy: str) -> Shown:
    outputs = model.run({"input": x.astype(np.float32)})
    hardened = harden(OutputPolicy.parse(policy), outputs, score_outputs=["probabilities"])
    scores = hardened.get("probabilities")
    return hardened["label"].astype(np.int64), scores


class Served:
    """The target behind a real server: consumer queries, admin policy changes."""

    def __init__(
        self, client: httpx.Client, name: str, consumer: dict[str, str], admin: dict[str, str]
    ) -> None:
        self.client, self.name, self.consumer, self.admin = client, name, consumer, admin

    def show(self, x: np.ndarray, *, admin: bool = False) -> Shown:
        labels: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for start in range(0, len(x), _BATCH):
            rows = x[start : start + _BATCH].astype(np.float32)
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(rows.shape),
                        "datatype": "FP32",
                        "data": rows.ravel().tolist(),
                    }
                ]
            }
            reply = self.client.post(
                f"/v2/models/{self.name}/infer",
                json=body,
                headers=self.admin if admin else self.consumer,
            )
            if reply.status_code != 200:
                raise RuntimeError(f"infer answered {reply.status_code}: {reply.text[:300]}")
            outputs = {o["name"]: o for o in reply.json()["outputs"]}
            labels.append(np.asarray(outputs["label"]["data"], dtype=np.int64))
            if "probabilities" in outputs:
                scores.append(
                    np.asarray(outputs["probabilities"]["data"], dtype=np.float64).reshape(
                        -1, CLASSES
                    )
                )
        return np.concatenate(labels), (np.concatenate(scores) if scores else None)

    def set_output(self, policy: str) -> None:
        current = self.client.get(f"/api/v1/models/{self.name}/policy", headers=self.admin)
        current.raise_for_status()
        body = {**current.json(), "output": policy}
        reply = self.client.put(f"/api/v1/models/{self.name}/policy", json=body, headers=self.admin)
        if reply.status_code != 200:
            raise RuntimeError(f"policy answered {reply.status_code}: {reply.text[:300]}")

    def policy(self) -> dict[str, object]:
        reply = self.client.get(f"/api/v1/models/{self.name}/policy", headers=self.admin)
        reply.raise_for_status()
        shown: dict[str, object] = reply.json()
        return shown


# -- one target ----------------------------------------------------------------------------


def to_onnx(model: ClassifierMixin) -> bytes:
    onnx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    return bytes(onnx.SerializeToString())


def attack_one(
    kind: str, shadows: int, seed: int, in_process: bool, policies: Sequence[str]
) -> list[str]:
    title, train = TRAINERS[kind]
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    n = len(x)
    # Model 0 is the target; each model trains on a random half.
    keep = np.zeros((shadows + 1, n), dtype=bool)
    for m in range(shadows + 1):
        keep[m, rng.permutation(n)[: n // 2]] = True
    started = time.monotonic()
    models = [train(x[keep[m]], y[keep[m]], seed + m) for m in range(shadows + 1)]
    trained_s = time.monotonic() - started
    target, members = models[0], keep[0]
    train_acc = float(np.mean(target.predict(x[members]) == y[members]))
    test_acc = float(np.mean(target.predict(x[~members]) == y[~members]))
    shadow_probs = [m.predict_proba(x) for m in models[1:]]
    shadow_in = keep[1:]
    lines = [
        f"target: {title} on a random half of digits ({members.sum()} rows): train accuracy"
        f" {train_acc:.3f}, held-out {test_acc:.3f}; {shadows} shadow models trained in"
        f" {trained_s:.0f} s"
    ]

    def measure(policy: str, shown: Shown, full_labels: np.ndarray, title: str = "") -> str:
        labels, scores = shown
        attack_policy = OutputPolicy.parse(policy)
        phis = []
        for probs in shadow_probs:
            hardened = harden(
                attack_policy,
                {"probabilities": probs.astype(np.float32), "label": probs.argmax(axis=1)},
                score_outputs=["probabilities"],
            )
            s = hardened.get("probabilities")
            phis.append(true_class_phi(s, hardened["label"], y))
        target_phi = true_class_phi(scores, labels, y)
        result = strongest(members, lira_scores(np.array(phis), shadow_in, target_phi))
        kept = float(np.mean(labels == full_labels))
        on, off = result["online"], result["offline"]
        return (
            f"| {title or policy:<28} | {on.auc:.3f} | {100 * on.tpr_at_1pct:5.1f}% | {off.auc:.3f}"
            f" | {100 * off.tpr_at_1pct:5.1f}% | {100 * kept:6.2f}% |"
        )

    header = (
        "| policy shown to the consumer | online AUC | TPR@1%FPR | offline AUC | TPR@1%FPR |"
        " top-1 kept |\n|---|---|---|---|---|---|"
    )
    lines.append(header)
    if in_process:
        onnx = OnnxModel.load(to_onnx(target))
        full_labels = shown_in_process(onnx, x, "full")[0]
        for policy in policies:
            lines.append(measure(policy, shown_in_process(onnx, x, policy), full_labels))
        return lines
    with workspace() as (tmp, procs):
        server = start_server(tmp, to_onnx(target), procs, Pinning(None, None), name=kind)
        with httpx.Client(base_url=server.url, verify=server.ssl_context or True, timeout=120) as c:
            served = Served(c, kind, server.headers, server.admin)
            default = served.policy()
            full_labels = served.show(x, admin=True)[0]
            lines.insert(
                1,
                f"defaults (no policy set): output {default['output']}, output_for"
                f" {json.dumps(default['output_for'])}, limits {json.dumps(default['limits'])},"
                f" detect {default['detect']}, on_alarm {default['on_alarm']}",
            )
            shown = served.show(x)
            output = str(default["output"])
            lines.append(measure(output, shown, full_labels, f"{DEFAULTS} ({output})"))
            for policy in policies:
                served.set_output(policy)
                lines.append(measure(policy, served.show(x), full_labels))
        procs.stop_all()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--models", default="gbt,mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--in-process", action="store_true")
    opts = parser.parse_args(argv)
    policies = [p for p in opts.policies.split(";" if ";" in opts.policies else ",") if p]
    for kind in opts.models.split(","):
        for line in attack_one(kind, opts.shadows, opts.seed, opts.in_process, policies):
            print(line, flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
