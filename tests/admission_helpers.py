"""Helpers shared by the admission tests (unit, in memory; integration, on Redis)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from modelkeep.errors import RateLimited
from modelkeep.guard.admission import Admitted


def refusal(call: Callable[[], object]) -> RateLimited:
    """The RateLimited that ``call`` raises (the test fails if it does not)."""
    with pytest.raises(RateLimited) as info:
        call()
    return info.value


def run_together(count: int, attempt: Callable[[int], Admitted]) -> tuple[int, int]:
    """Start ``count`` threads at one barrier; return (admitted, refused)."""
    barrier = threading.Barrier(count)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        barrier.wait()
        try:
            attempt(index)
            result = "admitted"
        except RateLimited:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes.count("admitted"), outcomes.count("refused")
