"""Where admission keeps its counters: one process (memory) or every replica (Redis).

Admission hands a backend an ordered list of checks and the current time; the backend answers
in one atomic step: either every check passes and all of them are consumed, or the first check
that fails is reported and nothing at all is consumed. Three kinds of check cover every limit:

    WindowCheck   weighted moving window: the costs admitted in (now - window, now] plus this
                  cost must stay within the limit (requests: cost 1; rows: cost = rows)
    BudgetCheck   a counter for one calendar window, keyed by the window's start
    SlotCheck     a set of in-flight slots, each with a lease deadline

The moving window keeps one entry per admitted request (its time and cost) plus a running
total, so memory is bounded by the limit, a check is amortised O(log n) and the time at which
enough capacity frees up can be read exactly from the oldest entries. Slots carry a lease so a
replica that dies while holding slots cannot hold them for longer than the lease.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from modelkeep.errors import ConfigError, Unavailable

__all__ = [
    "STORAGE_UNAVAILABLE",
    "BudgetCheck",
    "Check",
    "Counters",
    "MemoryCounters",
    "Outcome",
    "RedisCounters",
    "SlotCheck",
    "WindowCheck",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STORAGE_UNAVAILABLE = "rate limit storage is unavailable; refusing requests"
# A dead store is retried by the caller, not here: one second is the usual client back-off.
_UNAVAILABLE_RETRY_AFTER = 1.0
# Idle keys of the in-memory backend are swept at most this often (clock seconds).
_SWEEP_EVERY = 60.0
# Redis keys outlive their last use by this much, so small clock skew between replicas never
# expires a key that another replica still counts.
_KEY_GRACE_MS = 1000

# Checks and outcomes are named tuples, not frozen dataclasses: several are built on every
# admitted request, and a frozen dataclass's __init__ costs about three times as much.


class WindowCheck(NamedTuple):
    key: str
    limit: int
    window: float
    cost: int
    member: str


class BudgetCheck(NamedTuple):
    key: str
    limit: int
    cost: int
    expires_at: int


class SlotCheck(NamedTuple):
    key: str
    limit: int
    slot: str
    deadline: float


Check = WindowCheck | BudgetCheck | SlotCheck


class Outcome(NamedTuple):
    """``refused`` is the index of the first failing check (``None``: all admitted).

    ``retry_after`` is set for a refused window: the seconds until enough of the window's
    entries expire for this cost to fit. ``budget_used`` is the budget counter after admission.
    """

    refused: int | None
    retry_after: float | None = None
    budget_used: int | None = None


class Counters(Protocol):
    def ping(self) -> None:
        """Unavailable unless the storage answers."""
        ...

    def admit(self, now: float, checks: Sequence[Check]) -> Outcome:
        """Check every limit in order; consume all of them or none."""
        ...

    def release_slot(self, key: str, slot: str) -> None:
        """Free one slot; freeing a slot that is gone does nothing."""
        ...

    def count(self, key: str, now: float) -> int:
        """A budget counter's value (0 when missing or expired)."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Forget budget counters."""
        ...


@dataclass(slots=True)
class _Window:
    window: float
    total: int = 0
    entries: deque[tuple[float, int]] = field(default_factory=deque)

    def prune(self, now: float) -> None:
        horizon = now - self.window
        while self.entries and self.entries[0][0] <= horizon:
            self.total -= self.entries.popleft()[1]

    def retry_after(self, now: float, need: int) -> float:
        freed = 0
        for stamp, cost in self.entries:
            freed += cost
            if freed >= need:
                return stamp + self.window - now
        return self.window


class MemoryCounters:
    """Counters for one process, every operation under one lock.

    Entries are appended in clock order; a clock that steps backwards only keeps older entries
    counted a little longer, which refuses more, never admits more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._budgets: dict[str, tuple[int, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._next_sweep = 0.0

    def ping(self) -> None:
        """Always reachable: the counters live in this process."""

    def admit(self, now: float, checks: Sequence[Check]) -> Outcome:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            # Phase 1: the first limit that fails refuses the request before anything changes.
            for index, check in enumerate(checks):
                if isinstance(check, WindowCheck):
                    window = self._windows.get(check.key)
                    if window is None:
                        continue
                    window.prune(now)
                    if window.total + check.cost > check.limit:
                        need = window.total + check.cost - check.limit
                        return Outcome(index, retry_after=window.retry_after(now, need))
                elif isinstance(check, BudgetCheck):
                    if self._budget(check.key, now) + check.cost > check.limit:
                        return Outcome(index)
                else:
                    slots = self._live_slots(check.key, now)
                    if len(slots) >= check.limit:
                        return Outcome(index)
            # Phase 2: every limit passed; consume them all.
            budget_used: int | None = None
            for check in checks:
                if isinstance(check, WindowCheck):
                    window = self._windows.get(check.key)
                    if window is None:  # not setdefault: that would build one every time
                        window = self._windows[check.key] = _Window(check.window)
                    window.entries.append((now, check.cost))
                    window.total += check.cost
                elif isinstance(check, BudgetCheck):
                    budget_used = self._budget(check.key, now) + check.cost
                    self._budgets[check.key] = (budget_used, float(check.expires_at))
                else:
                    self._slots.setdefault(check.key, {})[check.slot] = check.deadline
            return Outcome(None, budget_used=budget_used)

    def release_slot(self, key: str, slot: str) -> None:
        with self._lock:
            slots = self._slots.get(key)
            if slots is not None:
                slots.pop(slot, None)
                if not slots:
                    del self._slots[key]

    def count(self, key: str, now: float) -> int:
        with self._lock:
            return self._budget(key, now)

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._budgets.pop(key, None)

    def _budget(self, key: str, now: float) -> int:
        used, expires_at = self._budgets.get(key, (0, 0.0))
        return used if now < expires_at else 0

    def _live_slots(self, key: str, now: float) -> dict[str, float]:
        slots = self._slots.get(key, {})
        for slot in [s for s, deadline in slots.items() if deadline <= now]:
            del slots[slot]
        return slots

    def _sweep(self, now: float) -> None:
        # Keys of principals that stopped calling would otherwise stay forever.
        for key in list(self._windows):
            self._windows[key].prune(now)
            if not self._windows[key].entries:
                del self._windows[key]
        for key in [k for k, (_, expires_at) in self._budgets.items() if expires_at <= now]:
            del self._budgets[key]
        for key in list(self._slots):
            if not self._live_slots(key, now):
                del self._slots[key]
        self._next_sweep = now + _SWEEP_EVERY


# One script does both phases so that, across replicas, no other admission can run between
# the checks and the consumption. KEYS: two per check. ARGV[1]: now (seconds); ARGV[2]: how
# long keys outlive their last use (ms); then five per check: kind (w window, b budget, c
# slots), limit, x (window seconds | expire-at | deadline), cost, member. A window member is
# "<cost>:<unique id>", so an expiring entry can give its cost back to the running total.
# Replies are strings because Redis truncates Lua numbers to integers.
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local n = (#ARGV - 2) / 5
local grace = tonumber(ARGV[2])
local function num(v) if v then return tonumber(v) end return 0 end
local function cost_of(member) return tonumber(string.match(member, '^(%d+):')) end

for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, limit, x = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local cost = tonumber(ARGV[a + 4])
  local k1, k2 = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'w' then
    local horizon = now - x
    local expired = redis.call('ZRANGEBYSCORE', k1, '-inf', horizon)
    if #expired > 0 then
      local freed = 0
      for _, m in ipairs(expired) do freed = freed + cost_of(m) end
      redis.call('ZREMRANGEBYSCORE', k1, '-inf', horizon)
      if redis.call('ZCARD', k1) == 0 then
        redis.call('DEL', k2)
      else
        redis.call('DECRBY', k2, freed)
      end
    end
    local used = num(redis.call('GET', k2))
    if used + cost > limit then
      local need, freed, start = used + cost - limit, 0, 0
      while true do
        local batch = redis.call('ZRANGE', k1, start, start + 63, 'WITHSCORES')
        if #batch == 0 then return {i, tostring(x)} end
        for j = 1, #batch, 2 do
          freed = freed + cost_of(batch[j])
          if freed >= need then return {i, tostring(tonumber(batch[j + 1]) + x - now)} end
        end
        start = start + 64
      end
    end
  elseif kind == 'b' then
    if num(redis.call('GET', k1)) + cost > limit then return {i, '0'} end
  else
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now)
    if redis.call('ZCARD', k1) >= limit then return {i, '0'} end
  end
end

local budget_used = -1
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, x, cost, member = ARGV[a + 1], tonumber(ARGV[a + 3]), ARGV[a + 4], ARGV[a + 5]
  local k1, k2 = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'w' then
    local ttl = math.ceil(x * 1000) + grace
    redis.call('ZADD', k1, ARGV[1], member)
    redis.call('INCRBY', k2, cost)
    redis.call('PEXPIRE', k1, ttl)
    redis.call('PEXPIRE', k2, ttl)
  elseif kind == 'b' then
    budget_used = redis.call('INCRBY', k1, cost)
    redis.call('PEXPIRE', k1, math.ceil((x - now) * 1000) + grace)
  else
    redis.call('ZADD', k1, ARGV[a + 3], member)
    redis.call('PEXPIRE', k1, math.ceil((x - now) * 1000) + grace)
  end
end
return {0, tostring(budget_used)}
"""


class RedisCounters:
    """Counters in Redis, shared by every replica that uses the same server and key prefix.

    Every call has short socket timeouts and at most one immediate reconnect (a pooled
    connection may be stale after a Redis restart); a read timeout is never retried, since the
    script may already have run. Any Redis failure becomes ``Unavailable``: admission fails
    closed.
    """

    def __init__(self, uri: str, *, timeout: float) -> None:
        try:
            self._client = redis.Redis.from_url(
                uri,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except ValueError as exc:
            # The URI may hold a password: it is not repeated.
            raise ConfigError("the rate limit storage URI is malformed") from exc
        self._admit = self._client.register_script(_ADMIT_LUA)

    def ping(self) -> None:
        """Unavailable unless Redis answers within the timeout."""
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise Unavailable(STORAGE_UNAVAILABLE, retry_after=_UNAVAILABLE_RETRY_AFTER) from exc

    def admit(self, now: float, checks: Sequence[Check]) -> Outcome:
        keys: list[str] = []
        args: list[str] = [repr(now), str(_KEY_GRACE_MS)]
        for check in checks:
            if isinstance(check, WindowCheck):
                keys += [check.key, check.key + ":sum"]
                member = f"{check.cost}:{check.member}"
                args += ["w", str(check.limit), repr(check.window), str(check.cost), member]
            elif isinstance(check, BudgetCheck):
                keys += [check.key, check.key]
                args += ["b", str(check.limit), str(check.expires_at), str(check.cost), ""]
            else:
                keys += [check.key, check.key]
                args += ["c", str(check.limit), repr(check.deadline), "0", check.slot]
        reply = self._call(lambda: self._admit(keys=keys, args=args))
        status, value = int(reply[0]), float(reply[1])
        if status == 0:
            return Outcome(None, budget_used=None if value < 0 else int(value))
        return Outcome(status - 1, retry_after=value)

    def release_slot(self, key: str, slot: str) -> None:
        self._call(lambda: self._client.zrem(key, slot))

    def count(self, key: str, now: float) -> int:
        value = self._call(lambda: self._client.get(key))
        return 0 if value is None else int(value)

    def delete(self, keys: Sequence[str]) -> None:
        self._call(lambda: self._client.delete(*keys))

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _call(operation: Callable[[], _T]) -> _T:
        try:
            return operation()
        except redis.RedisError as exc:
            log.warning("rate limit storage failed: %s", type(exc).__name__)
            raise Unavailable(STORAGE_UNAVAILABLE, retry_after=_UNAVAILABLE_RETRY_AFTER) from exc
