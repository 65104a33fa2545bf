"""Gate expressions: what is accepted, what is refused (clearly), and how gates are decided."""

from __future__ import annotations

import pytest

from modelkeep.errors import InvalidInput
from modelkeep.lifecycle.gates import Gate, check_gates, parse_gate, parse_gates


@pytest.mark.parametrize(
    ("text", "gate"),
    [
        ("accuracy>=0.95", Gate("accuracy", ">=", threshold=0.95)),
        (" f1 >= 0.8 ", Gate("f1", ">=", threshold=0.8)),
        ("auc>=0.9", Gate("auc", ">=", threshold=0.9)),
        ("rmse<=0.3", Gate("rmse", "<=", threshold=0.3)),
        ("mae<=12", Gate("mae", "<=", threshold=12.0)),
        ("accuracy>=production-0.02", Gate("accuracy", ">=", label="production", margin=0.02)),
        ("f1>=staging", Gate("f1", ">=", label="staging")),
        ("rmse<=production+0.1", Gate("rmse", "<=", label="production", margin=0.1)),
    ],
)
def test_gates_parse(text: str, gate: Gate) -> None:
    assert parse_gate(text) == gate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("accuracy>0.95", "a gate is METRIC>=NUMBER"),
        ("accuracy<=0.95", "higher accuracy is better: its gates use >="),
        ("rmse>=0.1", "lower rmse is better: its gates use <="),
        ("precision>=0.9", "unknown metric 'precision'"),
        ("accuracy>=1.5", "a gate above 1 never passes"),
        ("accuracy>=production+0.1", "write accuracy>=production-0.1"),
        ("accuracy>=0.9; drop table", "a gate is METRIC>=NUMBER"),
        ("__import__('os')", "a gate is METRIC>=NUMBER"),
        ("accuracy>=-1", "a gate is METRIC>=NUMBER"),
        ("accuracy>=0.9.1", "a gate is METRIC>=NUMBER"),
        ("x" * 500, "a gate is METRIC>=NUMBER"),
    ],
)
def test_bad_gates_are_refused_with_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_gate(text)
    assert message in info.value.message


def test_a_metric_is_gated_once_per_reference() -> None:
    with pytest.raises(InvalidInput, match="once"):
        parse_gates(["accuracy>=0.9", "accuracy>=0.95"])
    assert len(parse_gates(["accuracy>=0.9", "accuracy>=production-0.01"])) == 2
    with pytest.raises(InvalidInput, match="at most 16"):
        parse_gates(["accuracy>=0.9"] * 17)


def test_a_failed_gate_says_by_how_much() -> None:
    [result] = check_gates([parse_gate("accuracy>=0.95")], {"accuracy": 0.9133}, {})
    assert (result.passed, result.value, result.required) == (False, 0.9133, 0.95)
    assert result.reason == "accuracy is 0.9133, 0.0367 below the required 0.9500"


def test_relative_gates_compare_with_the_reference_given() -> None:
    gates = [parse_gate("accuracy>=production-0.02"), parse_gate("rmse<=production+0.1")]
    metrics = {"accuracy": 0.90, "rmse": 0.5}
    worse = check_gates(gates, metrics, {"production": (3, {"accuracy": 0.95, "rmse": 0.35})})
    assert [r.passed for r in worse] == [False, False]
    assert worse[0].reason == ("accuracy is 0.9000, 0.0300 below the required 0.9300 (production)")
    near = check_gates(gates, metrics, {"production": (3, {"accuracy": 0.91, "rmse": 0.45})})
    assert [r.passed for r in near] == [True, True]
    nothing = check_gates(gates, metrics, {"production": None})
    assert [r.passed for r in nothing] == [True, True]
    unknown = check_gates(gates, metrics, {"production": (3, None)})
    assert [r.passed for r in unknown] == [None, None]


def test_an_unevaluated_version_is_undecided_not_passed() -> None:
    [result] = check_gates([parse_gate("accuracy>=0.5")], None, {})
    assert (result.passed, result.reason) == (None, "the version has not been evaluated")
