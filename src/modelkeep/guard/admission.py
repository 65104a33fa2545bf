"""Admission: whether one caller's request to one model may run now.

A model's :class:`Limits` say how much each principal may ask of it; :meth:`Admission.admit`
checks a request against them in a fixed order and either admits it (returning an
:class:`Admitted` that holds its concurrency slot) or refuses it with an error that says when
to come back:

    1. max_rows     rows in this request                      TooLarge, nothing counted
    2. rate         requests per principal, moving window     RateLimited, retry_after exact
    3. row_rate     rows per principal, moving window         RateLimited, retry_after exact
    4. model_rate   requests for the model, all principals    RateLimited, retry_after exact
    5. budget       rows per principal per UTC day or month   RateLimited until the next window
    6. concurrency  requests in flight per principal          RateLimited, retry_after 1 s

Checks 2-6 run as one atomic step in the counter store: a refused request consumes nothing,
and concurrent requests, on one replica or many, are counted exactly. With a ``redis://``
store every replica shares the counters; with ``memory://`` each process has its own. When the
store cannot be reached, admission refuses (``Unavailable``): it never admits without limits.

Limit specs use the ``limits`` package's syntax ("50/second", "1000 per minute", "5/2second");
it is parsed here, and the windows themselves are kept by :mod:`modelkeep.guard._counters`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from limits import parse as parse_limit

from modelkeep.errors import ConfigError, InvalidInput, RateLimited, TooLarge, Unavailable
from modelkeep.guard._counters import (
    BudgetCheck,
    Check,
    Counters,
    MemoryCounters,
    RedisCounters,
    SlotCheck,
    WindowCheck,
)

__all__ = ["Admission", "Admitted", "Limits"]

log = logging.getLogger(__name__)

# Rate windows longer than a day would keep one stored entry per request for that long; a
# calendar budget answers "how much per day or month" at the cost of one counter.
_MAX_RATE_WINDOW = 86_400
_MAX_AMOUNT = 10**12
_SPEC = re.compile(r"\s*([0-9]+)\s*(?:/|\s+per\s+)\s*([0-9]+)?\s*([a-z]+)\s*", re.IGNORECASE)
_BUDGET_PERIODS = ("day", "month")
_ADJECTIVE = {"day": "daily", "month": "monthly"}
# A slot is freed when its request ends; until then nobody knows when that will be, so a
# refused caller is told to try again shortly.
_CONCURRENCY_RETRY_AFTER = 1.0
# Budget counters outlive their window by this much so that replicas whose clocks differ a
# little still read the same counter.
_BUDGET_GRACE = 3600
_MIN_RETRY_AFTER = 0.001

LimitName = Literal["rate", "row_rate", "model_rate", "budget", "concurrency"]


@dataclass(frozen=True, slots=True)
class _Rate:
    amount: int
    window: int  # seconds
    period: str  # granularity name, for budgets


def _parse_rate(field_name: str, spec: object, *, budget: bool = False) -> _Rate:
    if not isinstance(spec, str):
        raise InvalidInput(f"limit '{field_name}' must be a string like '100/minute'")
    return _parse_spec(field_name, spec, budget)


@functools.lru_cache(maxsize=1024)
def _parse_spec(field_name: str, spec: str, budget: bool) -> _Rate:
    if len(spec) > 64:
        raise InvalidInput(f"limit '{field_name}' is too long to be a limit")
    shown = spec[:40]
    match = _SPEC.fullmatch(spec)
    if match is None:
        example = "'10000/day' or '200000/month'" if budget else "'50/second' or '1000/minute'"
        raise InvalidInput(f"limit '{field_name}' = {shown!r} is not a limit; use e.g. {example}")
    if match.group(2) is not None and int(match.group(2)) < 1:
        raise InvalidInput(f"limit '{field_name}' = {shown!r} has a window of zero")
    try:
        item = parse_limit(spec)
    except ValueError as exc:
        raise InvalidInput(
            f"limit '{field_name}' = {shown!r} has an unknown unit; "
            "use second, minute, hour, day or month"
        ) from exc
    if not 1 <= item.amount <= _MAX_AMOUNT:
        raise InvalidInput(f"limit '{field_name}' = {shown!r} must allow between 1 and 10^12")
    period = item.GRANULARITY.name
    if budget:
        if period not in _BUDGET_PERIODS or item.multiples != 1:
            raise InvalidInput(
                f"budget {shown!r} must be per calendar day or month, e.g. '10000/day'"
            )
    elif item.get_expiry() > _MAX_RATE_WINDOW:
        raise InvalidInput(
            f"limit '{field_name}' = {shown!r} has a window longer than a day; "
            "use 'budget' for daily or monthly quotas"
        )
    return _Rate(item.amount, item.get_expiry(), period)


@functools.lru_cache(maxsize=65_536)
def _counter_key(prefix: str, parts: tuple[str, ...]) -> str:
    # Quoting every part keeps keys unambiguous whatever the names contain. Remembered: the
    # same few keys per caller and model are built on every admitted request.
    return ":".join([prefix, *(quote(part, safe="") for part in parts)])


def _check_count(field_name: str, value: object) -> None:
    if type(value) is not int or not 1 <= value <= _MAX_AMOUNT:
        raise InvalidInput(f"limit '{field_name}' must be a whole number of at least 1")


@dataclass(frozen=True)
class Limits:
    """One model's admission policy; ``None`` means no limit of that kind.

    ``rate``: requests per principal; ``row_rate``: rows per principal (a batch of 1000 rows
    counts 1000); ``model_rate``: requests for the whole model, all principals together; each
    a moving window in ``limits`` syntax, at most a day long. ``concurrency``: requests in
    flight per principal. ``max_rows``: rows per request. ``budget``: rows per principal per
    UTC calendar day or month ("10000/day", "200000/month"). Invalid values raise
    ``InvalidInput`` when the object is built.
    """

    rate: str | None = None
    row_rate: str | None = None
    model_rate: str | None = None
    concurrency: int | None = None
    max_rows: int | None = None
    budget: str | None = None

    def __post_init__(self) -> None:
        for name in ("rate", "row_rate", "model_rate", "budget"):
            spec = getattr(self, name)
            if spec is not None:
                _parse_rate(name, spec, budget=name == "budget")
        for name in ("concurrency", "max_rows"):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value)

    def to_json(self) -> dict[str, Any]:
        """The limits that are set, by field name; :meth:`from_json` reads it back."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_json(cls, data: Any) -> Limits:
        """Build limits from a JSON object; unknown keys and bad values raise ``InvalidInput``."""
        if not isinstance(data, Mapping):
            raise InvalidInput("limits must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key)[:40] for key in data if key not in known)
        if unknown:
            raise InvalidInput(
                f"unknown limit {unknown[0]!r}; known limits are {', '.join(sorted(known))}"
            )
        return cls(**{key: value for key, value in data.items() if value is not None})

    def _rate(self, name: str) -> _Rate | None:
        spec = getattr(self, name)
        return None if spec is None else _parse_rate(name, spec, budget=name == "budget")

    @functools.cached_property
    def _moving_windows(self) -> tuple[tuple[LimitName, _Rate, bool, str], ...]:
        """The moving windows that are set, in checking order, each with whether it is counted
        per principal and its length as its key spells it: worked out once per policy, not on
        every request."""
        windows: list[tuple[LimitName, _Rate, bool, str]] = []
        kinds: tuple[tuple[LimitName, bool], ...] = (
            ("rate", True),
            ("row_rate", True),
            ("model_rate", False),
        )
        for name, per_principal in kinds:
            rate = self._rate(name)
            if rate is not None:
                windows.append((name, rate, per_principal, str(rate.window)))
        return tuple(windows)

    @functools.cached_property
    def _budget(self) -> _Rate | None:
        return self._rate("budget")


class _Slot:
    """One held concurrency slot; released at most once."""

    def __init__(self, counters: Counters, key: str, slot: str) -> None:
        self._counters = counters
        self._key = key
        self._slot = slot
        self._lock = threading.Lock()
        self._released = False

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._counters.release_slot(self._key, self._slot)
        except Unavailable:
            # The slot's lease frees it later; failing the finished request would not help.
            log.warning("could not release a concurrency slot; its lease will expire it")


@dataclass(frozen=True)
class Admitted:
    """An admitted request. Use it as a context manager, or call :meth:`release` when done.

    The budget fields describe the principal's budget after this request (all ``None`` when
    the model has no budget); the API can send them as headers.
    """

    budget_remaining: int | None = None
    budget_limit: int | None = None
    budget_reset: datetime | None = None
    _slot: _Slot | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Free the concurrency slot; calling it again does nothing. Never raises."""
        if self._slot is not None:
            self._slot.release()

    def __enter__(self) -> Admitted:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Admission control over a counter store shared by replicas (``redis://``) or not.

    ``storage_uri``: ``memory://`` (per process) or ``redis://``, ``rediss://``, ``unix://``
    (shared). ``clock`` gives seconds since the epoch; every replica must share a
    synchronised clock. ``key_prefix`` namespaces every stored key. ``slot_lease`` bounds how
    long a slot of a crashed replica stays taken: set it above the longest inference timeout.
    ``timeout`` bounds every storage call, so a dead store fails requests fast.
    Thread safe.
    """

    def __init__(
        self,
        storage_uri: str = "memory://",
        *,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "modelkeep",
        slot_lease: float = 300.0,
        timeout: float = 0.25,
    ) -> None:
        if not key_prefix or not key_prefix.isprintable() or " " in key_prefix:
            raise ConfigError("the admission key prefix must be printable with no spaces")
        if not slot_lease > 0 or not timeout > 0:
            raise ConfigError("the slot lease and storage timeout must be positive")
        scheme = urlsplit(storage_uri).scheme
        self._counters: Counters
        if storage_uri == "memory://":
            self._counters = MemoryCounters()
        elif scheme in ("redis", "rediss", "unix"):
            self._counters = RedisCounters(storage_uri, timeout=timeout)
        else:
            # The URI may hold a password: name only its scheme.
            raise ConfigError(
                f"unknown rate limit storage scheme {scheme[:20]!r}; "
                "use memory:// or redis://host:port/db"
            )
        self._clock = clock
        self._prefix = key_prefix
        self._slot_lease = slot_lease
        # Request ids tell one request's entries apart in the shared counters: a random
        # prefix per process and a counter are unique across replicas, without a call to the
        # OS random source per request.
        self._instance = secrets.token_hex(8)
        self._requests = itertools.count()
        # The current calendar window per budget period: (start, end, start time, end time).
        self._windows: dict[str, tuple[float, float, str, datetime, int]] = {}
        self.storage_kind = "memory" if storage_uri == "memory://" else "redis"

    def ping(self) -> None:
        """Unavailable unless the counters' storage answers (always, in memory)."""
        self._counters.ping()

    def admit(
        self,
        principal: str,
        model: str,
        rows: int,
        limits: Limits,
        *,
        throttle_factor: float = 1.0,
    ) -> Admitted:
        """Admit one request of ``rows`` rows or raise; a refused request consumes nothing.

        ``throttle_factor`` in (0, 1] scales this principal's ``rate`` and ``row_rate`` down
        (each to at least 1); ``model_rate`` is shared by every principal and is not scaled.
        Raises ``TooLarge`` for a request that could never pass, ``RateLimited`` with the
        seconds until it could, ``Unavailable`` when the counter store is unreachable.
        """
        if type(rows) is not int or rows < 0:
            raise ValueError("rows must be a non-negative integer")
        if not 0.0 < throttle_factor <= 1.0:
            raise ValueError("throttle_factor must be in (0, 1]")
        now = self._clock()
        request = f"{self._instance}{next(self._requests):x}"
        checks: list[Check] = []
        names: list[LimitName] = []

        # 1. Size: a request over max_rows never runs, and is counted nowhere.
        if limits.max_rows is not None and rows > limits.max_rows:
            raise TooLarge(f"{rows} rows; the limit is {limits.max_rows}")

        # 2-4. Moving windows. A cost over the whole limit could never pass: say so now
        # instead of promising a retry time.
        for name, rate, per_principal, length in limits._moving_windows:
            cost = rows if name == "row_rate" else 1
            if cost == 0:
                continue
            amount = rate.amount
            if per_principal and throttle_factor < 1.0:
                amount = max(1, math.floor(amount * throttle_factor))
            if cost > amount:
                # Under throttling the numbers are withheld: they would tell a flagged
                # caller that it has been flagged.
                raise TooLarge(
                    f"{rows} rows; the row rate for model '{model}' allows at most "
                    f"{amount} rows per {rate.window} s"
                    if amount == rate.amount
                    else f"{rows} rows is more than model '{model}' accepts in one window now; "
                    "send smaller batches"
                )
            parts = (name, length, model, principal) if per_principal else (name, length, model)
            checks.append(WindowCheck(self._key(*parts), amount, float(rate.window), cost, request))
            names.append(name)

        # 5. Budget: one counter per calendar window, keyed by the window's start.
        budget = limits._budget
        budget_reset: datetime | None = None
        if budget is not None and rows > 0:
            if rows > budget.amount:
                raise TooLarge(
                    f"{rows} rows; the {_ADJECTIVE[budget.period]} budget for model "
                    f"'{model}' is {budget.amount} rows"
                )
            stamp, budget_reset, expires_at = self._calendar_window(budget.period, now)
            key = self._key("budget", budget.period, stamp, model, principal)
            checks.append(BudgetCheck(key, budget.amount, rows, expires_at))
            names.append("budget")

        # 6. Concurrency: a leased slot, freed by Admitted.release or by the lease running out.
        slot_key: str | None = None
        if limits.concurrency is not None:
            slot_key = self._key("slots", model, principal)
            checks.append(SlotCheck(slot_key, limits.concurrency, request, now + self._slot_lease))
            names.append("concurrency")

        outcome = self._counters.admit(now, checks)
        if outcome.refused is not None:
            raise self._refusal(names[outcome.refused], model, now, outcome.retry_after, limits)

        admitted_slot = None if slot_key is None else _Slot(self._counters, slot_key, request)
        if budget is None:
            return Admitted(_slot=admitted_slot)
        if budget_reset is None:  # a zero-row request: report the budget without counting it
            status = self.budget_status(principal, model, limits)
            assert status is not None
            remaining, _, budget_reset = status
        else:
            remaining = budget.amount - (outcome.budget_used or 0)
        return Admitted(max(0, remaining), budget.amount, budget_reset, admitted_slot)

    def release(self, admitted: Admitted) -> None:
        """Free ``admitted``'s concurrency slot (same as ``admitted.release()``)."""
        admitted.release()

    def budget_status(
        self, principal: str, model: str, limits: Limits
    ) -> tuple[int, int, datetime] | None:
        """``(remaining, limit, reset)`` of the principal's current budget window, or ``None``
        when the model has no budget. Raises ``Unavailable`` when the store is unreachable."""
        budget = limits._rate("budget")
        if budget is None:
            return None
        now = self._clock()
        start, reset = _calendar_window(budget.period, now)
        used = self._counters.count(self._budget_key(principal, model, budget.period, start), now)
        return max(0, budget.amount - used), budget.amount, reset

    def reset_budget(self, principal: str, model: str) -> None:
        """Give the principal its whole budget for the model back, daily and monthly."""
        now = self._clock()
        keys = [
            self._budget_key(principal, model, period, _calendar_window(period, now)[0])
            for period in _BUDGET_PERIODS
        ]
        self._counters.delete(keys)

    def close(self) -> None:
        """Close the store's connections (a no-op for memory://)."""
        if isinstance(self._counters, RedisCounters):
            self._counters.close()

    def _calendar_window(self, period: str, now: float) -> tuple[str, datetime, int]:
        """For the calendar window of ``now``: the stamp of its budget keys, its end, and when
        its counter may expire; remembered until ``now`` leaves the window."""
        found = self._windows.get(period)
        if found is None or not found[0] <= now < found[1]:
            start, end = _calendar_window(period, now)
            stamp = _budget_stamp(period, start)
            expires_at = int(end.timestamp()) + _BUDGET_GRACE
            found = (start.timestamp(), end.timestamp(), stamp, end, expires_at)
            self._windows[period] = found
        return found[2], found[3], found[4]

    def _key(self, *parts: str) -> str:
        return _counter_key(self._prefix, parts)

    def _budget_key(self, principal: str, model: str, period: str, start: datetime) -> str:
        return self._key("budget", period, _budget_stamp(period, start), model, principal)

    def _refusal(
        self, name: LimitName, model: str, now: float, retry_after: float | None, limits: Limits
    ) -> RateLimited:
        details = {"limit": name}
        if name == "budget":
            budget = limits._rate("budget")
            assert budget is not None
            _, reset = _calendar_window(budget.period, now)
            return RateLimited(
                f"the {_ADJECTIVE[budget.period]} query budget for model '{model}' is used up "
                f"until {reset.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                retry_after=max(_MIN_RETRY_AFTER, reset.timestamp() - now),
                details=details,
            )
        if name == "concurrency":
            return RateLimited(
                f"too many requests in flight for model '{model}' "
                f"(the limit is {limits.concurrency})",
                retry_after=_CONCURRENCY_RETRY_AFTER,
                details=details,
            )
        # Rates are not quoted: a throttled caller would learn it had been flagged.
        what = {
            "rate": f"request rate limit reached for model '{model}'",
            "row_rate": f"row rate limit reached for model '{model}'",
            "model_rate": f"model '{model}' is at its request rate limit",
        }[name]
        return RateLimited(
            what, retry_after=max(_MIN_RETRY_AFTER, retry_after or 0.0), details=details
        )


def _budget_stamp(period: str, start: datetime) -> str:
    """How a budget key names its calendar window: ``2026-12-06`` or ``2026-12``."""
    month = f"{start.year:04d}-{start.month:02d}"
    return f"{month}-{start.day:02d}" if period == "day" else month


def _calendar_window(period: str, now: float) -> tuple[datetime, datetime]:
    """Start and end (UTC) of the calendar day or month that contains ``now``."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end
