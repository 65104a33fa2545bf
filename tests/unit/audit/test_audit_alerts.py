"""Alerter: per-minute thresholds and grouping, signed webhook delivery to a real local receiver,
retries with backoff, logging without secrets, draining on close."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from structlog.testing import capture_logs

from modelkeep.audit.alerts import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alerter,
    AlertRule,
    Webhook,
    sign,
    verify_signature,
)
from modelkeep.errors import ConfigError

SECRET = "whsec-0123456789abcdef-do-not-log"
OTHER_SECRET = "whsec-fedcba9876543210-wrong-one"
START = datetime(2026, 11, 25, 12, 0, 5, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Receiver:
    """A real HTTP server on 127.0.0.1 answering ``fail_status`` to the first ``failures`` posts."""

    def __init__(self, failures: int = 0, fail_status: int = 500) -> None:
        self.failures = failures
        self.fail_status = fail_status
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    attempt = len(receiver.received) + 1
                    status = receiver.fail_status if attempt <= receiver.failures else 200
                    receiver.received.append((dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-IN-PATH"

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b, status in self.received if status == 200]


MakeReceiver = Callable[..., Receiver]


def no_sleep(_delay: float) -> None:
    """Backoff without waiting: tests assert the delays instead."""


@pytest.fixture
def receiver_factory() -> Iterator[MakeReceiver]:
    started: list[Receiver] = []

    def make(failures: int = 0, fail_status: int = 500) -> Receiver:
        receiver = Receiver(failures, fail_status)
        receiver.thread.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.thread.join()


@pytest.fixture
def receiver(receiver_factory: MakeReceiver) -> Receiver:
    return receiver_factory(failures=2)


def tampering_rule() -> AlertRule:
    return AlertRule("tamper", "tampering", threshold=1)


def test_alert_arrives_after_two_server_errors_with_exponential_backoff(
    receiver: Receiver,
) -> None:
    delays: list[float] = []
    alerter = Alerter(
        [Webhook(receiver.url, SECRET)],
        [tampering_rule()],
        Clock(),
        backoff_s=0.5,
        sleep=delays.append,
    )
    (alert,) = alerter.observe("tampering", model="iris", version=3)
    assert alerter.close(timeout=10) is True

    assert [status for _, _, status in receiver.received] == [500, 500, 200]
    assert delays == [0.5, 1.0]
    bodies = {body for _, body, _ in receiver.received}
    assert {alert.body} == bodies  # every attempt sends the same bytes


def test_signature_verifies_with_the_secret_and_not_with_another(receiver: Receiver) -> None:
    alerter = Alerter([Webhook(receiver.url, SECRET)], [tampering_rule()], Clock(), sleep=no_sleep)
    alerter.observe("tampering", model="iris")
    alerter.close(timeout=10)

    ((headers, body),) = receiver.accepted()
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert expected == headers[SIGNATURE_HEADER]
    assert verify_signature(body, headers[SIGNATURE_HEADER], SECRET) is True
    assert verify_signature(body, headers[SIGNATURE_HEADER], OTHER_SECRET) is False
    assert verify_signature(body + b" ", headers[SIGNATURE_HEADER], SECRET) is False
    assert str(int(START.timestamp())) == headers[TIMESTAMP_HEADER]
    assert headers["Content-Type"] == "application/json"


def test_alert_body_names_rule_kind_count_window_fields_time_and_id(
    receiver: Receiver,
) -> None:
    rule = AlertRule("brute-force", "auth_failures", threshold=2, group_by="source")
    alerter = Alerter([Webhook(receiver.url, SECRET)], [rule], Clock(), sleep=no_sleep)
    alerter.observe("auth_failures", source="10.0.0.7", reason="invalid")
    (alert,) = alerter.observe("auth_failures", source="10.0.0.7", reason="expired")
    alerter.close(timeout=10)

    ((_, body),) = receiver.accepted()
    document = json.loads(body)
    assert {
        "id": alert.id,
        "rule": "brute-force",
        "kind": "auth_failures",
        "count": 2,
        "threshold": 2,
        "group": "10.0.0.7",
        "window": {"start": "2026-11-25T12:00:00Z", "seconds": 60},
        "fields": {"source": "10.0.0.7", "reason": "expired"},
        "time": "2026-11-25T12:00:05Z",
    } == document
    assert len(document["id"]) == 32


def test_every_attempt_is_logged_and_neither_secret_nor_url_path_appears(
    receiver: Receiver,
) -> None:
    with capture_logs() as logs:
        alerter = Alerter(
            [Webhook(receiver.url, SECRET)], [tampering_rule()], Clock(), sleep=no_sleep
        )
        (alert,) = alerter.observe("tampering", model="iris")
        alerter.close(timeout=10)

    attempts = [e for e in logs if e["event"] == "alert.delivery"]
    assert [(e["attempt"], e["outcome"], e["status"]) for e in attempts] == [
        (1, "retry", 500),
        (2, "retry", 500),
        (3, "delivered", 200),
    ]
    port = receiver.server.server_address[1]
    assert {f"http://127.0.0.1:{port}"} == {e["webhook"] for e in attempts}
    assert {alert.id} == {e["alert_id"] for e in attempts}
    everything = repr(logs)
    assert SECRET not in everything
    assert "T0KEN-IN-PATH" not in everything


def test_delivery_gives_up_after_max_attempts(receiver_factory: MakeReceiver) -> None:
    down: Receiver = receiver_factory(failures=100)
    delays: list[float] = []
    with capture_logs() as logs:
        alerter = Alerter(
            [Webhook(down.url, SECRET)],
            [tampering_rule()],
            Clock(),
            max_attempts=3,
            backoff_s=1.0,
            max_backoff_s=1.5,
            sleep=delays.append,
        )
        alerter.observe("tampering")
        assert alerter.close(timeout=10) is True

    assert len(down.received) == 3
    assert delays == [1.0, 1.5]  # doubled, then capped
    outcomes = [e["outcome"] for e in logs if e["event"] == "alert.delivery"]
    assert outcomes == ["retry", "retry", "failed"]


def test_client_errors_are_not_retried(receiver_factory: MakeReceiver) -> None:
    refusing: Receiver = receiver_factory(failures=100, fail_status=403)
    alerter = Alerter([Webhook(refusing.url, SECRET)], [tampering_rule()], Clock(), sleep=no_sleep)
    alerter.observe("tampering")
    alerter.close(timeout=10)
    assert [status for _, _, status in refusing.received] == [403]


def test_unreachable_webhook_is_retried_then_given_up(receiver_factory: MakeReceiver) -> None:
    gone: Receiver = receiver_factory()
    url = gone.url
    gone.server.shutdown()
    gone.server.server_close()  # nothing listens on the port any more
    with capture_logs() as logs:
        alerter = Alerter(
            [Webhook(url, SECRET)], [tampering_rule()], Clock(), max_attempts=2, sleep=no_sleep
        )
        alerter.observe("tampering")
        alerter.close(timeout=10)
    attempts = [e for e in logs if e["event"] == "alert.delivery"]
    assert [e["outcome"] for e in attempts] == ["retry", "failed"]
    assert {"ConnectError"} == {e["error"] for e in attempts}


def test_each_webhook_gets_the_alert_signed_with_its_own_secret(
    receiver_factory: MakeReceiver,
) -> None:
    first: Receiver = receiver_factory()
    second: Receiver = receiver_factory()
    alerter = Alerter(
        [Webhook(first.url, SECRET), Webhook(second.url, OTHER_SECRET)],
        [tampering_rule()],
        Clock(),
    )
    (alert,) = alerter.observe("tampering")
    alerter.close(timeout=10)
    ((h1, b1),) = first.accepted()
    ((h2, b2),) = second.accepted()
    assert alert.body == b1 == b2
    assert sign(alert.body, SECRET) == h1[SIGNATURE_HEADER]
    assert sign(alert.body, OTHER_SECRET) == h2[SIGNATURE_HEADER]


def test_close_drains_every_queued_alert(receiver_factory: MakeReceiver) -> None:
    ok: Receiver = receiver_factory()
    clock = Clock()
    alerter = Alerter([Webhook(ok.url, SECRET)], [tampering_rule()], clock)
    fired = []
    for minute in range(5):  # a new window each time: five alerts
        fired += [a.id for a in alerter.observe("tampering", n=minute)]
        clock.advance(60)
    assert alerter.close(timeout=10) is True
    assert len(fired) == 5
    assert fired == [json.loads(body)["id"] for _, body in ok.accepted()]


def test_close_gives_up_on_pending_retries_after_its_timeout(
    receiver_factory: MakeReceiver,
) -> None:
    down: Receiver = receiver_factory(failures=100)
    # The real sleep: a 30 s backoff that close() must cut short.
    alerter = Alerter([Webhook(down.url, SECRET)], [tampering_rule()], Clock(), backoff_s=30)
    alerter.observe("tampering")
    assert alerter.close(timeout=0.2) is False
    assert len(down.received) == 1


def test_alerts_fired_after_close_are_logged_and_not_delivered(
    receiver_factory: MakeReceiver,
) -> None:
    ok: Receiver = receiver_factory()
    alerter = Alerter([Webhook(ok.url, SECRET)], [tampering_rule()], Clock())
    alerter.close(timeout=10)
    with capture_logs() as logs:
        alerter.observe("tampering")
    assert [e["event"] for e in logs] == ["alert.fired", "alert.dropped"]
    assert ok.received == []


def test_threshold_fires_once_per_minute_window_and_restarts_next_minute() -> None:
    clock = Clock()
    alerter = Alerter([], [AlertRule("alarms", "detector_alarm", threshold=3)], clock)
    fired = [len(alerter.observe("detector_alarm", model="iris")) for _ in range(5)]
    assert fired == [0, 0, 1, 0, 0]
    clock.advance(55)  # 12:01:00, the next window
    fired = [len(alerter.observe("detector_alarm", model="iris")) for _ in range(3)]
    assert fired == [0, 0, 1]
    alerter.close()


def test_windows_are_clock_minutes_not_sliding() -> None:
    clock = Clock(datetime(2026, 11, 25, 12, 0, 58, tzinfo=UTC))
    alerter = Alerter([], [AlertRule("budget", "budget_spent", threshold=2)], clock)
    assert alerter.observe("budget_spent", principal="key:a") == []
    clock.advance(4)  # 12:01:02: two events four seconds apart, in different windows
    assert alerter.observe("budget_spent", principal="key:a") == []
    alerter.close()


def test_auth_failures_grouped_by_source_count_each_source_apart() -> None:
    rule = AlertRule("per-source", "auth_failures", threshold=3, group_by="source")
    alerter = Alerter([], [rule], Clock())
    for _ in range(2):
        assert alerter.observe("auth_failures", source="10.0.0.1", principal="anonymous") == []
        assert alerter.observe("auth_failures", source="10.0.0.2", principal="anonymous") == []
    (alert,) = alerter.observe("auth_failures", source="10.0.0.2", principal="anonymous")
    assert (alert.rule, alert.group, alert.count) == ("per-source", "10.0.0.2", 3)
    alerter.close()


def test_auth_failures_grouped_by_principal() -> None:
    rule = AlertRule("per-key", "auth_failures", threshold=2, group_by="principal")
    alerter = Alerter([], [rule], Clock())
    assert alerter.observe("auth_failures", principal="key:a", source="10.0.0.1") == []
    assert alerter.observe("auth_failures", principal="key:b", source="10.0.0.1") == []
    (alert,) = alerter.observe("auth_failures", principal="key:a", source="10.0.0.9")
    assert alert.group == "key:a"
    alerter.close()


def test_ungrouped_rule_counts_all_events_together_and_rules_are_independent() -> None:
    rules = [
        AlertRule("any-failure", "auth_failures", threshold=2),
        AlertRule("per-source", "auth_failures", threshold=2, group_by="source"),
        AlertRule("tamper", "tampering", threshold=1),
    ]
    alerter = Alerter([], rules, Clock())
    assert alerter.observe("auth_failures", source="10.0.0.1") == []
    fired = alerter.observe("auth_failures", source="10.0.0.2")
    assert [(a.rule, a.group) for a in fired] == [("any-failure", None)]
    alerter.close()


def test_fields_named_like_secrets_are_not_sent() -> None:
    alerter = Alerter([], [tampering_rule()], Clock())
    (alert,) = alerter.observe(
        "tampering", model="iris", token="mk_abc", authorization="Bearer x", api_key="k"
    )
    assert dict(alert.fields) == {"model": "iris"}
    assert b"mk_abc" not in alert.body
    alerter.close()


def test_unknown_event_kind_is_refused() -> None:
    alerter = Alerter([], [tampering_rule()], Clock())
    with pytest.raises(ValueError, match="unknown alert event kind"):
        alerter.observe("tamperin")
    alerter.close()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "example.org/hook",
        "http:///no-host",
        "https://example.org:99999/hook",
        "https://example.org/ho ok",
    ],
)
def test_only_http_and_https_urls_with_a_host_are_accepted(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Webhook(url, SECRET)
    assert url not in caught.value.message


def test_short_secrets_are_refused_and_secrets_are_not_in_repr() -> None:
    with pytest.raises(ConfigError, match="16 bytes"):
        Webhook("https://example.org/hook", "short")
    assert SECRET not in repr(Webhook("https://example.org/hook", SECRET))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "tampering", "group_by": "source"}, "only auth_failures"),
        ({"kind": "auth_failures", "group_by": "model"}, "principal' or 'source"),
        ({"kind": "tampering", "threshold": 0}, "at least 1"),
        ({"kind": "tampering", "threshold": True}, "whole number"),
        ({"kind": "nonsense"}, "unknown alert kind"),
    ],
)
def test_invalid_rules_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AlertRule("rule", **kwargs)  # type: ignore[arg-type]


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        Alerter([], [tampering_rule(), tampering_rule()], Clock())
