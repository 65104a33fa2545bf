"""Alerts: count security events per minute and notify webhooks when a rule's threshold is met.

``Alerter.observe(kind, **fields)`` counts one event against every rule of that kind, in
one-minute windows (aligned to the clock's minutes), per group when the rule groups auth
failures by principal or source. When a count reaches the rule's threshold, one alert is fired
for that rule, group and window, and delivered in the background to every webhook:

    POST <webhook url>
    Content-Type: application/json
    X-Modelkeep-Signature: sha256=<hex HMAC-SHA256 of the exact body, keyed by the secret>
    X-Modelkeep-Timestamp: <unix seconds of this attempt>

    {"id": "...", "rule": "...", "kind": "auth_failures", "count": 20, "threshold": 20,
     "group": "10.0.0.7", "window": {"start": "2026-11-25T12:00:00Z", "seconds": 60},
     "fields": {...}, "time": "2026-11-25T12:00:41.500000Z"}

The signature covers the body only; the body holds ``id`` and ``time``, so a receiver rejects
replays by ``id`` and stale alerts by ``time`` (the timestamp header is not signed). Delivery
retries 5xx, 408, 429 and connection errors with exponential backoff up to ``max_attempts``;
every attempt is logged through structlog with the webhook's scheme, host and port only,
because webhook URLs often carry a credential in their path.

Counts are per process: with several workers a threshold applies to each worker's share.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import httpx
import structlog

from modelkeep import __version__
from modelkeep.audit.access import drop_secret_keys
from modelkeep.audit.log import utcnow
from modelkeep.errors import ConfigError

__all__ = [
    "ALERT_KINDS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WINDOW_SECONDS",
    "Alert",
    "AlertKind",
    "AlertRule",
    "Alerter",
    "Webhook",
    "sign",
    "verify_signature",
]

AlertKind = Literal[
    "auth_failures",
    "detector_alarm",
    "budget_spent",
    "tampering",
    "audit_verify_failed",
    "drift",
    # Lifecycle (docs/lifecycle.md): a protected label's change requested, decided (applied,
    # rejected, expired, failed), or made at once under a declared emergency.
    "change_requested",
    "change_decided",
    "emergency_change",
    # A canary withdrawn automatically past its thresholds (service/canary.py).
    "canary_rollback",
]
ALERT_KINDS: frozenset[str] = frozenset(get_args(AlertKind))
GroupBy = Literal["principal", "source"]
SIGNATURE_HEADER = "X-Modelkeep-Signature"
TIMESTAMP_HEADER = "X-Modelkeep-Timestamp"
WINDOW_SECONDS = 60
MIN_SECRET_BYTES = 16
# Beyond this many (rule, group) counters in one window, new groups share one: a spray of
# failures from many addresses must not grow memory without bound.
MAX_GROUPS = 10_000
_OVERFLOW_GROUP = "other"
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAX_FIELDS = 20
_MAX_TEXT = 200

_LOG_METHOD = {"delivered": "info", "retry": "warning", "failed": "error"}

_log = structlog.get_logger("modelkeep.alerts")


@dataclass(frozen=True)
class Webhook:
    """Where alerts go: an http(s) URL and the secret that signs each body (16 bytes or more).

    ConfigError for any other scheme, a URL without a host, or a short secret; the message never
    repeats the URL or the secret.
    """

    url: str
    secret: str | bytes = field(repr=False)

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            has_host = bool(parts.hostname)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise ConfigError("invalid alert webhook URL") from exc
        if parts.scheme not in ("http", "https") or not has_host:
            raise ConfigError("alert webhooks must be http:// or https:// URLs with a host")
        if any(c.isspace() or ord(c) < 0x20 for c in self.url):
            raise ConfigError("invalid alert webhook URL")
        if len(self.key) < MIN_SECRET_BYTES:
            raise ConfigError(f"an alert webhook secret needs {MIN_SECRET_BYTES} bytes or more")

    @property
    def key(self) -> bytes:
        return self.secret.encode() if isinstance(self.secret, str) else self.secret

    @property
    def display(self) -> str:
        """``scheme://host[:port]``: what logs may show of the URL."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port is not None else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


@dataclass(frozen=True)
class AlertRule:
    """Fire when ``threshold`` events of ``kind`` happen within one clock minute.

    ``group_by`` (auth_failures only) counts each principal or source address separately.
    ConfigError for an unknown kind, a threshold below 1 or a group_by on another kind.
    """

    name: str
    kind: AlertKind
    threshold: int = 1
    group_by: GroupBy | None = None

    def __post_init__(self) -> None:
        if _RULE_NAME.fullmatch(self.name) is None:
            raise ConfigError("alert rule names use 1-64 letters, digits, '.', '_', '-'")
        if self.kind not in ALERT_KINDS:
            raise ConfigError(f"unknown alert kind; use one of: {', '.join(sorted(ALERT_KINDS))}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ConfigError("an alert threshold is a whole number of events per minute")
        if self.threshold < 1:
            raise ConfigError("an alert threshold must be at least 1 event per minute")
        if self.group_by is not None:
            if self.kind != "auth_failures":
                raise ConfigError("only auth_failures rules can be grouped")
            if self.group_by not in get_args(GroupBy):
                raise ConfigError("auth_failures rules group by 'principal' or 'source'")


@dataclass(frozen=True)
class Alert:
    """A fired alert; ``body`` is the exact bytes every webhook receives and signs."""

    id: str
    rule: str
    kind: str
    count: int
    threshold: int
    group: str | None
    window_start: datetime
    time: datetime
    fields: Mapping[str, Any]
    body: bytes = field(repr=False)


def sign(body: bytes, secret: str | bytes) -> str:
    """The ``X-Modelkeep-Signature`` value for ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str | bytes) -> bool:
    """True only if ``header`` is the signature of exactly ``body`` under ``secret``.

    Constant-time comparison; for receivers and tests.
    """
    if header is None:
        return False
    return hmac.compare_digest(sign(body, secret).encode(), header.encode("utf-8", "replace"))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _clean_fields(fields: Mapping[str, object]) -> dict[str, Any]:
    """What may travel in an alert: a few short scalar fields, nothing named like a secret."""
    kept: dict[str, Any] = {}
    for name, value in fields.items():
        if len(kept) >= _MAX_FIELDS or _FIELD_NAME.fullmatch(name) is None:
            continue
        if value is None or isinstance(value, bool | int | float):
            kept[name] = value
        else:
            kept[name] = str(value)[:_MAX_TEXT]
    return dict(drop_secret_keys(None, "", kept))


class Alerter:
    """Counts events against ``rules`` and delivers fired alerts to every webhook.

    Each webhook has its own delivery thread and bounded queue, so a slow or dead receiver
    delays only its own alerts. ``sleep`` waits between attempts (tests pass a recorder);
    ``transport`` is httpx's I/O seam.
    """

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        rules: Sequence[AlertRule],
        clock: Callable[[], datetime] = utcnow,
        *,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 5.0,
        queue_size: int = 1000,
        sleep: Callable[[float], object] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError("alert delivery needs at least one attempt")
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ConfigError("alert rule names must be unique")
        self._rules = list(rules)
        self._clock = clock
        self._lock = threading.Lock()
        self._window: int | None = None
        self._counts: dict[tuple[str, str], int] = {}
        self._closed = False
        self._abandon = threading.Event()
        wait = sleep if sleep is not None else self._abandon.wait
        self._couriers = [
            _Courier(
                hook,
                clock=clock,
                max_attempts=max_attempts,
                backoff_s=backoff_s,
                max_backoff_s=max_backoff_s,
                client=httpx.Client(
                    timeout=timeout_s,
                    follow_redirects=False,  # a redirect could move the alert elsewhere
                    transport=transport,
                    headers={"User-Agent": f"modelkeep/{__version__}"},
                ),
                sleep=wait,
                abandon=self._abandon,
                queue_size=queue_size,
            )
            for hook in webhooks
        ]

    def observe(self, event_kind: str, **fields: object) -> list[Alert]:
        """Count one event of ``event_kind``; return the alerts it fired (already queued).

        Never blocks on delivery. ValueError for a kind no rule could ever name (a typo).
        Fields must not hold secrets: those named like one are dropped, the rest are sent.
        """
        if event_kind not in ALERT_KINDS:
            raise ValueError(f"unknown alert event kind {event_kind!r}")
        now = self._clock()
        window = int(now.timestamp() // WINDOW_SECONDS)
        fired: list[Alert] = []
        with self._lock:
            if self._window is None or window > self._window:
                self._window, self._counts = window, {}
            for rule in self._rules:
                if rule.kind != event_kind:
                    continue
                group = None
                if rule.group_by is not None:
                    group = str(fields.get(rule.group_by) or "unknown")[:_MAX_TEXT]
                key = (rule.name, group or "")
                if key not in self._counts and len(self._counts) >= MAX_GROUPS:
                    group, key = _OVERFLOW_GROUP, (rule.name, _OVERFLOW_GROUP)
                count = self._counts.get(key, 0) + 1
                self._counts[key] = count
                if count == rule.threshold:  # once per rule, group and window
                    fired.append(self._alert(rule, count, group, now, window, fields))
        for alert in fired:
            self._dispatch(alert)
        return fired

    def _alert(
        self,
        rule: AlertRule,
        count: int,
        group: str | None,
        now: datetime,
        window: int,
        fields: Mapping[str, object],
    ) -> Alert:
        start = datetime.fromtimestamp(window * WINDOW_SECONDS, UTC)
        cleaned = _clean_fields(fields)
        alert_id = uuid.uuid4().hex
        document = {
            "id": alert_id,
            "rule": rule.name,
            "kind": rule.kind,
            "count": count,
            "threshold": rule.threshold,
            "group": group,
            "window": {"start": _iso(start), "seconds": WINDOW_SECONDS},
            "fields": cleaned,
            "time": _iso(now),
        }
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        return Alert(
            alert_id, rule.name, rule.kind, count, rule.threshold, group, start, now, cleaned, body
        )

    def _dispatch(self, alert: Alert) -> None:
        _log.warning(
            "alert.fired", alert_id=alert.id, rule=alert.rule, kind=alert.kind, count=alert.count
        )
        if self._closed:
            _log.error("alert.dropped", alert_id=alert.id, rule=alert.rule, reason="closed")
            return
        for courier in self._couriers:
            courier.enqueue(alert)

    def close(self, timeout: float = 30.0) -> bool:
        """Deliver everything queued (with its retries), then stop; True if all finished.

        After ``timeout`` seconds pending retries are abandoned (and logged) and False is
        returned. Alerts fired after close are logged and dropped.
        """
        self._closed = True
        for courier in self._couriers:
            courier.stop()
        end = time.monotonic() + timeout
        for courier in self._couriers:
            courier.thread.join(max(0.0, end - time.monotonic()))
        drained = not any(c.thread.is_alive() for c in self._couriers)
        # Past the deadline: stop waiting between attempts and drop what is still queued.
        self._abandon.set()
        for courier in self._couriers:
            courier.thread.join(1.0)
        return drained


class _Courier:
    """One webhook's delivery thread: a bounded queue, retries with exponential backoff."""

    def __init__(
        self,
        hook: Webhook,
        *,
        clock: Callable[[], datetime],
        max_attempts: int,
        backoff_s: float,
        max_backoff_s: float,
        client: httpx.Client,
        sleep: Callable[[float], object],
        abandon: threading.Event,
        queue_size: int,
    ) -> None:
        self.hook = hook
        self._clock = clock
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._client = client
        self._sleep = sleep
        self._abandon = abandon
        self._queue_size = queue_size
        self._queue: queue.Queue[Alert | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="modelkeep-alerts", daemon=True)
        self.thread.start()

    def enqueue(self, alert: Alert) -> None:
        # The queue itself is unbounded so that stop()'s marker always fits; the bound is here
        # (racy by a few items between threads, which is harmless).
        if self._queue.qsize() >= self._queue_size:
            _log.error(
                "alert.dropped",
                alert_id=alert.id,
                rule=alert.rule,
                webhook=self.hook.display,
                reason="queue full",
            )
            return
        self._queue.put_nowait(alert)

    def stop(self) -> None:
        self._queue.put_nowait(None)  # after everything already queued: that is the drain

    def _run(self) -> None:
        try:
            while (alert := self._queue.get()) is not None:
                if self._abandon.is_set():
                    _log.error(
                        "alert.dropped",
                        alert_id=alert.id,
                        rule=alert.rule,
                        webhook=self.hook.display,
                        reason="closed",
                    )
                    continue
                self._deliver(alert)
        finally:
            self._client.close()

    def _deliver(self, alert: Alert) -> None:
        signature = sign(alert.body, self.hook.key)
        where = {"alert_id": alert.id, "rule": alert.rule, "webhook": self.hook.display}
        for attempt in range(1, self._max_attempts + 1):
            status, error = self._post(alert.body, signature)
            retryable = status is None or status >= 500 or status in (408, 429)
            if status is not None and 200 <= status < 300:
                outcome = "delivered"
            elif retryable and attempt < self._max_attempts and not self._abandon.is_set():
                outcome = "retry"
            else:
                outcome = "failed"
            delay = min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
            getattr(_log, _LOG_METHOD[outcome])(
                "alert.delivery",
                **where,
                attempt=attempt,
                status=status,
                error=error,
                outcome=outcome,
                delay_s=delay if outcome == "retry" else None,
            )
            if outcome != "retry":
                return
            self._sleep(delay)
            if self._abandon.is_set():
                _log.error("alert.delivery", **where, attempt=attempt, outcome="abandoned")
                return

    def _post(self, body: bytes, signature: str) -> tuple[int | None, str | None]:
        """One attempt: (HTTP status, None), or (None, the error's class name)."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature,
            TIMESTAMP_HEADER: str(int(self._clock().timestamp())),
        }
        try:
            response = self._client.post(self.hook.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        return response.status_code, None
