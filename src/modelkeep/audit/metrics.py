"""Prometheus metrics for modelkeep, in a registry of their own and with bounded labels.

Every label value is bounded, because a label value that a client controls is a series that a
client can create: model and version labels are kept only for models and versions the server
knows (``set_known_models``), anything else is ``"other"``; status is the numeric code; values
that come from modelkeep's own code (reasons, detectors, verdicts, actions) must look like
identifiers and only the first ``MAX_LABEL_VALUES`` distinct ones per label are kept.

Several worker processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set, prometheus_client writes
each process's values to memory-mapped files in that directory and ``render`` merges every
process's files (counters and histograms add up; gauges as documented on each). The variable
must be set *before the process imports prometheus_client*, which chooses its storage at import:
the server sets it to a fresh per-run directory before it starts the workers. ``Metrics`` checks
this and raises ConfigError rather than silently exporting one worker's numbers.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from modelkeep.audit.log import OUTCOMES
from modelkeep.errors import ConfigError

__all__ = ["DURATION_BUCKETS", "MAX_LABEL_VALUES", "MULTIPROC_ENV", "OTHER", "Metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The label value that stands for anything unknown, invalid or past the cardinality cap.
OTHER = "other"
#: The label value of a request that matched no route (refused before routing, unknown path).
UNMATCHED = "unmatched"
#: The version label of a request that named no version (the model's default).
DEFAULT_VERSION = "default"
#: Distinct values kept per code-supplied label (reason, detector, verdict, action, route).
MAX_LABEL_VALUES = 64
#: Seconds: 0.5 ms to 10 s, about three buckets per decade.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# prometheus_client's multiprocess helpers carry no annotations: typed seams over them.
_merge_directory: Callable[[CollectorRegistry, str], object] = multiprocess.MultiProcessCollector
_mark_process_dead: Callable[[int, str], None] = multiprocess.mark_process_dead
# Raw label inputs remembered per kind of observation (see Metrics.observe_request).
_MAX_RAW_KEYS = 4096
_IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,47}")
_ROUTE = re.compile(r"/[A-Za-z0-9_./{}:-]{0,200}")


class _BoundedLabel:
    """Keeps at most ``limit`` distinct values matching ``pattern``; everything else is OTHER."""

    def __init__(self, pattern: re.Pattern[str], limit: int = MAX_LABEL_VALUES) -> None:
        self._pattern = pattern
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not isinstance(value, str):
            return OTHER
        if value in self._seen:  # the hot path: a set lookup, no lock
            return value
        if self._pattern.fullmatch(value) is None:
            return OTHER
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value


class _Families:
    """The metric objects themselves, registered in ``registry`` (None in multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.requests = Counter(
            "modelkeep_requests",
            "HTTP requests answered, by route template, model, version and status code.",
            ["route", "model", "version", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "modelkeep_request_duration_seconds",
            "Time from the first middleware to the last response byte.",
            ["route", "model", "version"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "modelkeep_inference_duration_seconds",
            "Time spent in the model runtime for one request.",
            ["model", "version"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        # Gauges across workers: the queue and memory add up; each worker loads the same
        # models, so the number loaded is the largest of any worker rather than the sum.
        self.queue_depth = Gauge(
            "modelkeep_queue_depth",
            "Infer requests waiting or running in the bounded queue (sum over workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rate_limited = Counter(
            "modelkeep_rate_limited",
            "Requests refused with 429 by a rate, concurrency or budget limit.",
            ["model", "reason"],
            registry=r,
        )
        self.shed = Counter(
            "modelkeep_shed",
            "Requests refused with 503 because the queue was full.",
            ["model"],
            registry=r,
        )
        self.auth_failures = Counter(
            "modelkeep_auth_failures",
            "Refused credentials, by reason.",
            ["reason"],
            registry=r,
        )
        self.detector_alarms = Counter(
            "modelkeep_detector_alarms",
            "Extraction-detector alarms raised, by model and detector.",
            ["model", "detector"],
            registry=r,
        )
        self.detector_feed_dropped = Counter(
            "modelkeep_detector_feed_dropped",
            "Requests the extraction detectors never saw: their queue was full.",
            registry=r,
        )
        self.models_loaded = Gauge(
            "modelkeep_models_loaded",
            "Model versions loaded in memory (largest of any worker).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_memory = Gauge(
            "modelkeep_model_memory_bytes",
            "Bytes of plaintext model held in memory (sum over workers).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.scan_refusals = Counter(
            "modelkeep_scan_refusals",
            "Uploads refused by the malicious-content scanner, by verdict.",
            ["verdict"],
            registry=r,
        )
        self.backend_up = Gauge(
            "modelkeep_backend_up",
            "Whether each back end answered its last probe (1) or not (0); smallest of any worker.",
            ["backend", "kind"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tls_certificate_expiry = Gauge(
            "modelkeep_tls_certificate_expiry_timestamp_seconds",
            "When the server's TLS certificate expires, in Unix seconds (alert 30 days before).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.audit_entries = Counter(
            "modelkeep_audit_entries",
            "Audit log entries written, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        # Population drift of a model's inputs against its calibration reference
        # (modelkeep.guard.drift): the worst feature's score over the latest window. Each
        # worker sees its share of the traffic; the largest of any worker is exported.
        self.drift_psi = Gauge(
            "modelkeep_drift_psi",
            "Population stability index of the most drifted input feature, latest window.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_ks = Gauge(
            "modelkeep_drift_ks_statistic",
            "Largest two-sample Kolmogorov-Smirnov statistic over input features, latest window.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_features = Gauge(
            "modelkeep_drift_features_drifted",
            "Input features whose KS test rejects the reference at the configured level.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_dropped = Counter(
            "modelkeep_drift_feed_dropped",
            "Requests the drift monitor never saw: shed under load, or its queue was full.",
            registry=r,
        )


# In multiprocess mode every metric object of a process writes the same memory-mapped file, and
# two objects for one series would overwrite each other's increments: one set per process.
_shared: tuple[int, _Families] | None = None
_shared_lock = threading.Lock()


def _process_families() -> _Families:
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), _Families(None))
        return _shared[1]


class Metrics:
    """modelkeep's metrics: record with the methods below, export with ``render``.

    In-process mode (``PROMETHEUS_MULTIPROC_DIR`` unset) each instance owns a fresh
    ``CollectorRegistry``, never the global one, so instances do not see each other's values.
    Multiprocess mode: ConfigError unless the directory exists and prometheus_client was
    imported with the variable already set; instances in one process share their values, and
    ``render`` shows the merged values of every process that wrote to the directory.
    """

    def __init__(self) -> None:
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._inference_children: dict[tuple[str, str], Any] = {}
        # The same children keyed by the raw values callers pass, so that a request already
        # seen costs one lookup instead of four label functions. Label values depend on the
        # known models, so these are dropped whenever those change; bounded, since the raw
        # values (a model name in a URL) come from clients.
        self._raw_request: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._raw_inference: dict[tuple[Any, ...], Any] = {}
        directory = os.environ.get(MULTIPROC_ENV) or None
        self.multiprocess_dir: Path | None = None
        if directory is None:
            self.registry = CollectorRegistry(auto_describe=True)
            self._m = _Families(self.registry)
        else:
            path = Path(directory)
            if not path.is_dir():
                raise ConfigError(f"{MULTIPROC_ENV} is set but is not a directory")
            # prometheus_client picks its value storage when first imported; a variable set
            # later would leave this process's values in memory where render cannot see them.
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise ConfigError(
                    f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
                    "set it in the environment before the process starts"
                )
            self.multiprocess_dir = path
            self.registry = CollectorRegistry()
            _merge_directory(self.registry, str(path))
            self._m = _process_families()
        self._known: Mapping[str, frozenset[str]] = {}
        self._route = _BoundedLabel(_ROUTE, limit=4 * MAX_LABEL_VALUES)
        self._reason = _BoundedLabel(_IDENTIFIER)
        self._detector = _BoundedLabel(_IDENTIFIER)
        self._verdict = _BoundedLabel(_IDENTIFIER)
        self._action = _BoundedLabel(_IDENTIFIER)
        self._auth_reason = _BoundedLabel(_IDENTIFIER)

    # -- label bounding ---------------------------------------------------------------------

    def set_known_models(self, models: Mapping[str, Iterable[int | str]]) -> None:
        """Declare the models and versions whose names may appear as label values.

        Call it with the registry snapshot whenever it changes (``{name: version numbers}``).
        Until it is called, every model is ``"other"``.
        """
        self._known = {
            name: frozenset(str(v) for v in versions) for name, versions in models.items()
        }
        self._raw_request = {}
        self._raw_inference = {}

    def model_label(self, model: str | None) -> str:
        """The label value for ``model``: its name if known, ``"other"`` if not, ``""`` if None."""
        if model is None:
            return ""
        return model if model in self._known else OTHER

    def version_label(self, model: str | None, version: str | int | None) -> str:
        """The label value for ``version`` of ``model``.

        ``""`` without a model, ``"other"`` for an unknown model or version, ``"default"`` when
        the request named no version, else the version number.
        """
        if model is None:
            return ""
        known = self._known.get(model)
        if known is None:
            return OTHER
        if version is None:
            return DEFAULT_VERSION
        text = str(version)
        return text if text in known else OTHER

    @staticmethod
    def status_label(status: int) -> str:
        """The status code as its three digits; ``"other"`` for anything outside 100-599."""
        return str(status) if 100 <= status <= 599 else OTHER

    def route_label(self, route: str | None) -> str:
        """The route template, ``"unmatched"`` when there was none."""
        return UNMATCHED if route is None else self._route(route)

    # -- recording --------------------------------------------------------------------------

    def observe_request(
        self,
        *,
        route: str | None,
        model: str | None,
        version: str | int | None,
        status: int,
        seconds: float,
    ) -> None:
        """Count one answered request and its duration."""
        # One read: labels worked out while set_known_models swaps the dict land in the old one.
        cache = self._raw_request
        raw = (route, model, version, status)
        children = cache.get(raw)
        if children is None:
            children = self._request_children_for(route, model, version, status)
            if len(cache) >= _MAX_RAW_KEYS:
                cache.clear()
            cache[raw] = children
        children[0].inc()
        children[1].observe(seconds)

    def _request_children_for(
        self, route: str | None, model: str | None, version: str | int | None, status: int
    ) -> tuple[Any, Any]:
        route_l = self.route_label(route)
        model_l = self.model_label(model)
        version_l = self.version_label(model, version)
        key = (route_l, model_l, version_l, self.status_label(status))
        children = self._request_children.get(key)
        if children is None:
            # labels() costs microseconds per call; label sets are bounded, so keep the
            # children (prometheus_client's own advice for hot paths).
            children = (
                self._m.requests.labels(*key),
                self._m.request_duration.labels(route_l, model_l, version_l),
            )
            self._request_children[key] = children
        return children

    def observe_inference(self, *, model: str, version: str | int, seconds: float) -> None:
        """Record the time one request spent in the runtime."""
        cache = self._raw_inference  # one read, as in observe_request
        child = cache.get((model, version))
        if child is None:
            key = (self.model_label(model), self.version_label(model, version))
            child = self._inference_children.get(key)
            if child is None:
                child = self._inference_children[key] = self._m.inference_duration.labels(*key)
            if len(cache) >= _MAX_RAW_KEYS:
                cache.clear()
            cache[(model, version)] = child
        child.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        """This worker's number of infer requests in its bounded queue (waiting or running)."""
        self._m.queue_depth.set(depth)

    def rate_limited(self, *, model: str | None, reason: str) -> None:
        """Count a 429; ``reason`` is the guard's limit name (``RateLimited.details["limit"]``)."""
        self._m.rate_limited.labels(self.model_label(model), self._reason(reason)).inc()

    def shed(self, *, model: str | None) -> None:
        """Count a request refused because the queue was full."""
        self._m.shed.labels(self.model_label(model)).inc()

    def auth_failure(self, *, reason: str) -> None:
        """Count a refused credential (``AuthFailure.reason``)."""
        self._m.auth_failures.labels(self._auth_reason(reason)).inc()

    def detector_alarm(self, *, model: str | None, detector: str) -> None:
        """Count an extraction-detector alarm (``detector``: e.g. ``prada``, ``ood``)."""
        self._m.detector_alarms.labels(self.model_label(model), self._detector(detector)).inc()

    def detector_feed_dropped(self) -> None:
        """Count a request dropped from the full detector queue (never seen by the detectors)."""
        self._m.detector_feed_dropped.inc()

    def set_drift(self, *, model: str, psi: float, ks: float, drifted: int) -> None:
        """The latest drift scores of ``model`` (one window of its inputs)."""
        label = self.model_label(model)
        self._m.drift_psi.labels(label).set(psi)
        self._m.drift_ks.labels(label).set(ks)
        self._m.drift_features.labels(label).set(drifted)

    def drift_feed_dropped(self) -> None:
        """Count a request the drift monitor shed or dropped (never seen by it)."""
        self._m.drift_dropped.inc()

    def set_models_loaded(self, count: int) -> None:
        """This worker's number of loaded model versions."""
        self._m.models_loaded.set(count)

    def set_model_memory(self, *, model: str, version: str | int, nbytes: int) -> None:
        """Bytes this worker holds for one loaded version; set 0 when it is unloaded."""
        model_l = self.model_label(model)
        version_l = self.version_label(model, version)
        self._m.model_memory.labels(model_l, version_l).set(nbytes)

    def scan_refused(self, *, verdict: str) -> None:
        """Count an upload the scanner refused (``Verdict`` value, e.g. ``malicious``)."""
        self._m.scan_refusals.labels(self._verdict(verdict)).inc()

    def audit_entry(self, *, action: str, outcome: str) -> None:
        """Count one audit log entry written."""
        outcome_l = outcome if outcome in OUTCOMES else OTHER
        self._m.audit_entries.labels(self._action(action), outcome_l).inc()

    def set_backend_up(self, backend: str, kind: str, up: bool) -> None:
        """Record whether ``backend`` (of ``kind``) answered its last probe."""
        self._m.backend_up.labels(self._reason(backend), self._reason(kind)).set(1 if up else 0)

    def set_tls_certificate_expiry(self, not_after: float) -> None:
        """Record when the server certificate expires (Unix seconds)."""
        self._m.tls_certificate_expiry.set(not_after)

    # -- export -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The exposition: (body in the Prometheus text format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def close(self) -> None:
        """At worker exit in multiprocess mode: drop this process's live gauges from the merge.

        Counters and histograms stay (they are totals). Without this call (``kill -9``), a dead
        worker's last gauge values keep counting until the directory is cleared at the next run.
        """
        if self.multiprocess_dir is not None:
            _mark_process_dead(os.getpid(), str(self.multiprocess_dir))
