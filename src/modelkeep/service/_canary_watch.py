"""Canary and shadow traffic on the request path, and what each replica counts of it.

Part of the data plane. ``route`` runs once per (caller, model, label) and snapshot, inside the
data plane's memoised target resolution: it picks the version a caller is served (the canary's
for callers whose bucket falls under its share, sticky) and returns a ``Watch`` for the call,
or None when the label has no canary or shadow, which is all the hot path then pays (one test).

A ``Watch`` counts each run into the arms it belongs to (a few appends) and offers a sample of
calls to the mirror: one bounded queue drained by one thread, which runs the other version on
the same decoded inputs (the primary for a canary's callers, the shadow for a shadow's sample)
and compares answers. That work never reaches the caller, never passes the gate (budgets and
rates are the caller's and untouched) and is shed first: when the server's queue is half full,
or the mirror's own queue is full (oldest dropped).

Numbers are per replica, in memory, kept for the last ``_RECENT`` runs of each arm; a restart
starts them afresh. Each replica judges its own numbers for automatic rollback (the first
replica to see a canary cross a threshold withdraws it for all).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from modelkeep.errors import ModelkeepError
from modelkeep.guard._deferred import DeferredFeed
from modelkeep.lifecycle.canary import Thresholds, WindowStats, agreement, bucket
from modelkeep.registry.records import Canary, ModelRecord, VersionRecord
from modelkeep.runtime.base import LoadedModel
from modelkeep.service._shared import log

__all__ = ["Arm", "Experiment", "Watch", "Watches"]

# Runs (and comparisons) remembered per arm: enough for percentiles over a busy window.
_RECENT = 20_000
# Mirror queue: calls waiting for their other version at most, and their input elements at
# most (the queue holds the decoded tensors); older ones are shed.
_MIRROR_CAPACITY = 256
_MIRROR_MAX_ELEMENTS = 1 << 23
# A canary's callers are compared with the primary on this share of their calls.
_COMPARE_RATE = 1.0


class Arm:
    """One version's runs in one canary or shadow: totals, and recent runs for the window."""

    __slots__ = ("agreed", "compared", "errors", "recent", "recent_agreement", "requests", "role")

    def __init__(self, role: str) -> None:
        self.role = role  # primary, canary, shadow
        self.requests = 0
        self.errors = 0
        self.agreed = 0
        self.compared = 0
        self.recent: deque[tuple[float, float, bool]] = deque(maxlen=_RECENT)
        self.recent_agreement: deque[tuple[float, int, int]] = deque(maxlen=_RECENT)

    def ran(self, now: float, seconds: float, failed: bool) -> None:
        # deque.append and int += are atomic enough under the GIL for counting.
        self.requests += 1
        if failed:
            self.errors += 1
        self.recent.append((now, seconds, failed))

    def compared_rows(self, now: float, agreed: int, rows: int) -> None:
        self.agreed += agreed
        self.compared += rows
        self.recent_agreement.append((now, agreed, rows))

    def window(self, since: float) -> WindowStats:
        """Numbers of the runs and comparisons after ``since`` (monotonic seconds)."""
        runs = _since(self.recent, since)
        latencies = np.array([r[1] for r in runs if not r[2]], dtype=np.float64) * 1000.0
        p50 = p95 = p99 = None
        if latencies.size:
            p50, p95, p99 = (float(x) for x in np.percentile(latencies, [50, 95, 99]))
        compared = _since(self.recent_agreement, since)
        return WindowStats(
            requests=len(runs),
            errors=sum(1 for r in runs if r[2]),
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            agreed=sum(c[1] for c in compared),
            compared=sum(c[2] for c in compared),
        )


T = TypeVar("T", bound=tuple[Any, ...])


def _since(recent: deque[T], since: float) -> list[T]:
    """The entries of ``recent`` (oldest first, time first) at or after ``since``: read from
    the newest back, so a judgement costs the window, not the whole history."""
    found: list[T] = []
    for entry in reversed(recent.copy()):
        if entry[0] < since:
            break
        found.append(entry)
    found.reverse()
    return found


@dataclass(slots=True)
class Experiment:
    """A canary or shadow as this replica sees it: its record and each version's arm."""

    record: Canary
    thresholds: Thresholds
    primary_version: int
    primary: Arm
    candidate: Arm
    shed: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Job:
    """Sampled work for the mirror: run ``version`` on the call's inputs and compare with the
    answer the caller got; ``runs`` counts the run into an arm (a shadow's), else only the
    comparison counts (a canary checked against its primary)."""

    experiment: Experiment
    version: VersionRecord
    rate: float
    agree: Arm
    runs: Arm | None


@dataclass(frozen=True, slots=True)
class _Mirrored:
    job: _Job
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]


class Watch:
    """What a call on a label with a canary or shadow does after its run (see module doc)."""

    __slots__ = ("_arms", "_jobs", "_watches")

    def __init__(self, watches: Watches, arms: tuple[Arm, ...], jobs: tuple[_Job, ...]) -> None:
        self._watches = watches
        self._arms = arms
        self._jobs = jobs

    def ran(
        self,
        seconds: float,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        now = time.monotonic()
        for arm in self._arms:
            arm.ran(now, seconds, False)
        watches = self._watches
        for job in self._jobs:
            if job.rate >= 1.0 or random.random() < job.rate:
                watches.offer(job, inputs, outputs)

    def failed(self) -> None:
        now = time.monotonic()
        for arm in self._arms:
            arm.ran(now, 0.0, True)


class Watches:
    """Every canary and shadow this replica has routed, and the mirror that compares them."""

    def __init__(
        self,
        session: Callable[[VersionRecord], LoadedModel],
        *,
        busy: Callable[[], bool] = lambda: False,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        self._session = session
        self.busy = busy  # the data plane sets it: its queue at half its bound
        self._on_shed = on_shed
        self._experiments: dict[tuple[str, int], Experiment] = {}
        self._lock = threading.Lock()
        self.mirror: DeferredFeed[_Mirrored] = DeferredFeed(
            self._process,
            capacity=_MIRROR_CAPACITY,
            max_cost=_MIRROR_MAX_ELEMENTS,
            linger=0.01,
            chunk=16,
        )
        self.mirror.on_drop = self._dropped
        self._last_offered: _Job | None = None

    # -- routing (once per caller and snapshot) -----------------------------------------

    def route(
        self, record: ModelRecord, label: str | None, served: VersionRecord, key_id: str
    ) -> tuple[VersionRecord, Watch | None]:
        """The version ``key_id`` is served on ``label`` (None: the default, which the
        ``production`` label defines when it exists) and the call's watch, if any."""
        name = (
            label
            if label is not None
            else ("production" if "production" in record.labels else None)
        )
        if name is None:
            return served, None
        canary = record.canaries.get(name)
        shadow = record.shadows.get(name)
        arms: list[Arm] = []
        jobs: list[_Job] = []
        primary = served
        if canary is not None and canary.version in record.versions:
            experiment = self.experiment(canary, primary.number)
            if bucket(key_id, record.name, name, canary.id) < canary.share:
                served = record.versions[canary.version]
                arms.append(experiment.candidate)
                jobs.append(_Job(experiment, primary, _COMPARE_RATE, experiment.candidate, None))
            else:
                arms.append(experiment.primary)
        if shadow is not None and shadow.version in record.versions and served is primary:
            experiment = self.experiment(shadow, primary.number)
            arms.append(experiment.primary)
            version = record.versions[shadow.version]
            jobs.append(
                _Job(
                    experiment,
                    version,
                    shadow.share / 100.0,
                    experiment.candidate,
                    experiment.candidate,
                )
            )
        if not arms:
            return served, None
        return served, Watch(self, tuple(arms), tuple(jobs))

    def experiment(self, record: Canary, primary_version: int) -> Experiment:
        key = (record.id, primary_version)
        found = self._experiments.get(key)
        if found is None:
            with self._lock:
                found = self._experiments.get(key)
                if found is None:
                    found = Experiment(
                        record,
                        Thresholds.loads(record.thresholds),
                        primary_version,
                        Arm("primary"),
                        Arm(record.mode),
                    )
                    self._experiments[key] = found
        return found

    def of(self, canary_id: str) -> list[Experiment]:
        """This replica's view of one canary or shadow (one per primary version it saw)."""
        return [e for (cid, _), e in list(self._experiments.items()) if cid == canary_id]

    def forget(self, live: set[str]) -> None:
        """Drop the numbers of canaries and shadows that are no longer live."""
        with self._lock:
            for key in [k for k in self._experiments if k[0] not in live]:
                del self._experiments[key]

    # -- the mirror (off the request path) -----------------------------------------------

    def offer(
        self, job: _Job, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
    ) -> None:
        if self.busy():
            job.experiment.shed += 1
            if self._on_shed is not None:
                self._on_shed()
            return
        cost = sum(value.size for value in inputs.values())
        if cost > _MIRROR_MAX_ELEMENTS:
            job.experiment.shed += 1
            return
        self._last_offered = job
        self.mirror.put(_Mirrored(job, inputs, outputs), max(1, cost))

    def _dropped(self) -> None:
        # The mirror's queue was full: its oldest call is shed (counted on the newest's
        # experiment, the one a full queue most likely comes from).
        job = self._last_offered
        if job is not None:
            job.experiment.shed += 1
        if self._on_shed is not None:
            self._on_shed()

    def _process(self, items: list[_Mirrored]) -> None:
        for item in items:
            job = item.job
            started = time.perf_counter()
            try:
                other = self._session(job.version).run(item.inputs, None)
            except ModelkeepError as exc:
                if job.runs is not None:
                    job.runs.ran(time.monotonic(), 0.0, True)
                log.debug("mirrored run of version %s failed: %s", job.version.number, exc.message)
                continue
            elapsed = time.perf_counter() - started
            now = time.monotonic()
            if job.runs is not None:
                job.runs.ran(now, elapsed, False)
            agreed, rows = agreement(item.outputs, other)
            if rows:
                job.agree.compared_rows(now, agreed, rows)
