"""Retention rules: keep the newest N versions, destroy captures older than D days; applied
on the poller's schedule, audited, never touching labelled versions; bad values refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conftest import Env
from modelkeep.api.v2.infer import v2_call
from modelkeep.audit.verify import verify_chain
from modelkeep.errors import Forbidden, InvalidInput
from modelkeep.testing import build_iris_onnx

INFER = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'


def push_versions(env: Env, count: int) -> None:
    for seed in range(count):
        env.service.push(env.admin, "iris", build_iris_onnx(seed=seed), file_name="iris.onnx")


def test_keep_last_n_shreds_older_unlabelled_versions_and_audits_it(env: Env) -> None:
    svc = env.service
    push_versions(env, 5)
    svc.set_label(env.admin, "iris", "production", 1)
    rule = svc.set_retention(env.admin, "iris", keep_versions=2, capture_days=None)
    assert (rule.keep_versions, rule.capture_days) == (2, None)
    # force: now, rather than at the next run of the hourly schedule.
    assert svc.apply_retention(force=True) == 2
    model = svc.snapshot.models["iris"]
    assert (sorted(model.versions), sorted(model.deleted)) == ([1, 4, 5], [2, 3])
    entries = list(svc.audit.entries(action="version.delete"))
    assert [(e.actor, e.details["version"]) for e in entries] == [
        ("retention", 2),
        ("retention", 3),
    ]
    assert svc.apply_retention(force=True) == 0  # idempotent
    assert svc.apply_retention() == 0  # not due again within the interval
    assert verify_chain(svc.store.engine, None).ok


def test_capture_retention_destroys_old_captures_only(env: Env) -> None:
    svc = env.service
    push_versions(env, 1)
    svc.set_policy(env.admin, "iris", {"capture": {"sample": 1.0, "days": 30}})
    consumer, _ = env.key("consumer")
    for _ in range(2):
        svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), None)
    svc.captures.capture_writer.flush(timeout=10)
    assert len(svc.captures.store.find("iris")) == 2
    svc.set_retention(env.admin, "iris", keep_versions=None, capture_days=3)
    assert svc.apply_retention(force=True) == 0  # both are fresh
    later = datetime.now(UTC) + timedelta(days=4)
    svc.retention._clock = lambda: later
    assert svc.apply_retention(force=True) == 2
    assert svc.captures.store.find("iris") == []
    [entry] = svc.audit.entries(action="capture.purge")
    assert (entry.actor, entry.details) == ("retention", {"count": 2, "older_than_days": 3})


@pytest.mark.parametrize(
    ("keep", "days"),
    [(0, None), (-1, None), (10_001, None), (None, 0), (None, 3651), (True, None), (None, 1.5)],
)
def test_bad_retention_values_are_refused(env: Env, keep: object, days: object) -> None:
    with pytest.raises(InvalidInput, match="whole number"):
        env.service.set_retention(env.admin, "iris", keep_versions=keep, capture_days=days)  # type: ignore[arg-type]
    assert env.service.get_retention(env.admin, "iris").keep_versions is None


def test_only_admins_set_retention_and_both_null_clears_it(env: Env) -> None:
    svc = env.service
    publisher, _ = env.key("publisher", ["iris"])
    with pytest.raises(Forbidden):
        svc.set_retention(publisher, "iris", keep_versions=1, capture_days=None)
    svc.set_retention(env.admin, "iris", keep_versions=3, capture_days=9)
    assert svc.get_retention(publisher, "iris").capture_days == 9
    svc.set_retention(env.admin, "iris", keep_versions=None, capture_days=None)
    assert svc.store.retention_rules() == []
