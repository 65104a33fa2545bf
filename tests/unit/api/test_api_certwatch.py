"""The server certificate's expiry is exported as a metric and warned about 30 days before."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelkeep.api._certwatch import check_certificate
from modelkeep.audit.metrics import Metrics
from modelkeep.crypto import create_tls_material

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
EXPIRY_METRIC = "modelkeep_tls_certificate_expiry_timestamp_seconds"


@pytest.fixture(scope="module")
def certfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    create_tls_material(directory, now=ISSUED)
    return directory / "server.pem"


def _gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(EXPIRY_METRIC)


def test_the_gauge_holds_the_expiry_and_nothing_is_logged_far_from_it(
    certfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.WARNING):
        not_after = check_certificate(certfile, metrics, now=lambda: ISSUED + timedelta(days=200))
    assert not_after is not None
    assert not_after.timestamp() == _gauge(metrics)
    assert caplog.records == []


@pytest.mark.parametrize(("days_before", "days_left"), [(30, 29), (1, 0), (-5, 0)])
def test_a_warning_names_the_days_left_within_30_days_of_expiry(
    certfile: Path, caplog: pytest.LogCaptureFixture, days_before: int, days_left: int
) -> None:
    metrics = Metrics()
    not_after = check_certificate(certfile, metrics)
    assert not_after is not None
    # A few seconds past the day boundary, so that whole days are what is left.
    moment = not_after - timedelta(days=days_before) + timedelta(seconds=5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_certificate(certfile, metrics, now=lambda: moment)
    (record,) = caplog.records
    assert f"expires in {days_left} days" in record.getMessage()
    assert "modelkeep tls renew" in record.getMessage()


def test_an_unreadable_certificate_is_a_warning_without_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.WARNING):
        assert check_certificate(tmp_path / "missing.pem", metrics) is None
    (record,) = caplog.records
    assert "cannot read the TLS server certificate" in record.getMessage()
    assert str(tmp_path) not in record.getMessage()
    # Never set: 0, which an "expires within 30 days" alert rule treats as expired.
    assert _gauge(metrics) == 0.0
