"""Output hardening: how much of a classifier's scores a caller gets to see.

Class scores are what a model-extraction attacker learns from fastest: full-precision
probabilities leak the model's geometry (for a linear model, ``d + 1`` queries recover it
exactly), a label alone leaks far less. An :class:`OutputPolicy` is set per model and applied by
:func:`harden` to every response before it is encoded:

    full             scores as the model produced them
    top_k=K          the K largest scores per row; the others are zeroed
    round=N          scores rounded to N decimals
    confidence=N     the top score alone, rounded to the nearest of N bands (1/N, 2/N .. 1);
                     the others zeroed. confidence=1 shows the top-1 class as a one-hot row
    label_only       score outputs removed; label outputs kept
    reverse_sigmoid  scores perturbed by the reverse sigmoid (Lee et al. 2018), renormalized

Every policy keeps what an honest caller relies on: the top-1 class of every row is the model's
own (checked after the transform, in the output dtype, and repaired when rounding or
perturbation would change it), and shapes and dtypes are unchanged, so a hardened response is a
valid V2 response for the model's signature. Which outputs are scores comes from the signature
(:func:`score_outputs_of`); everything else passes through untouched.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import numpy as np

from modelkeep.errors import InternalError, InvalidInput
from modelkeep.runtime.signature import ModelSignature

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "OutputPolicy",
    "PolicyKind",
    "harden",
    "score_outputs_of",
]

PolicyKind = Literal["full", "top_k", "round", "confidence", "label_only", "reverse_sigmoid"]
_KINDS: tuple[str, ...] = get_args(PolicyKind)

# Lee et al. leave beta (size of the perturbation) and gamma (its steepness) to the operator;
# these are the values commonly used as defaults: they move a 0.9 score by about 0.05 and
# keep the deceptive, non-monotone part of the transform near 0 and 1.
DEFAULT_BETA = 1.0
DEFAULT_GAMMA = 0.1

_MAX_K = 100_000
_MAX_DECIMALS = 10
_MAX_BETA = 100.0
_MAX_GAMMA = 100.0
_MAX_TEXT = 64
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
# Scores are clipped this far from 0 and 1 before the logit, which is infinite at both ends.
_CLIP = 1e-9
# How far a row may be from summing to 1 and still be read as probabilities, not logits.
_SUM_TOLERANCE = 1e-3

_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_POLICY_TEXT = re.compile(
    rf"(?P<kind>[a-z_]+)(?:=(?P<first>{_NUMBER})(?::(?P<second>{_NUMBER}))?)?", re.ASCII
)
_FORMS = "full, top_k=K, round=N, confidence=N, label_only, reverse_sigmoid[=BETA:GAMMA]"
_MAX_BANDS = 100


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """How a model's class scores are shown to callers; see the module docstring.

    Parameters that do not belong to ``kind`` must keep their defaults, so that
    ``OutputPolicy.parse(str(policy)) == policy`` holds for every policy that can be built.
    Raises ``InvalidInput`` for an unknown kind or a parameter out of range.
    """

    kind: PolicyKind
    k: int = 1
    decimals: int = 2
    bands: int = 1
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidInput(f"unknown output policy; use one of: {_FORMS}")
        _check_int("k", self.k, 1, _MAX_K, applies=self.kind == "top_k", default=1)
        _check_int(
            "decimals",
            self.decimals,
            0,
            _MAX_DECIMALS,
            applies=self.kind == "round",
            default=2,
        )
        _check_int("bands", self.bands, 1, _MAX_BANDS, applies=self.kind == "confidence", default=1)
        for name, value, upper, default in (
            ("beta", self.beta, _MAX_BETA, DEFAULT_BETA),
            ("gamma", self.gamma, _MAX_GAMMA, DEFAULT_GAMMA),
        ):
            if type(value) not in (int, float) or not 0.0 < value <= upper:
                raise InvalidInput(f"reverse_sigmoid {name} must be a number in (0, {upper:g}]")
            if self.kind != "reverse_sigmoid" and value != default:
                raise InvalidInput(f"{name} only applies to the reverse_sigmoid policy")
            object.__setattr__(self, name, float(value))

    @classmethod
    def parse(cls, text: str) -> OutputPolicy:
        """Read ``full``, ``top_k=K``, ``round=N``, ``confidence=N``, ``label_only``,
        ``reverse_sigmoid`` or
        ``reverse_sigmoid=BETA:GAMMA`` (ASCII digits only; surrounding spaces are ignored).

        Raises ``InvalidInput``, without echoing the text, for anything else.
        """
        if not isinstance(text, str) or len(text) > _MAX_TEXT:
            raise InvalidInput(f"an output policy is one of: {_FORMS}")
        match = _POLICY_TEXT.fullmatch(text.strip(" \t"))
        if match is None or match["kind"] not in _KINDS:
            raise InvalidInput(f"an output policy is one of: {_FORMS}")
        kind = cast(PolicyKind, match["kind"])
        first, second = match["first"], match["second"]
        if kind in ("full", "label_only"):
            if first is not None:
                raise InvalidInput(f"the {kind} output policy takes no value")
            return cls(kind)
        if kind == "reverse_sigmoid":
            if first is None:
                return cls(kind)
            if second is None:
                raise InvalidInput("write the reverse_sigmoid policy as reverse_sigmoid=BETA:GAMMA")
            return cls(kind, beta=_finite(first), gamma=_finite(second))
        if first is None or second is not None or not first.isdigit():
            raise InvalidInput(f"write the {kind} policy as {kind}=INTEGER")
        if len(first) > 6:  # past any allowed value; keeps int() off huge digit strings
            raise InvalidInput(f"the {kind} value is out of range")
        if kind == "top_k":
            return cls(kind, k=int(first))
        if kind == "confidence":
            return cls(kind, bands=int(first))
        return cls(kind, decimals=int(first))

    def __str__(self) -> str:
        if self.kind == "top_k":
            return f"top_k={self.k}"
        if self.kind == "round":
            return f"round={self.decimals}"
        if self.kind == "confidence":
            return f"confidence={self.bands}"
        if self.kind == "reverse_sigmoid" and (self.beta, self.gamma) != (
            DEFAULT_BETA,
            DEFAULT_GAMMA,
        ):
            # repr() of a float is the shortest text that reads back as the same float.
            return f"reverse_sigmoid={self.beta!r}:{self.gamma!r}"
        return self.kind


def score_outputs_of(signature: ModelSignature) -> tuple[str, ...]:
    """The outputs of ``signature`` that hold class scores, in signature order.

    A score output is a floating-point tensor of shape ``[N, C]`` with a fixed ``C >= 2``
    (``N`` is usually ``-1``), such as skl2onnx's ``probabilities``. Labels (integers or
    strings), regression values (``C = 1``) and tensors of other ranks are not scores.
    """
    return tuple(
        spec.name
        for spec in signature.outputs
        if spec.datatype in _FLOAT_DATATYPES and len(spec.shape) == 2 and spec.shape[1] >= 2
    )


def harden(
    policy: OutputPolicy, outputs: Mapping[str, np.ndarray], *, score_outputs: Sequence[str]
) -> dict[str, np.ndarray]:
    """Apply ``policy`` to the ``score_outputs`` among ``outputs``; a new dict, same order.

    Guarantees, for every policy: outputs that are not scores are passed through as they are;
    ``label_only`` removes the score outputs; every other policy returns each score output with
    its shape and dtype, and ``argmax`` of each row (numpy's, first index on ties) equal to the
    model's. Inputs are never modified. A score output that is not a 2-D floating-point array
    raises ``InternalError``: a misdeclared output is refused rather than sent unhardened.
    """
    scores = frozenset(score_outputs)
    hardened: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if name not in scores or policy.kind == "full":
            hardened[name] = value
        elif policy.kind != "label_only":
            hardened[name] = _harden_scores(policy, _checked_scores(name, value))
    return hardened


def _harden_scores(policy: OutputPolicy, scores: np.ndarray) -> np.ndarray:
    if scores.shape[0] == 0:
        return scores.copy()
    if policy.kind == "confidence":
        # The default policy, so on most requests: built in the output dtype around the
        # model's own argmax, it needs neither the float64 round trip nor the repair.
        return _banded_top(scores, policy.bands)
    # A row with non-finite scores (a broken model) has no top class to keep: its hardened
    # values are unspecified, but it must not raise, warn, or change how other rows come out.
    with np.errstate(all="ignore"):
        return _transform(policy, scores)


def _transform(policy: OutputPolicy, scores: np.ndarray) -> np.ndarray:
    wide = scores.astype(np.float64)
    if policy.kind == "top_k":
        result = _top_k(wide, policy.k)
    elif policy.kind == "round":
        result = np.round(wide, policy.decimals)
        # Rounding is monotone but can tie the top score with a lower-index one; one unit in
        # the last kept decimal puts the true top class back in front.
        top = np.argmax(wide, axis=1)
        tied = np.argmax(result, axis=1) != top
        result[tied, top[tied]] += 10.0 ** (-policy.decimals)
    else:
        result = _reverse_sigmoid(wide, policy.beta, policy.gamma)
    return _keep_top(scores, result.astype(scores.dtype))


def _banded_top(scores: np.ndarray, bands: int) -> np.ndarray:
    """The top score of each row, rounded to the nearest of 1/bands .. 1; the others 0.

    The band never drops below 1/bands and every other score is 0, so the top class is the
    model's own in any float dtype. Rows with negative scores (logits) get the band of their
    softmax probability. A handful of whole-array operations, no per-row work.
    """
    # Few and cheap numpy calls (np.clip and np.round cost several times a ufunc): this runs
    # on every default request, where each array is a row or a few.
    top = scores.argmax(axis=1)
    if bands == 1:
        # One band (the default, confidence=1): every top score shows as 1, a one-hot row,
        # whatever its value; rows of an identity matrix, no arithmetic at all.
        one_hot: np.ndarray = _identity(scores.shape[1], scores.dtype)[top]
        return one_hot
    rows = np.arange(top.size)
    result = np.zeros(scores.shape, scores.dtype)
    confidence = scores[rows, top]
    # Non-finite scores (a broken model) must not raise or warn; their rows are unspecified.
    with np.errstate(all="ignore"):
        if (scores < 0.0).any():
            confidence = 1.0 / np.exp(scores - confidence[:, None]).sum(axis=1)
        band = np.maximum(np.minimum(np.rint(confidence * bands), bands), 1.0) / bands
    result[rows, top] = band
    return result


@functools.lru_cache(maxsize=64)
def _identity(classes: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A read-only identity matrix; indexing it with rows makes a new array."""
    identity = np.eye(classes, dtype=dtype)
    identity.setflags(write=False)
    return identity


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    if k >= scores.shape[1]:
        return scores
    result: np.ndarray
    # A stable sort of the negated scores ranks ties by lower index first, as argmax does.
    keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    kept = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(kept, keep, True, axis=1)
    # Zero is right for probabilities; for scores that can be negative (logits) a dropped
    # entry must still sit below every kept one, or it could become the top class.
    kept_min = np.min(np.where(kept, scores, np.inf), axis=1)
    non_negative = np.all(scores >= 0.0, axis=1)
    fill = np.where(non_negative, 0.0, np.minimum(0.0, kept_min - 1.0))
    result = np.where(kept, scores, fill[:, None])
    return result


def _reverse_sigmoid(scores: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Lee et al. 2018: ``y - beta * (sigmoid(gamma * logit(y)) - 1/2)``, clipped, renormalized.

    The perturbation is small for mid-range scores and reverses the slope of the output near 0
    and 1, so an attacker fitting the logits (or distilling on the scores) learns a deceptive
    gradient, while the ordering of the large scores, and so the answer, barely moves.
    """
    probabilities = scores
    # Decided on the finite rows only, so one broken row cannot change how the others read.
    finite = scores[np.all(np.isfinite(scores), axis=1)]
    looks_like_probabilities = bool(np.all((finite >= 0.0) & (finite <= 1.0))) and bool(
        np.all(np.abs(finite.sum(axis=1) - 1.0) <= _SUM_TOLERANCE)
    )
    if not looks_like_probabilities:
        # Logits (or anything not a distribution): the transform is defined on probabilities.
        shifted = np.exp(scores - np.max(scores, axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    clipped = np.clip(probabilities, _CLIP, 1.0 - _CLIP)
    logit = np.log(clipped) - np.log1p(-clipped)
    perturbation = beta * (1.0 / (1.0 + np.exp(-gamma * logit)) - 0.5)
    perturbed = np.clip(probabilities - perturbation, 0.0, 1.0)
    totals = perturbed.sum(axis=1, keepdims=True)
    width = scores.shape[1]
    normalized: np.ndarray = np.where(
        totals > 0.0, perturbed / np.where(totals > 0.0, totals, 1.0), 1.0 / width
    )
    # A large beta can push the top score under another one; swapping the two values keeps
    # the row a distribution and puts the model's answer back on top.
    rows = np.arange(scores.shape[0])
    top = np.argmax(scores, axis=1)
    now = np.argmax(normalized, axis=1)
    moved = rows[now != top]
    normalized[moved, top[moved]], normalized[moved, now[moved]] = (
        normalized[moved, now[moved]],
        normalized[moved, top[moved]],
    )
    return normalized


def _keep_top(original: np.ndarray, hardened: np.ndarray) -> np.ndarray:
    # The last word, in the output dtype: a cast can still create a tie that argmax breaks
    # toward a lower index. Such a row gets its true top score nudged one step above the rest.
    finite = np.all(np.isfinite(original), axis=1)
    top = np.argmax(original, axis=1)
    wrong = np.flatnonzero(finite & (np.argmax(hardened, axis=1) != top))
    for row in wrong:
        ceiling = np.max(hardened[row])
        hardened[row, top[row]] = np.nextafter(ceiling, np.inf, dtype=hardened.dtype)
    return hardened


def _checked_scores(name: str, value: np.ndarray) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind != "f":
        raise InternalError(f"score output {name[:64]!r} is not a 2-D floating-point tensor")
    return value


def _check_int(
    name: str, value: int, lower: int, upper: int, *, applies: bool, default: int
) -> None:
    if type(value) is not int or not lower <= value <= upper:
        raise InvalidInput(f"output policy {name} must be an integer in [{lower}, {upper}]")
    if not applies and value != default:
        owner = {"k": "top_k", "decimals": "round", "bands": "confidence"}[name]
        raise InvalidInput(f"{name} only applies to the {owner} policy")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput("reverse_sigmoid parameters must be finite numbers")
    return value
