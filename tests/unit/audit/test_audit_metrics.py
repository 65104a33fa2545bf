"""Metrics: exact names and label sets, bounded label values, own registry, multiprocess mode."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelkeep.audit.metrics import (
    DURATION_BUCKETS,
    MAX_LABEL_VALUES,
    MULTIPROC_ENV,
    Metrics,
)
from modelkeep.errors import ConfigError

INFER = "/v2/models/{model}/infer"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered exposition, keyed by name and labels (as Prometheus sees)."""
    body, _ = metrics.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples(metrics).items() if n == name and wanted <= got)


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.set_known_models({"iris": [1, 2], "mnist": [7]})
    return m


def record_one_of_each(m: Metrics) -> None:
    m.observe_request(route=INFER, model="iris", version="1", status=200, seconds=0.003)
    m.observe_inference(model="iris", version=1, seconds=0.001)
    m.set_queue_depth(4)
    m.rate_limited(model="iris", reason="budget")
    m.shed(model="iris")
    m.auth_failure(reason="invalid")
    m.detector_alarm(model="iris", detector="prada")
    m.detector_feed_dropped()
    m.set_models_loaded(2)
    m.set_model_memory(model="iris", version=1, nbytes=1024)
    m.scan_refused(verdict="malicious")
    m.audit_entry(action="model.push", outcome="success")
    m.set_tls_certificate_expiry(1_800_000_000.0)
    m.set_backend_up("database", "postgresql", True)
    m.set_drift(model="iris", psi=0.3, ks=0.2, drifted=1)
    m.drift_feed_dropped()


def test_metric_names_and_label_sets_are_exactly_the_documented_ones(metrics: Metrics) -> None:
    record_one_of_each(metrics)
    seen: dict[str, set[str]] = {}
    for name, labels in samples(metrics):
        if name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        seen.setdefault(name, set()).update(k for k, _ in labels if k != "le")
    request = {"route", "model", "version"}
    assert seen == {
        "modelkeep_requests_total": {"route", "model", "version", "status"},
        "modelkeep_request_duration_seconds_bucket": request,
        "modelkeep_request_duration_seconds_count": request,
        "modelkeep_request_duration_seconds_sum": request,
        "modelkeep_inference_duration_seconds_bucket": {"model", "version"},
        "modelkeep_inference_duration_seconds_count": {"model", "version"},
        "modelkeep_inference_duration_seconds_sum": {"model", "version"},
        "modelkeep_queue_depth": set(),
        "modelkeep_rate_limited_total": {"model", "reason"},
        "modelkeep_shed_total": {"model"},
        "modelkeep_auth_failures_total": {"reason"},
        "modelkeep_detector_alarms_total": {"model", "detector"},
        "modelkeep_detector_feed_dropped_total": set(),
        "modelkeep_models_loaded": set(),
        "modelkeep_model_memory_bytes": {"model", "version"},
        "modelkeep_scan_refusals_total": {"verdict"},
        "modelkeep_audit_entries_total": {"action", "outcome"},
        "modelkeep_tls_certificate_expiry_timestamp_seconds": set(),
        "modelkeep_backend_up": {"backend", "kind"},
        "modelkeep_drift_psi": {"model"},
        "modelkeep_drift_ks_statistic": {"model"},
        "modelkeep_drift_features_drifted": {"model"},
        "modelkeep_drift_feed_dropped_total": set(),
    }


def test_recorded_values_are_exported(metrics: Metrics) -> None:
    record_one_of_each(metrics)
    record_one_of_each(metrics)
    assert (
        value(
            metrics,
            "modelkeep_requests_total",
            route=INFER,
            model="iris",
            version="1",
            status="200",
        )
        == 2
    )
    assert value(metrics, "modelkeep_queue_depth") == 4
    assert value(metrics, "modelkeep_model_memory_bytes", model="iris", version="1") == 1024
    assert value(metrics, "modelkeep_rate_limited_total", model="iris", reason="budget") == 2
    assert value(metrics, "modelkeep_scan_refusals_total", verdict="malicious") == 2
    assert (
        value(metrics, "modelkeep_audit_entries_total", action="model.push", outcome="success") == 2
    )
    assert value(
        metrics, "modelkeep_inference_duration_seconds_sum", model="iris", version="1"
    ) == pytest.approx(0.002)


def test_render_returns_the_prometheus_text_format_and_its_content_type(
    metrics: Metrics,
) -> None:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE modelkeep_requests_total counter" in body


def test_each_instance_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    first, second = Metrics(), Metrics()
    first.auth_failure(reason="invalid")
    assert value(first, "modelkeep_auth_failures_total", reason="invalid") == 1
    assert value(second, "modelkeep_auth_failures_total", reason="invalid") is None
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert {n for n in global_names if n.startswith("modelkeep")} == set()


def test_duration_buckets_span_half_a_millisecond_to_ten_seconds(metrics: Metrics) -> None:
    metrics.observe_request(route=INFER, model="iris", version="1", status=200, seconds=0.0004)
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in samples(metrics)
        if name == "modelkeep_request_duration_seconds_bucket"
    )
    assert bounds == [*DURATION_BUCKETS, math.inf]
    assert bounds[0] == 0.0005
    assert bounds[-2] == 10.0
    labels = {"route": INFER, "model": "iris", "version": "1"}
    assert value(metrics, "modelkeep_request_duration_seconds_bucket", le="0.0005", **labels) == 1


def test_unknown_and_invalid_models_and_versions_become_other(metrics: Metrics) -> None:
    for model, version in [
        ("iris", "1"),
        ("iris", None),
        ("iris", "3"),  # no such version
        ("iris", "../../etc"),
        ("unknown-model", "1"),
        ("Bad Name\n", None),
        ("mk_abcdefghijkl_secretsecret", "1"),
    ]:
        metrics.observe_request(route=INFER, model=model, version=version, status=404, seconds=0)
    got = {
        (dict(labels)["model"], dict(labels)["version"])
        for name, labels in samples(metrics)
        if name == "modelkeep_requests_total"
    }
    assert got == {("iris", "1"), ("iris", "default"), ("iris", "other"), ("other", "other")}


def test_models_are_other_until_known_and_follow_set_known_models() -> None:
    m = Metrics()
    m.shed(model="iris")
    m.set_known_models({"iris": [1]})
    m.shed(model="iris")
    m.set_known_models({})  # iris deleted
    m.shed(model="iris")
    assert value(m, "modelkeep_shed_total", model="other") == 2
    assert value(m, "modelkeep_shed_total", model="iris") == 1


def test_requests_and_inference_follow_set_known_models_once_already_seen() -> None:
    # Both remember the labels of values already seen: a change of known models must reach them.
    m = Metrics()
    for known in ({}, {"iris": [1]}, {}):
        m.set_known_models(known)
        m.observe_request(route=INFER, model="iris", version=1, status=200, seconds=0)
        m.observe_inference(model="iris", version=1, seconds=0)
    for name in ("modelkeep_requests_total", "modelkeep_inference_duration_seconds_count"):
        assert total(m, name, model="other", version="other") == 2
        assert total(m, name, model="iris", version="1") == 1


def test_remembered_labels_are_bounded_and_stay_right_past_the_bound() -> None:
    m = Metrics()
    m.set_known_models({"iris": [1]})
    for i in range(3 * 4096):
        m.observe_request(route=INFER, model=f"probe-{i}", version=1, status=404, seconds=0)
        m.observe_inference(model=f"probe-{i}", version=1, seconds=0)
    assert len(m._raw_request) <= 4096
    assert len(m._raw_inference) <= 4096
    m.observe_request(route=INFER, model="iris", version=1, status=200, seconds=0)
    assert total(m, "modelkeep_requests_total", model="iris", version="1", status="200") == 1


def test_attacker_chosen_model_names_create_one_series(metrics: Metrics) -> None:
    for i in range(500):
        metrics.observe_request(
            route=INFER, model=f"probe-{i}", version=str(i), status=404, seconds=0
        )
    series = [name for name, _ in samples(metrics) if name == "modelkeep_requests_total"]
    assert len(series) == 1


def test_requests_without_a_model_or_route_have_empty_and_unmatched_labels(
    metrics: Metrics,
) -> None:
    metrics.observe_request(route="/v2", model=None, version=None, status=200, seconds=0)
    metrics.observe_request(route=None, model=None, version=None, status=401, seconds=0)
    assert (
        value(metrics, "modelkeep_requests_total", route="/v2", model="", version="", status="200")
        == 1
    )
    assert (
        value(
            metrics,
            "modelkeep_requests_total",
            route="unmatched",
            model="",
            version="",
            status="401",
        )
        == 1
    )


@pytest.mark.parametrize(
    ("status", "label"), [(200, "200"), (429, "429"), (503, "503"), (99, "other"), (600, "other")]
)
def test_status_label_is_the_code_or_other(status: int, label: str) -> None:
    assert Metrics.status_label(status) == label


def test_code_supplied_labels_must_look_like_identifiers_and_are_capped(
    metrics: Metrics,
) -> None:
    metrics.auth_failure(reason="Not An Identifier")
    metrics.audit_entry(action="model.push", outcome="exploded")
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.rate_limited(model="iris", reason=f"reason-{i}")
    assert value(metrics, "modelkeep_auth_failures_total", reason="other") == 1
    assert (
        value(metrics, "modelkeep_audit_entries_total", action="model.push", outcome="other") == 1
    )
    reasons = {
        dict(labels)["reason"]
        for name, labels in samples(metrics)
        if name == "modelkeep_rate_limited_total"
    }
    assert len(reasons) == MAX_LABEL_VALUES + 1
    assert value(metrics, "modelkeep_rate_limited_total", model="iris", reason="other") == 10


# -- several processes ----------------------------------------------------------------------

WRITER = """
import sys
from modelkeep.audit.metrics import Metrics

m = Metrics()
m.set_known_models({"iris": [1]})
n = int(sys.argv[1])
for _ in range(n):
    m.observe_request(
        route="/v2/models/{model}/infer", model="iris", version="1", status=200, seconds=0.002
    )
m.auth_failure(reason="invalid")
m.set_queue_depth(n)
m.set_models_loaded(n)
if sys.argv[2] == "close":
    m.close()
"""

READER = """
import sys
from modelkeep.audit.metrics import Metrics

body, content_type = Metrics().render()
sys.stdout.write(content_type + "\\n" + body.decode())
"""


def run_python(code: str, directory: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


def read_merged(directory: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    content_type, _, body = finish(run_python(READER, directory)).partition("\n")
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_multiprocess_mode_merges_the_values_of_every_process(tmp_path: Path) -> None:
    request = frozenset({"route": INFER, "model": "iris", "version": "1", "status": "200"}.items())
    duration = frozenset({"route": INFER, "model": "iris", "version": "1"}.items())
    # Two workers writing at the same time, then exiting without cleaning up.
    writers = [run_python(WRITER, tmp_path, "3", "stay"), run_python(WRITER, tmp_path, "5", "stay")]
    for writer in writers:
        finish(writer)
    merged = read_merged(tmp_path)
    assert merged[("modelkeep_requests_total", request)] == 8  # counters add up
    assert merged[("modelkeep_request_duration_seconds_count", duration)] == 8
    assert merged[("modelkeep_request_duration_seconds_sum", duration)] == pytest.approx(0.016)
    assert merged[("modelkeep_auth_failures_total", frozenset({("reason", "invalid")}))] == 2
    assert merged[("modelkeep_queue_depth", frozenset())] == 8  # livesum
    assert merged[("modelkeep_models_loaded", frozenset())] == 5  # livemax

    # A third worker that exits cleanly: its totals stay, its gauges leave the merge.
    finish(run_python(WRITER, tmp_path, "4", "close"))
    merged = read_merged(tmp_path)
    assert merged[("modelkeep_requests_total", request)] == 12
    assert merged[("modelkeep_queue_depth", frozenset())] == 8
    assert merged[("modelkeep_models_loaded", frozenset())] == 5


def test_multiproc_dir_set_after_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test process imported prometheus_client without the variable.
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="set it in the environment before"):
        Metrics()


def test_multiproc_dir_that_is_not_a_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory"):
        Metrics()
