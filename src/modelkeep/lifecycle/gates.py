"""Evaluation gates: what a version's metrics must reach before a protected label may point at it.

A gate is one comparison, written as the CLI and API take it::

    accuracy>=0.95            absolute: the version's accuracy is at least 0.95
    rmse<=0.3                 absolute, for a metric where lower is better
    accuracy>=production-0.02 relative: no worse than the version under label `production`
                              by more than 0.02 (``f1>=staging`` means "no worse at all")
    mae<=production+0.1       relative, lower is better: at most 0.1 above production's

Higher-is-better metrics (accuracy, f1, auc) take ``>=`` only and a relative margin ``-X``;
lower-is-better ones (rmse, mae) take ``<=`` and ``+X``. Anything else is refused when the gate
is set, with a message that says what is accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelkeep.errors import InvalidInput
from modelkeep.registry.records import NAME_PATTERN

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "MAX_GATES",
    "METRICS",
    "Gate",
    "GateResult",
    "check_gates",
    "parse_gate",
    "parse_gates",
]

HIGHER_IS_BETTER: frozenset[str] = frozenset({"accuracy", "f1", "auc"})
LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "mae"})
METRICS: tuple[str, ...] = ("accuracy", "f1", "auc", "rmse", "mae")
MAX_GATES = 16
_MAX_TEXT = 100

_GATE = re.compile(
    r"\s*(?P<metric>[a-z0-9]+)\s*(?P<op><=|>=)\s*"
    r"(?:(?P<number>[0-9]+(?:\.[0-9]+)?)"
    r"|(?P<label>[a-z][a-z0-9._-]{0,62}?)\s*(?:(?P<sign>[-+])\s*(?P<margin>[0-9]+(?:\.[0-9]+)?))?)"
    r"\s*"
)
_USAGE = (
    "a gate is METRIC>=NUMBER, METRIC<=NUMBER, METRIC>=LABEL-MARGIN or METRIC<=LABEL+MARGIN, "
    "e.g. 'accuracy>=0.95' or 'accuracy>=production-0.02'; metrics: " + ", ".join(METRICS)
)


@dataclass(frozen=True, slots=True)
class Gate:
    """One comparison; ``label`` set means relative to the version under that label."""

    metric: str
    op: str  # ">=" or "<="
    threshold: float | None = None
    label: str | None = None
    margin: float = 0.0

    @property
    def text(self) -> str:
        if self.label is None:
            return f"{self.metric}{self.op}{self.threshold:g}"
        if not self.margin:
            return f"{self.metric}{self.op}{self.label}"
        sign = "-" if self.op == ">=" else "+"
        return f"{self.metric}{self.op}{self.label}{sign}{self.margin:g}"


@dataclass(frozen=True, slots=True)
class GateResult:
    """How one gate went for one version: ``passed`` None means it could not be decided."""

    gate: Gate
    passed: bool | None
    value: float | None
    required: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.text,
            "passed": self.passed,
            "value": self.value,
            "required": self.required,
            "reason": self.reason,
        }


def parse_gate(text: object) -> Gate:
    """The gate ``text`` stands for; InvalidInput saying what is accepted otherwise."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise InvalidInput(_USAGE)
    match = _GATE.fullmatch(text)
    if match is None:
        raise InvalidInput(f"invalid gate {text[:_MAX_TEXT]!r}: {_USAGE}")
    metric, op = match["metric"], match["op"]
    if metric not in METRICS:
        raise InvalidInput(
            f"unknown metric {metric[:32]!r} in gate; use one of {', '.join(METRICS)}"
        )
    wanted = ">=" if metric in HIGHER_IS_BETTER else "<="
    if op != wanted:
        better = "higher" if wanted == ">=" else "lower"
        raise InvalidInput(f"{better} {metric} is better: its gates use {wanted}")
    if match["number"] is not None:
        threshold = float(match["number"])
        if metric in HIGHER_IS_BETTER and threshold > 1:
            raise InvalidInput(f"{metric} lies between 0 and 1: a gate above 1 never passes")
        return Gate(metric, op, threshold=threshold)
    label = match["label"]
    if NAME_PATTERN.fullmatch(label) is None:
        raise InvalidInput(f"invalid label name in gate {text[:_MAX_TEXT]!r}")
    margin = float(match["margin"]) if match["margin"] is not None else 0.0
    sign = match["sign"]
    if sign is not None and sign != ("-" if op == ">=" else "+"):
        raise InvalidInput(
            f"a relative gate allows the version to be worse by a margin: "
            f"write {metric}{op}{label}{'-' if op == '>=' else '+'}{margin:g}"
        )
    if not math.isfinite(margin):
        raise InvalidInput(_USAGE)
    return Gate(metric, op, label=label, margin=margin)


def parse_gates(texts: Sequence[object]) -> tuple[Gate, ...]:
    """Every gate of ``texts``, at most MAX_GATES, each metric/reference pair at most once."""
    if len(texts) > MAX_GATES:
        raise InvalidInput(f"at most {MAX_GATES} gates per model")
    gates = tuple(parse_gate(text) for text in texts)
    seen = {(g.metric, g.label) for g in gates}
    if len(seen) != len(gates):
        raise InvalidInput("each metric may be gated once absolutely and once per label")
    return gates


def check_gates(
    gates: Sequence[Gate],
    metrics: Mapping[str, float] | None,
    references: Mapping[str, tuple[int, Mapping[str, float] | None] | None],
) -> list[GateResult]:
    """Each gate decided for ``metrics`` (None: the version was never evaluated).

    ``references`` maps each label a relative gate names to ``(version, its metrics)``, or None
    when no version holds the label (then the relative gate has nothing to compare and passes).
    """
    results = []
    for gate in gates:
        results.append(_check(gate, metrics, references))
    return results


def _check(
    gate: Gate,
    metrics: Mapping[str, float] | None,
    references: Mapping[str, tuple[int, Mapping[str, float] | None] | None],
) -> GateResult:
    if metrics is None:
        return GateResult(gate, None, None, None, "the version has not been evaluated")
    value = metrics.get(gate.metric)
    if value is None:
        return GateResult(gate, False, None, None, f"{gate.metric} could not be computed")
    if gate.label is None:
        required = gate.threshold
    else:
        reference = references.get(gate.label)
        if reference is None:
            return GateResult(gate, True, value, None, f"no version is under {gate.label}")
        number, ref_metrics = reference
        ref_value = None if ref_metrics is None else ref_metrics.get(gate.metric)
        if ref_value is None:
            return GateResult(
                gate, None, value, None, f"version {number} under {gate.label} is not evaluated"
            )
        required = ref_value - gate.margin if gate.op == ">=" else ref_value + gate.margin
    assert required is not None
    # Metrics are stored rounded to 6 places; compare with that tolerance.
    if gate.op == ">=":
        passed = value >= required - 1e-9
        short = required - value
    else:
        passed = value <= required + 1e-9
        short = value - required
    if passed:
        return GateResult(gate, True, value, required, "passed")
    against = "" if gate.label is None else f" ({gate.label})"
    side = "below" if gate.op == ">=" else "above"
    return GateResult(
        gate,
        False,
        value,
        required,
        f"{gate.metric} is {value:.4f}, {short:.4f} {side} the required {required:.4f}{against}",
    )
