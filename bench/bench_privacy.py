"""Membership inference against modelkeep's output policies: the shadow-model likelihood-ratio
attack (LiRA, Carlini et al. 2022, "Membership Inference Attacks From First Principles").

Targets: an over-fitting gradient-boosted tree ensemble and an MLP, each trained on a random
half of scikit-learn's digits (1797 rows, shipped with scikit-learn, no download), exported to
ONNX with skl2onnx, pushed to a real ``modelkeep serve`` and queried over HTTPS with a consumer
key, once with the model's defaults (no policy set) and once per output policy (set with the
admin key, which is what ``modelkeep policy set MODEL --output P`` does).

The attack, as in the paper (section IV), fixed by its advice, not by the results:

1. Train ``--shadows + 1`` models of the same architecture, each on a random half of the data
   (so each row is "in" about half of them). Model 0 is the target, the others its shadows;
   with ``--targets K``, models 0 .. K-1 are targets in turn, each with all the other models as
   its shadows (the paper's leave-one-out evaluation: more targets cost queries, not training).
   Paper: 256 or more models; we use 17 (the default) to 65, so that a run takes minutes on
   two shared cores.
2. For every row ``(x, y)`` and every model, take the score row as the API shows it and scale
   the true class's score by ``phi = log(p_y) - log(sum of the other scores)`` (the paper's
   stable logit, computed as its code does: float64, the true class masked out of the sum,
   1e-45 added before each log). 1e-45 is below the smallest positive float32, so no score a
   float32 model can show is clipped; a 0 (a one-hot row, or a label) becomes log(1e-45) =
   -103.6, so ``confidence=1`` and ``label_only`` give phi = +-103.6: right or wrong. The
   shadows' scores come from the same ONNX models through the same runtime (in process), and
   the attacker applies the target's output policy to them (an adaptive attacker).
3. Online: per row, N(mu_in, s_in^2) fitted on phi of the shadows that trained on it and
   N(mu_out, s_out^2) on those that did not; the score is the likelihood ratio
   log N(phi_target; in) - log N(phi_target; out). Offline: only the "out" Gaussian; the score
   is the one-sided test log Pr[Z < phi_target], Z ~ N(mu_out, s_out^2). Variances: global
   (one per Gaussian, over all rows, around each row's mean) below 64 shadows, per row from
   64 on, as the paper advises; ``--variance`` overrides. One attack per column: the table
   never picks the better variant after seeing who the members are.
4. Members are the target's training rows, non-members the other half. AUC from
   scikit-learn's ``roc_auc_score``; TPR at 1% FPR is the largest true positive rate among the
   thresholds of ``roc_curve`` whose false positive rate is at most 1% (no interpolation: the
   rate a deterministic attacker reaches). With several targets: the mean over targets with a
   95% t-interval, and the figure of all targets' rows pooled (as the paper's code does).

Not done (the paper's optional parts): query augmentations (the targets are not trained with
augmentation) and the paper's 256+ shadow models. Every policy keeps the top-1 label: the bench
checks that the consumer's labels equal the admin's full-output labels on every row.

Usage: python bench/bench_privacy.py [--shadows 16] [--targets 8] [--models gbt,mlp]
[--policies P,P] [--variance auto] [--jobs 1] [--cache DIR] [--in-process]
``--in-process`` applies ``harden`` here instead of querying a server (for quick what-ifs);
``--cache DIR`` keeps the trained models (ONNX) so that a second run trains none of them again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
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
LABEL_ROW = "any policy: label, Bernoulli"
CLASSES = 10
# As the paper's code: added before the log; below float32's smallest positive value, so it
# only stands in for an exact 0 and never merges two scores a float32 model can tell apart.
_EPS = 1e-45
# As the paper's code: added to each standard deviation, so a row whose shadows all showed the
# same (discrete) score keeps a finite, very narrow Gaussian.
_STD_FLOOR = 1e-30
_PER_ROW_FROM = 64  # the paper: per-row variances from 64 shadow models on, global below
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


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def halves(models: int, rows: int, seed: int) -> np.ndarray:
    """models x rows: which rows each model trains on (a random half each). Model m's half does
    not depend on how many models are drawn, so a cached pool can grow."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((models, rows), dtype=bool)
    for m in range(models):
        keep[m, rng.permutation(rows)[: rows // 2]] = True
    return keep


# -- the attack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    auc: float
    tpr_at_1pct: float


def true_class_phi(scores: np.ndarray | None, labels: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's logit scaling of the true-class score of each row, from what the API showed.

    Without scores (``label_only``) the row shown is the label one-hot: 1 when right, else 0.
    """
    rows = np.arange(len(y))
    if scores is None:
        shown = np.zeros((len(y), CLASSES))
        shown[rows, labels] = 1.0
    else:
        shown = np.clip(scores.astype(np.float64), 0.0, None)
    true = shown[rows, y].copy()
    shown[rows, y] = 0.0  # the others' sum, without subtracting two numbers close to 1
    return np.log(true + _EPS) - np.log(shown.sum(axis=1) + _EPS)


def lira_scores(
    shadow_phi: np.ndarray, shadow_in: np.ndarray, target_phi: np.ndarray, per_row: bool
) -> dict[str, np.ndarray]:
    """Online and offline LiRA scores per row (higher: more likely a member).
    ``shadow_phi``/``shadow_in``: shadow models x rows."""
    inside = np.where(shadow_in, shadow_phi, np.nan)
    outside = np.where(shadow_in, np.nan, shadow_phi)
    with warnings.catch_warnings():  # a row no shadow trained on (or all did) has no Gaussian
        warnings.simplefilter("ignore", RuntimeWarning)
        mu_in, mu_out = np.nanmean(inside, axis=0), np.nanmean(outside, axis=0)
    if per_row:
        s_in = np.nanstd(inside, axis=0) + _STD_FLOOR
        s_out = np.nanstd(outside, axis=0) + _STD_FLOOR
    else:  # one variance per Gaussian: the spread of every row's phi around its own mean
        s_in = np.full_like(mu_in, float(np.nanstd(inside - mu_in)) + _STD_FLOOR)
        s_out = np.full_like(mu_out, float(np.nanstd(outside - mu_out)) + _STD_FLOOR)
    online = stats.norm.logpdf(target_phi, mu_in, s_in) - stats.norm.logpdf(
        target_phi, mu_out, s_out
    )
    offline = stats.norm.logcdf(target_phi, mu_out, s_out)
    # Such a row tells the attacker nothing: it gets the score of an even guess.
    return {
        "online": np.nan_to_num(online, nan=0.0),
        "offline": np.nan_to_num(offline, nan=np.log(0.5)),
    }


def label_scores(
    shadow_right: np.ndarray, shadow_in: np.ndarray, target_right: np.ndarray
) -> dict[str, np.ndarray]:
    """The same per-row test on the label alone, which every policy shows: whether the answer
    is right is a coin, so the exact per-row model is Bernoulli, not Gaussian. Online: the
    likelihood ratio of what the target showed (right or wrong) under the in and out rates
    (add-half smoothed, so 0 of 16 is not a certainty); offline: the one-sided mid-p test
    against the out rate alone. ``shadow_right``/``shadow_in``: shadow models x rows."""
    p_in = ((shadow_right & shadow_in).sum(axis=0) + 0.5) / (shadow_in.sum(axis=0) + 1)
    p_out = ((shadow_right & ~shadow_in).sum(axis=0) + 0.5) / ((~shadow_in).sum(axis=0) + 1)
    online = np.where(target_right, np.log(p_in / p_out), np.log((1 - p_in) / (1 - p_out)))
    offline = np.where(target_right, 1 - p_out / 2, (1 - p_out) / 2)
    return {"online": online, "offline": offline}


def outcome(members: np.ndarray, scores: np.ndarray) -> Outcome:
    """AUC, and the best TPR among thresholds whose FPR is at most 1% (not interpolated)."""
    fpr, tpr, _ = roc_curve(members, scores)
    return Outcome(float(roc_auc_score(members, scores)), float(np.max(tpr[fpr <= 0.01])))


# -- what the targets show -----------------------------------------------------------------


Shown = tuple[np.ndarray, np.ndarray | None]  # labels, score rows (None when removed)


def shown_in_process(outputs: dict[str, np.ndarray], policy: str) -> Shown:
    hardened = harden(OutputPolicy.parse(policy), outputs, score_outputs=["probabilities"])
    scores = hardened.get("probabilities")
    return hardened["label"].astype(np.int64), scores


class Served:
    """A target behind a real server: consumer queries, admin policy changes."""

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


def push(client: httpx.Client, admin: dict[str, str], name: str, model: bytes) -> dict[str, str]:
    """Create ``name``, push ``model`` as its first version (unsigned, as bench_infer does) and
    return a new consumer key's headers: one key per target, so no target eats another's
    daily budget."""
    replies = [
        client.put(f"/api/v1/models/{name}", json={"require_signature": False}, headers=admin),
        client.post(
            f"/api/v1/models/{name}/versions",
            params={"filename": f"{name}.onnx"},
            content=model,
            headers={**admin, "Content-Type": "application/octet-stream"},
        ),
        client.post("/api/v1/keys", json={"role": "consumer", "models": [name]}, headers=admin),
    ]
    for reply in replies:
        if reply.status_code not in (200, 201):
            raise RuntimeError(f"{reply.url.path} answered {reply.status_code}: {reply.text[:300]}")
    consumer = {"Authorization": f"Bearer {replies[-1].json()['key']}"}
    for _ in range(600):
        if client.get(f"/v2/models/{name}/ready", headers=consumer).status_code == 200:
            return consumer
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready")


# -- the pool of models --------------------------------------------------------------------


def to_onnx(model: ClassifierMixin) -> bytes:
    onnx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    return bytes(onnx.SerializeToString())


def _train_one(job: tuple[str, int, int, np.ndarray, Path | None]) -> bytes:
    kind, m, seed, keep, folder = job
    x, y = digits()
    onnx = to_onnx(TRAINERS[kind][1](x[keep], y[keep], seed + m))
    if folder is not None:  # as each is made: an interrupted run keeps what it trained
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"model-{m}.onnx.part").write_bytes(onnx)
        (folder / f"model-{m}.onnx.part").rename(folder / f"model-{m}.onnx")
    return onnx


def train_pool(
    kind: str, keep: np.ndarray, seed: int, jobs: int, cache: Path | None
) -> tuple[list[bytes], float, int]:
    """The ONNX bytes of every model of the pool, the seconds spent training, how many were
    trained (the rest came from ``cache``)."""
    folder = cache / f"{kind}-seed{seed}" if cache is not None else None
    found: dict[int, bytes] = {}
    if folder is not None:
        for m in range(len(keep)):
            path = folder / f"model-{m}.onnx"
            if path.exists():
                found[m] = path.read_bytes()
    todo = [(kind, m, seed, keep[m], folder) for m in range(len(keep)) if m not in found]
    started = time.monotonic()
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            made = list(pool.map(_train_one, todo))
    else:
        made = [_train_one(job) for job in todo]
    found.update((job[1], onnx) for job, onnx in zip(todo, made, strict=True))
    return [found[m] for m in range(len(keep))], time.monotonic() - started, len(todo)


# -- the measurement -----------------------------------------------------------------------


@dataclass
class Cell:
    """One policy's results over the targets: per-target outcomes and the rows pooled."""

    outcomes: dict[str, list[Outcome]]
    members: list[np.ndarray]
    scores: dict[str, list[np.ndarray]]
    kept: list[float]

    @classmethod
    def empty(cls) -> Cell:
        return cls({"online": [], "offline": []}, [], {"online": [], "offline": []}, [])


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval over targets (the targets share data and shadows, so this is
    an approximation: leave-one-out targets are not independent draws)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values))
    return mean, mean - half, mean + half


def kept(name: str, cell: Cell) -> str:
    # The label row shows no policy's answer: what it reads is the label every policy keeps.
    return "    -  " if name == LABEL_ROW else f"{100 * min(cell.kept):6.2f}%"


def tables(cells: dict[str, Cell], targets: int) -> list[str]:
    head = "| policy shown to the consumer | online AUC | TPR@1%FPR | offline AUC | TPR@1%FPR |"
    rule = "|---|---|---|---|---|"
    if targets == 1:
        lines = [head + " top-1 kept |", rule + "---|"]
        for name, cell in cells.items():
            on, off = cell.outcomes["online"][0], cell.outcomes["offline"][0]
            lines.append(
                f"| {name:<28} | {on.auc:.3f} | {100 * on.tpr_at_1pct:5.1f}% | {off.auc:.3f}"
                f" | {100 * off.tpr_at_1pct:5.1f}% | {kept(name, cell)} |"
            )
        return lines
    lines = [f"mean over {targets} targets [95% interval]:", head + " top-1 kept |", rule + "---|"]
    for name, cell in cells.items():
        row = f"| {name:<28} |"
        for attack in ("online", "offline"):
            auc = interval([o.auc for o in cell.outcomes[attack]])
            tpr = interval([100 * o.tpr_at_1pct for o in cell.outcomes[attack]])
            row += f" {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}] |"
            row += f" {tpr[0]:4.1f}% [{max(tpr[1], 0.0):.1f}, {tpr[2]:.1f}] |"
        lines.append(row + f" {kept(name, cell)} |")
    lines += ["", f"all {targets} targets' rows pooled:", head, rule]
    for name, cell in cells.items():
        members = np.concatenate(cell.members)
        pooled = {a: outcome(members, np.concatenate(cell.scores[a])) for a in cell.scores}
        on, off = pooled["online"], pooled["offline"]
        lines.append(
            f"| {name:<28} | {on.auc:.3f} | {100 * on.tpr_at_1pct:5.1f}% | {off.auc:.3f}"
            f" | {100 * off.tpr_at_1pct:5.1f}% |"
        )
    return lines


@contextmanager
def serving(kind: str, models: list[bytes]) -> Iterator[list[Served]]:
    """One ``modelkeep serve`` with every target pushed to it, each with its own consumer key."""
    with workspace() as (tmp, procs):
        server = start_server(tmp, models[0], procs, Pinning(None, None), name=f"{kind}-0")
        with httpx.Client(base_url=server.url, verify=server.ssl_context or True, timeout=120) as c:
            served = [Served(c, f"{kind}-0", server.headers, server.admin)]
            for t, model in enumerate(models[1:], start=1):
                consumer = push(c, server.admin, f"{kind}-{t}", model)
                served.append(Served(c, f"{kind}-{t}", consumer, server.admin))
            yield served
        procs.stop_all()


def attack_kind(kind: str, opts: argparse.Namespace, policies: Sequence[str]) -> list[str]:
    title = TRAINERS[kind][0]
    x, y = digits()
    pool_size = opts.shadows + 1
    keep = halves(pool_size, len(x), opts.seed)
    onnx, trained_s, trained = train_pool(kind, keep, opts.seed, opts.jobs, opts.cache)
    per_row = opts.variance == "per-row" or (
        opts.variance == "auto" and opts.shadows >= _PER_ROW_FROM
    )
    # What every model of the pool shows under each policy, through the server's runtime.
    outputs = [OnnxModel.load(model).run({"input": x}) for model in onnx]
    accuracy = np.array(
        [
            [np.mean(o["label"][k] == y[k]) for k in (m, ~m)]
            for o, m in zip(outputs, keep, strict=True)
        ]
    )
    lines = [
        f"target: {title} on random halves of digits ({keep[0].sum()} rows); {pool_size} models"
        f" ({trained} trained in {trained_s:.0f} s, the rest cached): train accuracy"
        f" {accuracy[:, 0].mean():.3f}, held-out {accuracy[:, 1].mean():.3f} (mean);"
        f" {opts.targets} target(s), each with the other {opts.shadows} models as shadows;"
        f" {'per-row' if per_row else 'global'} variances"
    ]
    phi_cache: dict[str, np.ndarray] = {}

    def pool_phi(policy: str) -> np.ndarray:
        if policy not in phi_cache:
            shown = [shown_in_process(o, policy) for o in outputs]
            phi_cache[policy] = np.array([true_class_phi(s, lab, y) for lab, s in shown])
        return phi_cache[policy]

    cells: dict[str, Cell] = {}
    mismatched: list[str] = []

    def measure(t: int, row: str, policy: str, shown: Shown, full_labels: np.ndarray) -> None:
        labels, scores = shown
        target_phi = true_class_phi(scores, labels, y)
        phi = pool_phi(policy)
        if not np.allclose(target_phi, phi[t], rtol=1e-5, atol=1e-4):
            mismatched.append(f"{row} (target {t})")
        others = np.arange(pool_size) != t
        cell = cells.setdefault(row, Cell.empty())
        for attack, score in lira_scores(phi[others], keep[others], target_phi, per_row).items():
            cell.outcomes[attack].append(outcome(keep[t], score))
            cell.scores[attack].append(score)
        cell.members.append(keep[t])
        cell.kept.append(float(np.mean(labels == full_labels)))

    right = np.array([o["label"] == y for o in outputs])

    def measure_label(t: int, labels: np.ndarray) -> None:
        others = np.arange(pool_size) != t
        cell = cells.setdefault(LABEL_ROW, Cell.empty())
        for attack, score in label_scores(right[others], keep[others], labels == y).items():
            cell.outcomes[attack].append(outcome(keep[t], score))
            cell.scores[attack].append(score)
        cell.members.append(keep[t])
        cell.kept.append(1.0)

    if opts.in_process:
        for t in range(opts.targets):
            full_labels = shown_in_process(outputs[t], "full")[0]
            measure_label(t, full_labels)
            for policy in policies:
                measure(t, policy, policy, shown_in_process(outputs[t], policy), full_labels)
        return lines + tables(cells, opts.targets)
    with serving(kind, onnx[: opts.targets]) as targets:
        for t, served in enumerate(targets):
            default = served.policy()
            if t == 0:
                lines.insert(
                    1,
                    f"defaults (no policy set): output {default['output']}, output_for"
                    f" {json.dumps(default['output_for'])}, limits"
                    f" {json.dumps(default['limits'])}, detect {default['detect']}, on_alarm"
                    f" {default['on_alarm']}",
                )
            full_labels = served.show(x, admin=True)[0]
            output = str(default["output"])
            shown = served.show(x)
            measure(t, f"{DEFAULTS} ({output})", output, shown, full_labels)
            measure_label(t, shown[0])
            for policy in policies:
                served.set_output(policy)
                measure(t, policy, policy, served.show(x), full_labels)
            print(f"  target {t + 1}/{len(targets)} queried", file=sys.stderr, flush=True)
    lines.append(
        "served scores equal the same model's in-process scores under every policy"
        if not mismatched
        else f"WARNING: served and in-process scores differ for {', '.join(mismatched)}"
    )
    return lines + tables(cells, opts.targets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shadows", type=int, default=16, help="shadow models per target")
    parser.add_argument(
        "--targets",
        type=int,
        default=8,
        help="targets, in turn, each with the other --shadows models as shadows (leave-one-out)",
    )
    parser.add_argument("--models", default="gbt,mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--variance",
        choices=["auto", "global", "per-row"],
        default="auto",
        help="auto: global below 64 shadow models, per row from 64 (the paper's advice)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="models trained in parallel")
    parser.add_argument("--cache", type=Path, help="keep trained models here and reuse them")
    parser.add_argument("--in-process", action="store_true")
    opts = parser.parse_args(argv)
    if not 1 <= opts.targets <= opts.shadows + 1 or opts.shadows < 2:
        parser.error("need --shadows >= 2 and 1 <= --targets <= --shadows + 1")
    policies = [p for p in opts.policies.split(";" if ";" in opts.policies else ",") if p]
    for kind in opts.models.split(","):
        for line in attack_kind(kind, opts, policies):
            print(line, flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
