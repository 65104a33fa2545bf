"""The inference gate: what the guard does around one inference call.

Before: admission (size, rates, budget, concurrency) under the model's policy. After: feed the
extraction detectors with the caller's query and the model's answer, then harden the outputs
for the caller's role. The service decides what an alarm leads to (log, alert, throttle, block).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from modelkeep.errors import InvalidInput
from modelkeep.guard._deferred import DeferredFeed
from modelkeep.guard._redis_state import RedisDetectorState
from modelkeep.guard.admission import Admission, Admitted
from modelkeep.guard.detection import (
    DetectionResult,
    DetectorState,
    InMemoryDetectorState,
    NearCopyConfig,
    NearCopyDetector,
    OodMonitor,
    OodReference,
    PradaConfig,
    PradaDetector,
    calibrate_nearcopy,
    calibrate_prada,
)
from modelkeep.guard.hardening import harden, score_outputs_of
from modelkeep.guard.policy import THROTTLE_FACTOR, ModelPolicy
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.signature import ModelSignature, numpy_dtype

log = logging.getLogger(__name__)


# An uncalibrated near-copy detector watches inputs of at least this many features: in fewer
# dimensions natural rows (iris, say) are near-copies of one another at the default width.
_UNCALIBRATED_MIN_FEATURES = 16

# PRADA checks W once per this many new distances: on by default, the detector must cost a
# one-row request little (see PradaConfig.check_every).
_PRADA_CHECK_EVERY = 8

# What admission grants when a model has no limits: nothing counted, nothing to release.
_UNLIMITED = Admitted()

# Alarm actions that never change the answer being sent: their detectors are fed off the
# request path (see InferenceGate.observe).
_DEFERRABLE = frozenset({"log", "alert"})
# Requests whose watched tensors (the first input and the answer) hold more elements than this
# are fed on the request path; the queue holds at most DeferredFeed's max_cost (4M) elements.
_DEFER_MAX_ELEMENTS = 1 << 16


@dataclass(frozen=True, slots=True)
class Alarm:
    detector: str
    score: float | None
    samples: int


# Where deferred alarms go: (caller key, model, policy, alarms).
AlarmSink = Callable[[str, str, ModelPolicy, list[Alarm]], None]


@dataclass(frozen=True, slots=True)
class _Observation:
    """One request queued for the detectors: its rows and the model's answer to them.

    Only the two arrays the detectors read are kept, not the request's dicts: every object
    the garbage collector tracks that a queued request keeps alive moves the collector toward
    a full pass over the server's heap (a pause of 100 ms or more, measured with the defaults
    on: bench/README.md), so a queued request holds as few as it can.
    """

    principal: str
    model: str
    version: int
    policy: ModelPolicy
    x: np.ndarray | None
    answer: np.ndarray | None
    sink: AlarmSink


def request_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows in a request: the leading dimension of its inputs (1 for scalars)."""
    first = next(iter(inputs.values()), None)
    if first is None or first.ndim == 0:
        return 1
    return int(first.shape[0])


class InferenceGate:
    """Admission, detection and hardening for every model of one worker."""

    def __init__(
        self,
        admission: Admission,
        *,
        state_factory: Callable[[str], DetectorState] | None = None,
    ) -> None:
        """``state_factory(namespace)`` gives each detector its store (default: in process)."""
        self.admission = admission
        self._state_factory = state_factory or _in_memory
        self._policies: dict[tuple[str, str | None], ModelPolicy] = {}
        self._prada: dict[tuple[str, float | None], PradaDetector] = {}
        self._ood: dict[tuple[str, int], OodMonitor] = {}
        self._nearcopy: dict[tuple[str, float | None], NearCopyDetector] = {}
        self._lock = threading.Lock()
        # Requests waiting for the detectors (log and alert modes), fed in batches.
        self.feed: DeferredFeed[_Observation] = DeferredFeed(self._feed_batch)

    def policy(self, model: str, policy_json: str | None) -> ModelPolicy:
        """The parsed policy, cached per stored text (parsed once, not per request)."""
        key = (model, policy_json)
        found = self._policies.get(key)
        if found is None:
            found = ModelPolicy.loads(policy_json)
            with self._lock:
                self._policies = {k: v for k, v in self._policies.items() if k[0] != model}
                self._policies[key] = found
        return found

    def admit(
        self, principal: str, model: str, rows: int, policy: ModelPolicy, *, throttled: bool
    ) -> Admitted:
        if not policy.limited:
            return _UNLIMITED
        factor = THROTTLE_FACTOR if throttled else 1.0
        return self.admission.admit(principal, model, rows, policy.limits, throttle_factor=factor)

    def observe(
        self,
        principal: str,
        model: str,
        version: int,
        policy: ModelPolicy,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        signature: ModelSignature,
        *,
        sink: AlarmSink | None = None,
    ) -> list[Alarm]:
        """Feed the enabled detectors; returns the alarms raised by this request.

        With a ``sink`` and a policy whose alarms only log or alert, the request is queued
        for the background feeder instead (see ``guard._deferred``): the alarms go to ``sink``
        within a bounded delay and this returns no alarm. ``throttle`` and ``block`` act on the
        request that raised the alarm, so they are fed here, synchronously.
        """
        if not policy.detect:
            return []
        x, answer = _watched(inputs, outputs, signature)
        if sink is not None and policy.on_alarm in _DEFERRABLE:
            cost = (0 if x is None else x.size) + (0 if answer is None else answer.size)
            # A large request is fed here: the queue's memory stays small, and one big call
            # already pays the detectors' fixed cost once for many rows.
            if cost <= _DEFER_MAX_ELEMENTS:
                self.feed.put(
                    _Observation(principal, model, version, policy, x, answer, sink), cost
                )
                return []
        return self._observe(principal, model, version, policy, [(x, answer)])

    def _feed_batch(self, batch: list[_Observation]) -> None:
        """Feed a batch of queued requests: each caller's requests in one call per detector."""
        groups: dict[tuple[str, str, int, int], list[_Observation]] = {}
        for item in batch:
            key = (item.principal, item.model, item.version, id(item.policy))
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            first = items[0]
            calls = [(item.x, item.answer) for item in items]
            try:
                alarms = self._observe(
                    first.principal, first.model, first.version, first.policy, calls
                )
            except InvalidInput as exc:
                log.warning("detectors skipped %d requests on %s: %s", len(items), first.model, exc)
                continue
            if alarms:
                first.sink(first.principal, first.model, first.policy, alarms)

    def _observe(
        self,
        principal: str,
        model: str,
        version: int,
        policy: ModelPolicy,
        calls: list[tuple[np.ndarray | None, np.ndarray | None]],
    ) -> list[Alarm]:
        """Feed one caller's consecutive calls (``_watched`` of each), as if made one by one,
        to the detectors. The calls' rows are converted and stacked in one go, so a batch of
        one-row requests costs the detectors a few numpy calls, not a few per request."""
        xs: list[np.ndarray] = []
        answers: list[np.ndarray] = []
        labelled: list[np.ndarray] = []
        for x, answer in calls:
            if x is None:
                continue
            x = x.reshape(x.shape[0], -1)
            # Rows of another width cannot join the caller's stream (PRADA refuses them).
            if xs and x.shape[1] != xs[0].shape[1]:
                continue
            xs.append(x)
            if "prada" in policy.detect and answer is not None and len(answer) == len(x):
                answers.append(answer)
                labelled.append(x)
        if not xs:
            return []
        rows = _stack(xs).astype(np.float64, copy=False)
        client = f"{principal}@{version}"
        alarms: list[Alarm] = []
        if labelled:
            prada = self._prada_for(model, policy.prada_threshold)
            stacked = _stack(answers)
            result = prada.observe_calls(
                client,
                rows if len(labelled) == len(xs) else _stack(labelled).astype(np.float64),
                stacked if stacked.ndim == 1 else stacked.argmax(axis=1),
                [len(x) for x in labelled],
            )
            if result.alarm:
                alarms.append(Alarm("prada", result.score, result.samples))
        if "nearcopy" in policy.detect:
            # Rows of one call are already taken as if sent one by one: the same for several.
            result = self._nearcopy_for(model, policy.nearcopy_width).observe(client, rows)
            if result.alarm:
                alarms.append(Alarm("nearcopy", result.score, result.samples))
        if "ood" in policy.detect and policy.ood_reference is not None:
            monitor = self._ood_for(model, policy)
            # The OOD verdict is the share after each call: fed call by call.
            worst: DetectionResult | None = None
            start = 0
            for x in xs:
                result = monitor.observe(client, rows[start : start + len(x)])
                start += len(x)
                if result.alarm and (worst is None or (result.score or 0) > (worst.score or 0)):
                    worst = result
            if worst is not None:
                alarms.append(Alarm("ood", worst.score, worst.samples))
        return alarms

    def reset(self, principal: str, model: str, versions: list[int]) -> None:
        """Forget a caller's detector history on a model (an admin lifted its block)."""
        for (name, _), detector in list(self._prada.items()):
            if name == model:
                for version in versions:
                    detector.reset(f"{principal}@{version}")
        for (name, _), nearcopy in list(self._nearcopy.items()):
            if name == model:
                for version in versions:
                    nearcopy.reset(f"{principal}@{version}")
        for (name, _), monitor in list(self._ood.items()):
            if name == model:
                for version in versions:
                    monitor.reset(f"{principal}@{version}")

    @staticmethod
    def harden(
        policy: ModelPolicy,
        role: str,
        outputs: Mapping[str, np.ndarray],
        signature: ModelSignature,
    ) -> dict[str, np.ndarray]:
        output_policy = policy.output_policy(role)
        if output_policy.kind == "full":
            return dict(outputs)
        return harden(output_policy, outputs, score_outputs=score_outputs_of(signature))

    def _prada_for(self, model: str, threshold: float | None) -> PradaDetector:
        key = (model, threshold)
        detector = self._prada.get(key)
        if detector is None:
            config = PradaConfig(check_every=_PRADA_CHECK_EVERY)
            if threshold is not None:
                config = replace(config, threshold=threshold)
            with self._lock:
                detector = self._prada.setdefault(
                    key, PradaDetector(config, state=self._state_factory(f"{model}/prada"))
                )
        return detector

    def _nearcopy_for(self, model: str, width: float | None) -> NearCopyDetector:
        key = (model, width)
        detector = self._nearcopy.get(key)
        if detector is None:
            # Uncalibrated, the default width suits inputs of many features only.
            config = (
                NearCopyConfig(min_features=_UNCALIBRATED_MIN_FEATURES)
                if width is None
                else NearCopyConfig(width=width)
            )
            with self._lock:
                detector = self._nearcopy.setdefault(
                    key,
                    NearCopyDetector(config, state=self._state_factory(f"{model}/nearcopy")),
                )
        return detector

    def _ood_for(self, model: str, policy: ModelPolicy) -> OodMonitor:
        assert policy.ood_reference is not None
        key = (model, id(policy.ood_reference))
        monitor = self._ood.get(key)
        if monitor is None:
            with self._lock:
                monitor = self._ood.setdefault(
                    key,
                    OodMonitor(policy.ood_reference, state=self._state_factory(f"{model}/ood")),
                )
        return monitor


def _in_memory(_namespace: str) -> DetectorState:
    return InMemoryDetectorState()


def shared_state_factory(url: str) -> Callable[[str], DetectorState]:
    """Detector stores in Redis at ``url``, one namespace per model and detector."""

    def factory(namespace: str) -> DetectorState:
        return RedisDetectorState(url, namespace=f"modelkeep:detector:{namespace}")

    return factory


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _watched(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], signature: ModelSignature
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What the detectors read of one request: its first input, if it is numeric rows, and
    the output its predicted classes come from (:func:`_answer`)."""
    first = next(iter(inputs.values()), None)
    # A batch of zero rows has nothing to watch (and cannot be reshaped to rows x features).
    if first is None or first.ndim == 0 or first.dtype.kind not in "biuf" or first.shape[0] == 0:
        first = None
    return first, _answer(outputs, signature)


def _answer(outputs: Mapping[str, np.ndarray], signature: ModelSignature) -> np.ndarray | None:
    """An integer or string label output (one label per row), else the first score output
    (one row of scores per row, the top one is the predicted class)."""
    for spec in signature.outputs:
        value = outputs.get(spec.name)
        if value is not None and value.ndim == 1 and value.dtype.kind in "iuO":
            return value
    for name in score_outputs_of(signature):
        value = outputs.get(name)
        if value is not None and value.ndim == 2:
            return value
    return None


def _predicted(outputs: Mapping[str, np.ndarray], signature: ModelSignature) -> np.ndarray | None:
    """The predicted class per row: an integer or string label output, else the top score."""
    answer = _answer(outputs, signature)
    if answer is None or answer.ndim == 1:
        return answer
    top: np.ndarray = answer.argmax(axis=1)
    return top


def calibrate(
    model: LoadedModel,
    signature: ModelSignature,
    rows: list[list[float]],
) -> tuple[float, float, OodReference]:
    """A PRADA threshold, a near-copy bucket width and an OOD reference from benign rows run
    through ``model``.

    The rows are dealt to simulated benign callers of ``3 * min_samples`` queries each (a
    caller's first query per class yields no distance, so shorter streams never score).
    """
    if len(signature.inputs) != 1:
        raise InvalidInput("calibration needs a model with exactly one input")
    spec = signature.inputs[0]
    try:
        x = np.asarray(rows, dtype=numpy_dtype(spec.datatype))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("benign rows must be a rectangular list of numbers") from exc
    per_client = 3 * PradaConfig().min_samples
    if x.ndim != 2 or len(x) < 2 * per_client:
        raise InvalidInput(
            f"give at least {2 * per_client} benign rows (two or more simulated callers of"
            f" {per_client} queries each)"
        )
    clients = len(x) // per_client
    outputs = model.run({spec.name: x})
    predicted = _predicted(outputs, signature)
    if predicted is None:
        raise InvalidInput("the model has no label or score output to calibrate on")
    features = x.astype(np.float64).reshape(len(x), -1)
    streams = [(features[i::clients], predicted[i::clients]) for i in range(clients)]
    # Twenty simulated callers tell the natural density of the rows well enough, and keep the
    # replay (up to one per candidate width) to seconds however many rows were sent.
    width = calibrate_nearcopy([stream for stream, _ in streams[:20]])
    return calibrate_prada(streams), width, OodMonitor.fit(features)
