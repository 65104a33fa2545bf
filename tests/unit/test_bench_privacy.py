"""bench/bench_privacy.py's attack arithmetic: the paper's stable logit clips no score a model
can show, the TPR at 1% FPR is never interpolated, and the per-row tests rank as they should."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bp() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_privacy")
    finally:
        sys.path.remove(str(BENCH))


def test_one_hot_rows_and_labels_give_the_same_two_values(bp: ModuleType) -> None:
    y = np.array([0, 1])
    one_hot = np.array([[1.0, 0.0, *[0.0] * 8], [1.0, 0.0, *[0.0] * 8]])
    phi = bp.true_class_phi(one_hot, one_hot.argmax(axis=1), y)
    assert phi == pytest.approx([-np.log(1e-45), np.log(1e-45)])
    assert bp.true_class_phi(None, np.array([0, 0]), y) == pytest.approx(phi)


def test_the_smallest_float32_scores_are_not_merged(bp: ModuleType) -> None:
    # Two rows a model can tell apart (others' sum 1e-30 and 1e-35 in float32) stay apart.
    y = np.array([0, 0])
    scores = np.zeros((2, 10), dtype=np.float32)
    scores[:, 0] = 1.0
    scores[0, 1], scores[1, 1] = 1e-30, 1e-35
    phi = bp.true_class_phi(scores, np.array([0, 0]), y)
    assert phi[1] - phi[0] == pytest.approx(np.log(1e5), rel=1e-3)


def test_tpr_is_the_best_at_most_one_percent_fpr_not_interpolated(bp: ModuleType) -> None:
    # 200 non-members, 100 members. One non-member (0.5% FPR) scores above every member but
    # 10; the next threshold takes 30 more members and two non-members (1.5%). Interpolating
    # at 1% would say 25%; a deterministic attacker at most 1% FPR finds 10%.
    members = np.array([False] * 200 + [True] * 100)
    scores = np.zeros(300)
    scores[200:210] = 10.0
    scores[0] = 9.0
    scores[210:240] = 8.0
    scores[1:3] = 8.0
    assert bp.outcome(members, scores).tpr_at_1pct == pytest.approx(0.10)


def test_lira_ranks_a_score_like_the_ins_above_one_like_the_outs(bp: ModuleType) -> None:
    rng = np.random.default_rng(0)
    shadow_in = rng.random((16, 2)) < 0.5
    shadow_in[:2] = [[True, True], [False, False]]  # each row has ins and outs
    shadow_phi = np.where(shadow_in, 5.0, 0.0) + rng.normal(0, 0.5, (16, 2))
    for per_row in (False, True):
        scores = bp.lira_scores(shadow_phi, shadow_in, np.array([5.0, 0.0]), per_row)
        assert scores["online"][0] > scores["online"][1]
        assert scores["offline"][0] > scores["offline"][1]


def test_label_test_trusts_a_right_answer_only_where_outs_get_it_wrong(bp: ModuleType) -> None:
    # Row 0: every model gets it right; row 1: only the models that trained on it do.
    shadow_in = np.array([[True, True], [False, False]] * 4)
    shadow_right = np.array([[True, True], [True, False]] * 4)
    for scores in bp.label_scores(shadow_right, shadow_in, np.array([True, True])).values():
        assert scores[1] > scores[0]
    wrong = bp.label_scores(shadow_right, shadow_in, np.array([True, False]))
    assert wrong["online"][1] < wrong["online"][0]
