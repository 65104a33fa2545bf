"""How much an output policy leaks about a model's training rows: membership attacks that need
no shadow models, run against the model itself under each candidate policy.

Given rows known to be in the training set (members) and rows known not to be (non-members),
each with its true class, :func:`assess` shows the model's scores through each candidate
output policy (``guard.hardening.harden``, as a consumer would see them) and runs two attacks
on the true-class score ``p``, scaled as ``phi = log p - log(1 - p)``:

* ``threshold``: the higher ``phi``, the likelier a member (Yeom et al. 2018, the confidence
  form of the loss attack).
* ``calibrated``: ``phi`` standardised by the mean and spread of non-members *of the same
  class* (a reference-free, per-class difficulty calibration in the spirit of Watson et al.
  2022). The statistics come from one half of the non-members and score the other half and
  half of the members, then the halves swap, so no row is scored with its own statistics.

Each policy's leak is the stronger attack: its AUC (the Mann-Whitney statistic, ties counted
half) and its true-positive rate at 1% false positives. The accuracy cost is the share of rows
whose top-1 class matches the full output. The recommendation is the least restrictive
candidate whose AUC is at most the target. A shadow-model attack (LiRA, bench/bench_privacy.py)
is stronger; these two are what can run on a server in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from modelkeep.errors import InvalidInput
from modelkeep.guard.hardening import OutputPolicy, harden

__all__ = [
    "CANDIDATES",
    "Assessment",
    "PolicyLeak",
    "assess",
    "attack_scores",
    "membership_auc",
    "tpr_at_fpr",
]

# From least to most restrictive: the recommendation is the first one under the target.
CANDIDATES = (
    "full",
    "top_k=3",
    "round=2",
    "round=1",
    "confidence=10",
    "confidence=2",
    "confidence=1",
    "label_only",
)
_EPS = 1e-12
_MIN_STD = 1e-6
_MIN_ROWS = 20


@dataclass(frozen=True, slots=True)
class PolicyLeak:
    """One candidate policy's measured leak."""

    policy: str
    auc: float
    tpr_at_1pct_fpr: float
    attack: str
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "auc": round(self.auc, 4),
            "tpr_at_1pct_fpr": round(self.tpr_at_1pct_fpr, 4),
            "attack": self.attack,
            "top1_agreement": round(self.top1_agreement, 4),
        }


@dataclass(frozen=True, slots=True)
class Assessment:
    """Every candidate's leak, and the least restrictive one under ``target_auc``."""

    target_auc: float
    members: int
    non_members: int
    leaks: tuple[PolicyLeak, ...]
    recommended: str
    target_met: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "target_auc": self.target_auc,
            "members": self.members,
            "non_members": self.non_members,
            "policies": [leak.to_json() for leak in self.leaks],
            "recommended": self.recommended,
            "target_met": self.target_met,
        }


def membership_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half: the ROC AUC."""
    result = stats.mannwhitneyu(members, non_members, alternative="two-sided")
    return float(result.statistic) / (len(members) * len(non_members))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> float:
    """The share of members flagged by the lowest threshold that flags at most ``fpr`` of
    the non-members (a row is flagged when its score is strictly above the threshold)."""
    ordered = np.sort(non_members)[::-1]
    allowed = int(np.floor(fpr * len(ordered)))
    # Flagging strictly above the (allowed + 1)-th highest non-member score flags at most
    # ``allowed`` non-members, whatever the ties.
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(members > threshold))


def attack_scores(
    phi_members: np.ndarray,
    y_members: np.ndarray,
    phi_non_members: np.ndarray,
    y_non_members: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per attack, the (members, non-members) scores; higher means "member"."""
    calibrated_members = np.empty_like(phi_members)
    calibrated_non_members = np.empty_like(phi_non_members)
    rng = np.random.default_rng(0)
    fold_m = rng.permutation(len(phi_members)) % 2
    fold_n = rng.permutation(len(phi_non_members)) % 2
    for fold in (0, 1):
        reference = fold_n != fold  # statistics from the other half of the non-members
        for cls in np.union1d(y_members, y_non_members):
            known = phi_non_members[reference & (y_non_members == cls)]
            if known.size >= 2:
                mean, std = float(np.mean(known)), max(float(np.std(known)), _MIN_STD)
            else:  # a class too rare to calibrate: fall back on every reference row
                known = phi_non_members[reference]
                mean, std = float(np.mean(known)), max(float(np.std(known)), _MIN_STD)
            m = (fold_m == fold) & (y_members == cls)
            n = (fold_n == fold) & (y_non_members == cls)
            calibrated_members[m] = (phi_members[m] - mean) / std
            calibrated_non_members[n] = (phi_non_members[n] - mean) / std
    return {
        "threshold": (phi_members, phi_non_members),
        "calibrated": (calibrated_members, calibrated_non_members),
    }


def true_class_phi(
    shown: Mapping[str, np.ndarray], score_output: str, y: np.ndarray, full_top: np.ndarray
) -> np.ndarray:
    """``log p - log(sum of the other scores)`` of the true class, from what a caller sees.

    Without scores (``label_only``) ``p`` is 1 when the shown top-1 class is right, else 0.
    """
    rows = np.arange(len(y))
    scores = shown.get(score_output)
    if scores is None:
        p = (full_top == y).astype(np.float64)
        label_phi: np.ndarray = np.log(p + _EPS) - np.log(1.0 - p + _EPS)
        return label_phi
    values = np.clip(scores.astype(np.float64), 0.0, None)
    true = values[rows, y]
    others = values.sum(axis=1) - true
    phi: np.ndarray = np.log(true + _EPS) - np.log(np.clip(others, 0.0, None) + _EPS)
    return phi


def assess(
    outputs: Mapping[str, np.ndarray],
    score_output: str,
    y: np.ndarray,
    is_member: np.ndarray,
    *,
    target_auc: float = 0.60,
    candidates: Sequence[str] = CANDIDATES,
) -> Assessment:
    """Measure each candidate policy on the model's full ``outputs`` for the rows of ``y``.

    ``score_output`` names the class-score output; ``is_member`` marks the member rows.
    Raises ``InvalidInput`` when there are too few rows of either kind or a class is out of
    range.
    """
    if not 0.5 <= target_auc <= 1.0:
        raise InvalidInput("the target AUC is a number from 0.5 to 1")
    scores = outputs[score_output]
    members, non_members = int(np.sum(is_member)), int(np.sum(~is_member))
    if members < _MIN_ROWS or non_members < _MIN_ROWS:
        raise InvalidInput(f"give at least {_MIN_ROWS} members and {_MIN_ROWS} non-members")
    if y.min() < 0 or y.max() >= scores.shape[1]:
        raise InvalidInput(f"y holds class indices from 0 to {scores.shape[1] - 1}")
    full_top = np.argmax(scores, axis=1)
    leaks = []
    for text in candidates:
        policy = OutputPolicy.parse(text)
        shown = harden(policy, {score_output: scores}, score_outputs=[score_output])
        phi = true_class_phi(shown, score_output, y, full_top)
        shown_scores = shown.get(score_output)
        agreement = (
            1.0
            if shown_scores is None
            else float(np.mean(np.argmax(shown_scores, axis=1) == full_top))
        )
        best: PolicyLeak | None = None
        for attack, (m, n) in attack_scores(
            phi[is_member], y[is_member], phi[~is_member], y[~is_member]
        ).items():
            leak = PolicyLeak(text, membership_auc(m, n), tpr_at_fpr(m, n), attack, agreement)
            if best is None or (leak.auc, leak.tpr_at_1pct_fpr) > (best.auc, best.tpr_at_1pct_fpr):
                best = leak
        assert best is not None
        leaks.append(best)
    under = [leak for leak in leaks if leak.auc <= target_auc]
    recommended = under[0] if under else min(leaks, key=lambda leak: leak.auc)
    return Assessment(
        target_auc=target_auc,
        members=members,
        non_members=non_members,
        leaks=tuple(leaks),
        recommended=recommended.policy,
        target_met=bool(under),
    )
