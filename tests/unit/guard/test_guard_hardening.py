"""Output hardening: every policy keeps the model's answer, its shapes and dtypes.

The benign-accuracy checks run the real iris model in ONNX Runtime on the rows its training
left out; the property checks use many random score matrices, ties and logits included.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_iris

from modelkeep.api.v2.codec import decode_infer_request, encode_infer_response
from modelkeep.errors import InternalError, InvalidInput
from modelkeep.guard.hardening import (
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    OutputPolicy,
    harden,
    score_outputs_of,
)
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.testing import build_iris_onnx

POLICIES = [
    "full",
    "top_k=1",
    "top_k=2",
    "top_k=3",
    "round=0",
    "round=1",
    "round=2",
    "label_only",
    "reverse_sigmoid",
    "reverse_sigmoid=5.0:0.5",
    "reverse_sigmoid=20.0:2.0",
]
SCORES = ("probabilities",)


@pytest.fixture(scope="module")
def iris() -> OnnxModel:
    return OnnxModel.load(build_iris_onnx(seed=0))


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The 15 iris rows build_iris_onnx(seed=0) did not train on, with their true species.

    This repeats the documented selection in modelkeep.testing (per species, 45 rows drawn by
    default_rng(seed)); the assertion below catches a drift between the two.
    """
    data = load_iris()
    rng = np.random.default_rng(0)
    trained = np.concatenate(
        [rng.choice(np.flatnonzero(data.target == k), 45, replace=False) for k in range(3)]
    )
    rows = np.setdiff1d(np.arange(len(data.target)), trained)
    assert len(rows) == 15
    return data.data[rows].astype(np.float32), data.target[rows]


def _top1(outputs: dict[str, np.ndarray]) -> np.ndarray:
    # What a client reads as the answer: the scores when it gets them, else the label.
    if "probabilities" in outputs:
        return np.argmax(outputs["probabilities"], axis=1)
    return outputs["label"]


@pytest.mark.parametrize("text", POLICIES)
def test_every_policy_keeps_benign_top1_accuracy_on_held_out_iris(
    iris: OnnxModel, held_out: tuple[np.ndarray, np.ndarray], text: str
) -> None:
    rows, species = held_out
    outputs = iris.run({"input": rows})
    hardened = harden(OutputPolicy.parse(text), outputs, score_outputs=SCORES)
    expected_accuracy = float(np.mean(outputs["label"] == species))
    assert expected_accuracy >= 0.9  # the model is worth protecting: it does classify
    assert expected_accuracy == float(np.mean(_top1(hardened) == species))
    assert outputs["label"].tolist() == _top1(hardened).tolist()
    assert outputs["label"].tolist() == hardened["label"].tolist()


@pytest.mark.parametrize("text", [t for t in POLICIES if t != "label_only"])
def test_shapes_and_dtypes_are_preserved(iris: OnnxModel, text: str) -> None:
    rows = np.asarray(load_iris().data[::7], dtype=np.float32)
    outputs = iris.run({"input": rows})
    hardened = harden(OutputPolicy.parse(text), outputs, score_outputs=SCORES)
    assert list(outputs) == list(hardened)
    for name, value in outputs.items():
        assert (value.shape, value.dtype) == (hardened[name].shape, hardened[name].dtype)


@pytest.mark.parametrize("text", POLICIES)
def test_hardened_outputs_encode_as_a_valid_v2_response(iris: OnnxModel, text: str) -> None:
    rows = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
    body = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": rows}]}
    )
    request = decode_infer_request(body, iris.signature, max_elements=1000)
    outputs = harden(
        OutputPolicy.parse(text),
        iris.run(request.inputs),
        score_outputs=score_outputs_of(iris.signature),
    )
    encoded, _ = encode_infer_response(
        model_name="iris", model_version="1", request=request, outputs=outputs
    )
    document = orjson.loads(encoded)
    shown = {entry["name"]: entry for entry in document["outputs"]}
    expected_names = ["label"] if text == "label_only" else ["label", "probabilities"]
    assert expected_names == list(shown)
    assert shown["label"]["data"] == [0, 2]
    if "probabilities" in shown:
        scores = shown["probabilities"]
        assert (scores["shape"], scores["datatype"]) == ([2, 3], "FP32")


@pytest.mark.parametrize(("beta", "gamma"), [(DEFAULT_BETA, DEFAULT_GAMMA), (0.3, 0.5), (5.0, 1.0)])
def test_reverse_sigmoid_rows_sum_to_one_and_differ_from_the_input(
    beta: float, gamma: float
) -> None:
    rng = np.random.default_rng(7)
    scores = rng.dirichlet(np.full(5, 0.4), size=500).astype(np.float32)
    policy = OutputPolicy("reverse_sigmoid", beta=beta, gamma=gamma)
    hardened = harden(policy, {"p": scores}, score_outputs=["p"])["p"]
    np.testing.assert_allclose(hardened.sum(axis=1), np.ones(500), atol=1e-5)
    assert bool(np.all((hardened >= 0.0) & (hardened <= 1.0)))
    assert float(np.max(np.abs(hardened - scores))) > 0.01


def test_reverse_sigmoid_turns_logits_into_a_distribution() -> None:
    logits = np.asarray([[2.0, -1.0, 0.5], [-3.0, -2.5, -7.0]], dtype=np.float64)
    hardened = harden(OutputPolicy("reverse_sigmoid"), {"z": logits}, score_outputs=["z"])["z"]
    np.testing.assert_allclose(hardened.sum(axis=1), [1.0, 1.0])
    assert np.argmax(hardened, axis=1).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("rows", "beta", "gamma", "expected_top"),
    [
        ([[0.6, 0.4], [0.1, 0.9]], 5.0, 1.0, [0, 1]),
        # Default parameters: the transform lifts the ruled-out class above the tied top two.
        ([[3 / 11, 4 / 11, 4 / 11, 0.0]], DEFAULT_BETA, DEFAULT_GAMMA, [1]),
    ],
)
def test_reverse_sigmoid_repairs_a_top_class_the_perturbation_would_flip(
    rows: list[list[float]], beta: float, gamma: float, expected_top: list[int]
) -> None:
    scores = np.asarray(rows, dtype=np.float32)
    # The bare transform (Lee et al.) on this row ranks class 1 first: a real flip to repair.
    p = np.clip(scores.astype(np.float64), 1e-9, 1 - 1e-9)
    bare = np.clip(p - beta * (1 / (1 + np.exp(-gamma * np.log(p / (1 - p)))) - 0.5), 0, 1)
    assert np.argmax(bare, axis=1).tolist() != expected_top
    policy = OutputPolicy("reverse_sigmoid", beta=beta, gamma=gamma)
    hardened = harden(policy, {"p": scores}, score_outputs=["p"])["p"]
    assert expected_top == np.argmax(hardened, axis=1).tolist()
    np.testing.assert_allclose(hardened.sum(axis=1), np.ones(len(rows)), atol=1e-6)


def test_top_k_keeps_the_k_largest_scores_and_zeroes_the_rest() -> None:
    scores = np.asarray([[0.1, 0.5, 0.3, 0.1], [0.4, 0.4, 0.2, 0.0]], dtype=np.float32)
    hardened = harden(OutputPolicy("top_k", k=2), {"p": scores}, score_outputs=["p"])["p"]
    expected = np.asarray([[0.0, 0.5, 0.3, 0.0], [0.4, 0.4, 0.0, 0.0]], dtype=np.float32)
    assert expected.tolist() == hardened.tolist()
    one = harden(OutputPolicy("top_k", k=1), {"p": scores}, score_outputs=["p"])["p"]
    assert one.astype(np.float64).round(6).tolist() == [[0.0, 0.5, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0]]


def test_top_k_on_negative_logits_keeps_dropped_classes_below_the_kept_ones() -> None:
    logits = np.asarray([[-3.0, -1.0, -2.0]], dtype=np.float32)
    hardened = harden(OutputPolicy("top_k", k=1), {"z": logits}, score_outputs=["z"])["z"]
    assert int(np.argmax(hardened)) == 1
    assert float(hardened[0, 1]) == -1.0
    assert bool(np.all(np.delete(hardened[0], 1) < -1.0))


def test_round_rounds_and_breaks_a_rounding_tie_toward_the_true_top_class() -> None:
    scores = np.asarray([[0.496, 0.497, 0.007], [0.123, 0.456, 0.421]], dtype=np.float32)
    hardened = harden(OutputPolicy("round", decimals=2), {"p": scores}, score_outputs=["p"])["p"]
    # Row 0 rounds to a 0.50/0.50 tie that argmax would settle on class 0; class 1 gets +0.01.
    assert hardened.astype(np.float64).round(6).tolist() == [[0.5, 0.51, 0.01], [0.12, 0.46, 0.42]]
    assert np.argmax(hardened, axis=1).tolist() == [1, 1]


def test_label_only_drops_score_outputs_and_keeps_the_rest() -> None:
    outputs = {
        "label": np.asarray([2, 0], dtype=np.int64),
        "probabilities": np.full((2, 3), 1 / 3, dtype=np.float32),
        "embedding": np.zeros((2, 8), dtype=np.float32),
    }
    hardened = harden(OutputPolicy("label_only"), outputs, score_outputs=["probabilities"])
    assert list(hardened) == ["label", "embedding"]
    assert hardened["label"] is outputs["label"]
    assert hardened["embedding"] is outputs["embedding"]


@pytest.mark.parametrize("text", POLICIES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_top1_survives_every_policy_on_random_scores_ties_and_logits(
    text: str, dtype: type[np.floating]
) -> None:
    rng = np.random.default_rng(11)
    probabilities = rng.dirichlet(np.full(6, 0.3), size=400)
    coarse = np.round(rng.dirichlet(np.ones(4), size=400), 1)  # many exact ties
    coarse /= coarse.sum(axis=1, keepdims=True)
    logits = rng.normal(0.0, 3.0, size=(400, 6)) - 5.0
    for scores in (probabilities, coarse, logits):
        typed = scores.astype(dtype)
        before = typed.copy()
        hardened = harden(OutputPolicy.parse(text), {"s": typed}, score_outputs=["s"])
        assert before.tolist() == typed.tolist()  # the input is never modified
        if text != "label_only":
            assert np.argmax(typed, axis=1).tolist() == np.argmax(hardened["s"], axis=1).tolist()
            assert (typed.shape, typed.dtype) == (hardened["s"].shape, hardened["s"].dtype)


@pytest.mark.parametrize("text", POLICIES)
def test_a_row_of_non_finite_scores_does_not_disturb_the_other_rows(text: str) -> None:
    rows = np.asarray([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]], dtype=np.float32)
    broken = np.vstack([rows[:1], [[np.nan, np.inf, -np.inf]], rows[1:]]).astype(np.float32)
    policy = OutputPolicy.parse(text)
    alone = harden(policy, {"p": rows}, score_outputs=["p"])
    mixed = harden(policy, {"p": broken}, score_outputs=["p"])
    assert [value.tolist() for value in alone.values()] == [
        value[[0, 2]].tolist() for value in mixed.values()
    ]


def test_empty_batches_keep_their_shape() -> None:
    empty = np.zeros((0, 3), dtype=np.float32)
    for text in POLICIES:
        hardened = harden(OutputPolicy.parse(text), {"p": empty}, score_outputs=["p"])
        expected = [] if text == "label_only" else [(0, 3)]
        assert expected == [value.shape for value in hardened.values()]


@pytest.mark.parametrize(
    "value",
    [np.zeros((2, 3), dtype=np.int64), np.zeros(3, dtype=np.float32), [[0.5, 0.5]]],
)
def test_a_score_output_that_is_not_2d_float_is_refused_not_passed_through(value: object) -> None:
    with pytest.raises(InternalError):
        harden(OutputPolicy("top_k", k=1), {"p": value}, score_outputs=["p"])  # type: ignore[dict-item]


def test_score_outputs_of_picks_float_class_score_matrices() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 3)),
            TensorSpec("logits", "FP16", (8, 10)),
            TensorSpec("value", "FP32", (-1, 1)),
            TensorSpec("names", "BYTES", (-1, 3)),
            TensorSpec("image", "FP32", (-1, 3, 3)),
            TensorSpec("counts", "INT32", (-1, 3)),
        ),
    )
    assert score_outputs_of(signature) == ("probabilities", "logits")


def test_score_outputs_of_the_iris_model(iris: OnnxModel) -> None:
    assert score_outputs_of(iris.signature) == ("probabilities",)


@pytest.mark.parametrize(
    "text",
    ["full", "top_k=1", "top_k=3", "round=0", "round=2", "label_only", "reverse_sigmoid",
     "reverse_sigmoid=0.5:0.25", "reverse_sigmoid=2.0:1e-05"],
)  # fmt: skip
def test_canonical_policy_text_round_trips(text: str) -> None:
    policy = OutputPolicy.parse(text)
    assert text == str(policy)
    assert policy == OutputPolicy.parse(str(policy))


def test_every_buildable_policy_round_trips_through_text() -> None:
    rng = np.random.default_rng(3)
    policies = [
        OutputPolicy("full"),
        OutputPolicy("label_only"),
        *(OutputPolicy("top_k", k=int(k)) for k in rng.integers(1, 100_000, 20)),
        *(OutputPolicy("round", decimals=d) for d in range(11)),
        *(
            OutputPolicy("reverse_sigmoid", beta=float(b), gamma=float(g))
            for b, g in rng.uniform(1e-6, 100.0, (50, 2))
        ),
        OutputPolicy("reverse_sigmoid", beta=1, gamma=0.1),
    ]
    for policy in policies:
        assert policy == OutputPolicy.parse(str(policy))


def test_parse_accepts_surrounding_spaces_and_leading_zeros() -> None:
    assert OutputPolicy("top_k", k=3) == OutputPolicy.parse("  top_k=03 ")
    assert OutputPolicy("reverse_sigmoid") == OutputPolicy.parse("reverse_sigmoid=1:0.1")


HOSTILE = [
    "", " ", "FULL", "Full", "top_k", "top_k=", "top_k=0", "top_k=-1", "top_k=1.5", "top_k=1e3",
    "top_k=\uff13", "top_k=\u0663", "top_k=3 ; drop table", "top_k=3=4", "top_k=3:4",
    "top_k=100001", "top_k=" + "9" * 5000, "round=11", "round=-1", "round=nan", "round",
    "label_only=1", "full=0", "reverse_sigmoid=1", "reverse_sigmoid=nan:1", "reverse_sigmoid=inf:1",
    "reverse_sigmoid=0:1", "reverse_sigmoid=1:0", "reverse_sigmoid=101:1",
    "reverse_sigmoid=1e999:1", "reverse_sigmoid=1:2:3", "reverse_sigmoid=-1:1", "top_k=3\n",
    "top_k=3\x00", "top k=3",
    "identity", "__import__('os')", "a" * 100_000, "top_k=\N{MATHEMATICAL BOLD DIGIT THREE}",
]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE)
def test_parse_refuses_hostile_text_without_echoing_it(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        OutputPolicy.parse(text)
    message = caught.value.message
    assert len(message) <= 120
    for fragment in ("drop", "import", "aaaa", "nan", "inf", "9999", "\n", "\x00"):
        assert fragment not in message


@pytest.mark.parametrize("value", [None, 3, b"full", ["full"]])
def test_parse_refuses_non_text(value: object) -> None:
    with pytest.raises(InvalidInput):
        OutputPolicy.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "everything"},
        {"kind": "full", "k": 3},
        {"kind": "label_only", "decimals": 4},
        {"kind": "top_k", "beta": 2.0},
        {"kind": "top_k", "k": True},
        {"kind": "top_k", "k": 2.0},
        {"kind": "round", "decimals": 11},
        {"kind": "reverse_sigmoid", "beta": math.nan},
        {"kind": "reverse_sigmoid", "gamma": math.inf},
        {"kind": "reverse_sigmoid", "gamma": -0.1},
        {"kind": "reverse_sigmoid", "beta": "1"},
    ],
)
def test_constructor_refuses_parameters_out_of_range_or_for_another_kind(
    kwargs: dict[str, object],
) -> None:
    with pytest.raises(InvalidInput):
        OutputPolicy(**kwargs)  # type: ignore[arg-type]
