"""A model's guard policy: admission limits, output hardening per role, extraction detection.

Stored as JSON with the model (one policy per model, every version) and parsed once per snapshot.
Every field is validated here, so a stored policy is always one the server can apply.

A model with no stored policy gets :data:`DEFAULT_POLICY`, chosen to leak no more about its
training rows than its answers must and to slow extraction out of the box (docs/hardening.md has
the measurements): consumers see the top-1 answer only (a one-hot row, no confidence), every key
has a rate and a daily row budget, and the detectors raise alerts. Admins see full outputs. A
stored policy is applied as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from modelkeep.auth.principal import ROLES
from modelkeep.errors import InvalidInput
from modelkeep.guard.admission import Limits
from modelkeep.guard.detection import OodReference
from modelkeep.guard.hardening import OutputPolicy

DETECTORS = frozenset({"prada", "ood", "nearcopy"})
ALARM_ACTIONS = ("log", "alert", "throttle", "block")
# A throttled caller keeps this share of its rates.
THROTTLE_FACTOR = 0.1
_FULL = OutputPolicy.parse("full")
MAX_CAPTURE_DAYS = 365


@dataclass(frozen=True)
class CapturePolicy:
    """Payload capture of a model: the share of requests kept, encrypted, and for how long."""

    sample: float
    days: int

    def to_json(self) -> dict[str, Any]:
        return {"sample": self.sample, "days": self.days}

    @classmethod
    def from_json(cls, data: Any) -> CapturePolicy:
        """Parse and validate ``{"sample": 0..1, "days": 1..365}``; InvalidInput otherwise."""
        if not isinstance(data, Mapping) or set(data) != {"sample", "days"}:
            raise InvalidInput('capture is null or {"sample": 0..1, "days": 1..365}')
        sample, days = data["sample"], data["days"]
        if isinstance(sample, bool) or not isinstance(sample, int | float) or not 0 <= sample <= 1:
            raise InvalidInput("capture.sample is a number from 0 to 1")
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_CAPTURE_DAYS:
            raise InvalidInput(f"capture.days is a whole number from 1 to {MAX_CAPTURE_DAYS}")
        return cls(sample=float(sample), days=days)


@dataclass(frozen=True)
class ModelPolicy:
    """Everything the guard applies to one model's inference requests."""

    limits: Limits = field(default_factory=Limits)
    output: OutputPolicy = _FULL
    output_for: Mapping[str, OutputPolicy] = field(default_factory=lambda: MappingProxyType({}))
    detect: frozenset[str] = frozenset()
    on_alarm: str = "log"
    prada_threshold: float | None = None
    # Bucket width of the near-copy detector, fitted by `policy calibrate` (None: the default).
    nearcopy_width: float | None = None
    ood_reference: OodReference | None = None
    # Off unless set (DESIGN §1, data breaches): captured payloads are sensitive.
    capture: CapturePolicy | None = None

    @cached_property
    def limited(self) -> bool:
        """Whether any admission limit is set (no counter store is touched otherwise)."""
        return bool(self.limits.to_json())

    def output_policy(self, role: str) -> OutputPolicy:
        """The hardening a caller of ``role`` gets."""
        return self.output_for.get(role, self.output)

    def to_json(self) -> dict[str, Any]:
        return {
            "limits": self.limits.to_json(),
            "output": str(self.output),
            "output_for": {role: str(p) for role, p in sorted(self.output_for.items())},
            "detect": sorted(self.detect),
            "on_alarm": self.on_alarm,
            "prada_threshold": self.prada_threshold,
            "nearcopy_width": self.nearcopy_width,
            "ood_reference": None if self.ood_reference is None else self.ood_reference.to_json(),
            "capture": None if self.capture is None else self.capture.to_json(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelPolicy:
        """Parse and validate; InvalidInput names the field at fault."""
        if not isinstance(data, Mapping):
            raise InvalidInput("a policy must be a JSON object")
        unknown = set(data) - {
            "limits",
            "output",
            "output_for",
            "detect",
            "on_alarm",
            "prada_threshold",
            "nearcopy_width",
            "ood_reference",
            "capture",
        }
        if unknown:
            raise InvalidInput(f"unknown policy fields: {', '.join(sorted(unknown))[:200]}")
        output_for = data.get("output_for") or {}
        if not isinstance(output_for, Mapping) or not all(role in ROLES for role in output_for):
            raise InvalidInput(f"output_for maps roles ({', '.join(ROLES)}) to output policies")
        detect = data.get("detect") or []
        if not isinstance(detect, list) or not set(detect) <= DETECTORS:
            raise InvalidInput("detect is a list of: prada, ood, nearcopy")
        on_alarm = data.get("on_alarm", "log")
        if on_alarm not in ALARM_ACTIONS:
            raise InvalidInput(f"on_alarm is one of: {', '.join(ALARM_ACTIONS)}")
        threshold = data.get("prada_threshold")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold < 1
        ):
            raise InvalidInput("prada_threshold is a number between 0 and 1")
        width = data.get("nearcopy_width")
        if width is not None and (
            isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width <= 10
        ):
            raise InvalidInput("nearcopy_width is a number above 0, at most 10")
        reference = data.get("ood_reference")
        capture = data.get("capture")
        return cls(
            limits=Limits.from_json(data.get("limits") or {}),
            output=OutputPolicy.parse(str(data.get("output", "full"))),
            output_for=MappingProxyType(
                {role: OutputPolicy.parse(str(p)) for role, p in output_for.items()}
            ),
            detect=frozenset(detect),
            on_alarm=on_alarm,
            prada_threshold=None if threshold is None else float(threshold),
            nearcopy_width=None if width is None else float(width),
            ood_reference=None if reference is None else OodReference.from_json(reference),
            capture=None if capture is None else CapturePolicy.from_json(capture),
        )

    @classmethod
    def loads(cls, text: str | None) -> ModelPolicy:
        """The stored policy ``text``, or :data:`DEFAULT_POLICY` when none is stored."""
        if text is None:
            return DEFAULT_POLICY
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInput("the policy is not valid JSON") from exc
        return cls.from_json(data)

    def updated(self, **changes: Any) -> ModelPolicy:
        """A copy with some fields changed, validated like a stored policy."""
        return ModelPolicy.from_json({**self.to_json(), **changes})


# What a model with no stored policy gets; each choice is measured in bench/bench_privacy.py
# and explained in docs/hardening.md ("The defaults").
DEFAULT_OUTPUT = OutputPolicy.parse("confidence=1")
DEFAULT_POLICY = ModelPolicy(
    # A rate per key and a daily row budget: extraction and probing need many rows.
    limits=Limits(rate="100/second", budget="100000/day"),
    # Consumers get the top-1 answer alone; admins the model's own scores.
    output=DEFAULT_OUTPUT,
    output_for=MappingProxyType({"admin": _FULL}),
    # The OOD monitor acts once `modelkeep policy calibrate` has fitted its reference.
    detect=frozenset({"prada", "nearcopy", "ood"}),
    on_alarm="alert",
)

__all__ = [
    "ALARM_ACTIONS",
    "DEFAULT_OUTPUT",
    "DEFAULT_POLICY",
    "DETECTORS",
    "THROTTLE_FACTOR",
    "CapturePolicy",
    "ModelPolicy",
]
