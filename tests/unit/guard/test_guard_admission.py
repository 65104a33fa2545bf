"""Admission over the in-process store, with an injected clock: limits, order, retry times."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from admission_helpers import refusal, run_together
from modelkeep.errors import ConfigError, InvalidInput, TooLarge
from modelkeep.guard.admission import Admission, Admitted, Limits


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def remaining(admission: Admission, principal: str, limits: Limits) -> int:
    status = admission.budget_status(principal, "iris", limits)
    assert status is not None
    return status[0]


def next_midnight(clock: Clock) -> datetime:
    today = datetime.fromtimestamp(clock.now, UTC).replace(hour=0, minute=0, second=0)
    return today + timedelta(days=1)


def refused_by(call: Callable[[], object]) -> str:
    """Which limit refused the call (the ``details`` the API may show)."""
    details = refusal(call).details
    assert details is not None
    return str(details["limit"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def admission(clock: Clock) -> Admission:
    return Admission("memory://", clock=clock)


# --- Limits: specs and JSON -------------------------------------------------------------------


def test_limits_round_trip_through_json() -> None:
    limits = Limits(
        rate="50/second",
        row_rate="5000 per minute",
        model_rate="1000/minute",
        concurrency=4,
        max_rows=1000,
        budget="200000/month",
    )
    assert limits == Limits.from_json(limits.to_json())
    assert Limits(rate="5/2second").to_json() == {"rate": "5/2second"}
    assert Limits() == Limits.from_json({"rate": None})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rate": "abc"}, "limit 'rate' = 'abc' is not a limit"),
        ({"rate": ""}, "is not a limit"),
        ({"rate": "0/second"}, "must allow between 1 and 10^12"),
        ({"rate": "-1/second"}, "is not a limit"),
        ({"rate": "5/0second"}, "has a window of zero"),
        ({"rate": "50/second;10/minute"}, "is not a limit"),
        ({"rate": "5/fortnight"}, "unknown unit"),
        ({"rate": 50}, "must be a string"),
        ({"model_rate": "100/month"}, "longer than a day; use 'budget'"),
        ({"row_rate": "x" * 100}, "too long"),
        ({"budget": "10000/hour"}, "must be per calendar day or month"),
        ({"budget": "10000/2day"}, "must be per calendar day or month"),
        ({"concurrency": 0}, "'concurrency' must be a whole number of at least 1"),
        ({"concurrency": True}, "'concurrency' must be a whole number"),
        ({"max_rows": "10"}, "'max_rows' must be a whole number"),
        ({"burst": 3}, "unknown limit 'burst'"),
    ],
)
def test_bad_limits_are_refused_with_a_clear_message(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        Limits.from_json(data)
    assert expected in info.value.message


def test_limits_json_must_be_an_object() -> None:
    with pytest.raises(InvalidInput, match="limits must be an object"):
        Limits.from_json(["rate", "5/second"])


def test_unknown_storage_scheme_is_a_config_error_that_hides_the_uri() -> None:
    with pytest.raises(ConfigError) as info:
        Admission("memcached://user:hunter2@cache:11211")
    assert "hunter2" not in info.value.message
    assert "memcached" in info.value.message


def test_malformed_redis_uri_is_a_config_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Admission("redis://:hunter2@cache:notaport/0")
    assert "hunter2" not in info.value.message


# --- max_rows -------------------------------------------------------------------------------


def test_max_rows_refuses_before_counting_anything(admission: Admission) -> None:
    limits = Limits(rate="1/minute", max_rows=100)
    with pytest.raises(TooLarge) as info:
        admission.admit("alice", "iris", 101, limits)
    assert info.value.message == "101 rows; the limit is 100"
    admission.admit("alice", "iris", 100, limits)  # the rate's one request is still there


# --- every limit under threads: exact counts -----------------------------------------------


def test_request_rate_admits_exactly_the_limit_under_threads(admission: Admission) -> None:
    limits = Limits(rate="10/minute")
    assert run_together(40, lambda i: admission.admit("alice", "iris", 1, limits)) == (10, 30)


def test_row_rate_counts_rows_exactly_under_threads(admission: Admission) -> None:
    limits = Limits(row_rate="100/minute")
    # 14 requests of 7 rows make 98 rows; a 15th would make 105.
    assert run_together(30, lambda i: admission.admit("alice", "iris", 7, limits)) == (14, 16)


def test_model_rate_is_shared_by_all_principals_under_threads(admission: Admission) -> None:
    limits = Limits(model_rate="15/minute", rate="100/minute")
    admitted = run_together(40, lambda i: admission.admit(f"user{i % 20}", "iris", 1, limits))
    assert admitted == (15, 25)
    admission.admit("alice", "other-model", 1, limits)


def test_budget_admits_exactly_what_it_holds_under_threads(
    admission: Admission, clock: Clock
) -> None:
    limits = Limits(budget="50/day")
    assert run_together(30, lambda i: admission.admit("alice", "iris", 5, limits)) == (10, 20)
    assert admission.budget_status("alice", "iris", limits) == (0, 50, next_midnight(clock))


def test_concurrency_holds_exactly_the_limit_under_threads(admission: Admission) -> None:
    limits = Limits(concurrency=3)
    held: list[Admitted] = []
    lock = threading.Lock()

    def attempt(_: int) -> Admitted:
        admitted = admission.admit("alice", "iris", 1, limits)
        with lock:
            held.append(admitted)
        return admitted

    assert run_together(20, attempt) == (3, 17)
    refusal(lambda: admission.admit("alice", "iris", 1, limits))
    held[0].release()
    admission.admit("alice", "iris", 1, limits)


def test_limits_are_per_principal_and_per_model(admission: Admission) -> None:
    limits = Limits(rate="1/minute")
    admission.admit("alice", "iris", 1, limits)
    admission.admit("bob", "iris", 1, limits)
    admission.admit("alice", "wine", 1, limits)
    refusal(lambda: admission.admit("alice", "iris", 1, limits))


def test_names_with_separators_do_not_share_counters(admission: Admission) -> None:
    limits = Limits(rate="1/minute")
    admission.admit("x:y", "m", 1, limits)
    admission.admit("y", "m:x", 1, limits)  # would share a key if names were joined raw
    refusal(lambda: admission.admit("x:y", "m", 1, limits))


# --- a refusal consumes nothing ---------------------------------------------------------------


def test_row_rate_refusal_leaves_the_request_rate_untouched(admission: Admission) -> None:
    limits = Limits(rate="5/minute", row_rate="10/minute")
    admission.admit("alice", "iris", 10, limits)
    for _ in range(3):
        assert refused_by(lambda: admission.admit("alice", "iris", 1, limits)) == "row_rate"
    # Zero-row requests skip the row rate: the request rate still has its 4 requests.
    for _ in range(4):
        admission.admit("alice", "iris", 0, limits)
    assert refused_by(lambda: admission.admit("alice", "iris", 0, limits)) == "rate"


def test_concurrency_refusal_consumes_no_budget_and_no_rate(admission: Admission) -> None:
    limits = Limits(rate="3/minute", budget="100/day", concurrency=1)
    held = admission.admit("alice", "iris", 10, limits)
    for _ in range(5):
        refused = refusal(lambda: admission.admit("alice", "iris", 10, limits))
        assert refused.details == {"limit": "concurrency"}
        assert refused.retry_after == 1.0
    assert remaining(admission, "alice", limits) == 90
    held.release()
    admission.admit("alice", "iris", 10, limits).release()
    admission.admit("alice", "iris", 10, limits).release()
    assert remaining(admission, "alice", limits) == 70


def test_checks_run_in_the_documented_order(admission: Admission) -> None:
    limits = Limits(rate="1/minute", row_rate="1/minute", model_rate="1/minute", budget="1/day")
    admission.admit("alice", "iris", 1, limits)
    # Every limit is now exhausted for alice; the first in order is the one reported.
    assert refused_by(lambda: admission.admit("alice", "iris", 1, limits)) == "rate"
    without_rate = Limits(row_rate="1/minute", model_rate="1/minute", budget="1/day")
    assert refused_by(lambda: admission.admit("alice", "iris", 1, without_rate)) == "row_rate"
    only_model = Limits(model_rate="1/minute", budget="1/day")
    assert refused_by(lambda: admission.admit("alice", "iris", 1, only_model)) == "model_rate"


# --- honest Retry-After -----------------------------------------------------------------------


def test_rate_retry_after_is_when_the_oldest_request_leaves_the_window(
    admission: Admission, clock: Clock
) -> None:
    limits = Limits(rate="3/10second")
    start = clock.now
    for offset in (0.0, 1.0, 2.0):
        clock.now = start + offset
        admission.admit("alice", "iris", 1, limits)
    clock.now = start + 2.5
    retry_after = refusal(lambda: admission.admit("alice", "iris", 1, limits)).retry_after
    assert pytest.approx(retry_after) == 7.5
    clock.now = start + 2.5 + 7.5 - 0.001
    refusal(lambda: admission.admit("alice", "iris", 1, limits))
    clock.now = start + 2.5 + 7.5
    admission.admit("alice", "iris", 1, limits)


def test_row_rate_retry_after_waits_for_enough_rows_to_expire(
    admission: Admission, clock: Clock
) -> None:
    limits = Limits(row_rate="10/minute")
    start = clock.now
    for offset, rows in ((0.0, 4), (1.0, 3), (2.0, 3)):
        clock.now = start + offset
        admission.admit("alice", "iris", rows, limits)
    clock.now = start + 5.0
    # 6 rows need the 4 rows of t=0 and the 3 of t=1 to leave: at t=61, not at t=60.
    assert (
        pytest.approx(refusal(lambda: admission.admit("alice", "iris", 6, limits)).retry_after)
        == 56.0
    )
    clock.now = start + 60.0
    assert (
        pytest.approx(refusal(lambda: admission.admit("alice", "iris", 6, limits)).retry_after)
        == 1.0
    )
    clock.now = start + 61.0
    admission.admit("alice", "iris", 6, limits)


def test_a_request_bigger_than_the_row_rate_is_too_large_not_rate_limited(
    admission: Admission,
) -> None:
    with pytest.raises(TooLarge) as info:
        admission.admit("alice", "iris", 11, Limits(row_rate="10/minute"))
    assert "at most 10 rows per 60 s" in info.value.message


# --- budgets over calendar windows -------------------------------------------------------------


def test_daily_budget_runs_out_and_comes_back_at_utc_midnight(
    admission: Admission, clock: Clock
) -> None:
    limits = Limits(budget="10/day")
    clock.now = at("2025-03-14T23:00:00")
    first = admission.admit("alice", "iris", 4, limits)
    assert (6, 10, datetime(2025, 3, 15, tzinfo=UTC)) == (
        first.budget_remaining,
        first.budget_limit,
        first.budget_reset,
    )
    assert admission.admit("alice", "iris", 6, limits).budget_remaining == 0
    refused = refusal(lambda: admission.admit("alice", "iris", 1, limits))
    assert pytest.approx(refused.retry_after) == 3600.0
    assert refused.details == {"limit": "budget"}
    assert "daily query budget for model 'iris' is used up until 2025-03-15T00:00:00Z" in (
        refused.message
    )
    clock.now = at("2025-03-15T00:00:00")
    assert admission.admit("alice", "iris", 1, limits).budget_remaining == 9


def test_monthly_budget_resets_on_the_first_of_the_next_month(
    admission: Admission, clock: Clock
) -> None:
    limits = Limits(budget="5/month")
    clock.now = at("2024-12-31T12:00:00")
    admission.admit("alice", "iris", 5, limits)
    assert (0, 5, datetime(2025, 1, 1, tzinfo=UTC)) == admission.budget_status(
        "alice", "iris", limits
    )
    assert (
        pytest.approx(refusal(lambda: admission.admit("alice", "iris", 1, limits)).retry_after)
        == 12 * 3600
    )
    clock.now = at("2025-01-01T00:00:01")
    assert (5, 5, datetime(2025, 2, 1, tzinfo=UTC)) == admission.budget_status(
        "alice", "iris", limits
    )


def test_reset_budget_gives_the_whole_budget_back(admission: Admission) -> None:
    daily, monthly = Limits(budget="10/day"), Limits(budget="100/month")
    admission.admit("alice", "iris", 10, daily)
    admission.admit("alice", "iris", 30, monthly)
    admission.admit("bob", "iris", 3, daily)
    admission.reset_budget("alice", "iris")
    assert remaining(admission, "alice", daily) == 10
    assert remaining(admission, "alice", monthly) == 100
    assert remaining(admission, "bob", daily) == 7


def test_budget_status_is_none_without_a_budget(admission: Admission) -> None:
    assert admission.budget_status("alice", "iris", Limits(rate="5/second")) is None
    admitted = admission.admit("alice", "iris", 1, Limits(rate="5/second"))
    assert (
        admitted.budget_remaining,
        admitted.budget_limit,
        admitted.budget_reset,
    ) == (None, None, None)


def test_a_request_bigger_than_the_whole_budget_is_too_large(admission: Admission) -> None:
    with pytest.raises(TooLarge, match="11 rows; the daily budget for model 'iris' is 10 rows"):
        admission.admit("alice", "iris", 11, Limits(budget="10/day"))
    assert remaining(admission, "alice", Limits(budget="10/day")) == 10


def test_a_zero_row_request_reports_the_budget_without_spending_it(admission: Admission) -> None:
    limits = Limits(budget="10/day", row_rate="1/minute")
    admission.admit("alice", "iris", 3, Limits(budget="10/day"))
    assert admission.admit("alice", "iris", 0, limits).budget_remaining == 7
    assert admission.admit("alice", "iris", 0, limits).budget_remaining == 7


# --- throttling ---------------------------------------------------------------------------


def test_throttle_factor_cuts_the_request_rate(admission: Admission) -> None:
    limits = Limits(rate="10/minute")
    admitted, refused = run_together(
        12, lambda i: admission.admit("alice", "iris", 1, limits, throttle_factor=0.5)
    )
    assert (admitted, refused) == (5, 7)
    # Unthrottled, the same window still holds the other 5.
    assert run_together(12, lambda i: admission.admit("alice", "iris", 1, limits)) == (5, 7)


def test_throttle_factor_cuts_the_row_rate_and_never_below_one(admission: Admission) -> None:
    limits = Limits(row_rate="100/minute")
    admission.admit("alice", "iris", 10, limits, throttle_factor=0.1)
    refusal(lambda: admission.admit("alice", "iris", 1, limits, throttle_factor=0.1))
    admission.admit("bob", "iris", 1, limits, throttle_factor=0.001)
    refusal(lambda: admission.admit("bob", "iris", 1, limits, throttle_factor=0.001))


def test_throttle_factor_leaves_the_shared_model_rate_alone(admission: Admission) -> None:
    limits = Limits(model_rate="4/minute")
    for _ in range(4):
        admission.admit("alice", "iris", 1, limits, throttle_factor=0.25)
    refusal(lambda: admission.admit("alice", "iris", 1, limits, throttle_factor=0.25))


def test_a_throttled_too_large_request_does_not_reveal_the_throttle(admission: Admission) -> None:
    with pytest.raises(TooLarge) as info:
        admission.admit("alice", "iris", 60, Limits(row_rate="100/minute"), throttle_factor=0.5)
    assert "50" not in info.value.message
    assert "send smaller batches" in info.value.message


@pytest.mark.parametrize("factor", [0.0, -1.0, 1.5])
def test_throttle_factor_outside_zero_to_one_is_a_programming_error(
    admission: Admission, factor: float
) -> None:
    with pytest.raises(ValueError, match="throttle_factor"):
        admission.admit("alice", "iris", 1, Limits(), throttle_factor=factor)


# --- concurrency slots ------------------------------------------------------------------------


def test_admitted_as_context_manager_frees_its_slot_once(admission: Admission) -> None:
    limits = Limits(concurrency=2)
    with admission.admit("alice", "iris", 1, limits) as first:
        other = admission.admit("alice", "iris", 1, limits)
        refusal(lambda: admission.admit("alice", "iris", 1, limits))
    first.release()  # a second release must not free someone else's slot
    admission.admit("alice", "iris", 1, limits)
    refusal(lambda: admission.admit("alice", "iris", 1, limits))
    admission.release(other)
    admission.admit("alice", "iris", 1, limits)


def test_a_slot_never_released_expires_with_its_lease(clock: Clock) -> None:
    admission = Admission("memory://", clock=clock, slot_lease=30.0)
    limits = Limits(concurrency=1)
    admission.admit("alice", "iris", 1, limits)  # its holder crashed: never released
    clock.now += 29.9
    refusal(lambda: admission.admit("alice", "iris", 1, limits))
    clock.now += 0.1
    admission.admit("alice", "iris", 1, limits)
