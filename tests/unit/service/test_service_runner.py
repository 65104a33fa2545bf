"""InferRunner: inline or threaded, the bounded queue, and how many slow calls run at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelkeep.audit.metrics import Metrics
from modelkeep.errors import Unavailable
from modelkeep.service._runner import INLINE_BUDGET_S, InferRunner, usable_cpus
from modelkeep.settings import Settings


class SlowService:
    """Stands in for the data plane: each call sleeps, and the most calls running at once is
    kept."""

    def __init__(self, settings: Settings, seconds: float) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def infer(self) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return b"{}", {}


def runner(tmp_path: Path, seconds: float, **settings: Any) -> tuple[InferRunner, SlowService]:
    service = SlowService(Settings(data_dir=tmp_path, **settings), seconds)
    return InferRunner(service.settings, service.metrics), service


async def many(infer: InferRunner, service: SlowService, count: int, body: bytes) -> list[object]:
    calls = [infer.run("m", len(body), service.infer) for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_slow_calls_run_at_most_inference_threads_at_once_and_the_rest_wait(
    tmp_path: Path,
) -> None:
    infer, service = runner(tmp_path, 0.05, inference_threads=2, max_queue=16)
    big = b"x" * (service.settings.inline_max_bytes + 1)  # large: always threaded, limited
    results = asyncio.run(many(infer, service, 8, big))
    assert results == [(b"{}", {})] * 8  # all answered: they waited, none was shed
    assert service.most == 2


def test_the_default_is_one_slow_call_per_usable_cpu(tmp_path: Path) -> None:
    infer, _ = runner(tmp_path, 0.0)
    assert infer.compute_threads == usable_cpus() >= 1


def test_a_model_found_slow_moves_from_the_loop_to_the_limited_threads(tmp_path: Path) -> None:
    infer, service = runner(tmp_path, INLINE_BUDGET_S * 3, inference_threads=1, max_queue=16)

    async def main() -> None:
        loop_thread = threading.get_ident()
        await infer.run("m", 2, service.infer)  # unknown cost: inline, on the loop
        assert service.threads == {loop_thread}
        for _ in range(4):  # the moving average passes the budget
            await infer.run("m", 2, service.infer)
        service.threads.clear()
        service.most = 0
        await many(infer, service, 4, b"{}")
        assert loop_thread not in service.threads
        assert service.most == 1

    asyncio.run(main())


def test_calls_threaded_only_for_redis_admission_are_not_limited(tmp_path: Path) -> None:
    infer, service = runner(
        tmp_path, 0.05, inference_threads=1, max_queue=16, limits_storage="redis://127.0.0.1:1/0"
    )
    results = asyncio.run(many(infer, service, 4, b"{}"))  # small and fast, but threaded (Redis)
    assert results == [(b"{}", {})] * 4
    assert service.most > 1


def test_past_the_queue_bound_requests_are_shed_with_503(tmp_path: Path) -> None:
    infer, service = runner(tmp_path, 0.05, inference_threads=1, max_queue=3)
    big = b"x" * (service.settings.inline_max_bytes + 1)
    results = asyncio.run(many(infer, service, 6, big))
    shed = [r for r in results if isinstance(r, Unavailable)]
    assert len(shed) == 3
    assert all(r.retry_after == 1 and "overloaded" in r.message for r in shed)
    assert results.count((b"{}", {})) == 3
    assert infer.in_flight == 0


def test_a_call_past_the_timeout_is_answered_503_and_frees_its_place(tmp_path: Path) -> None:
    infer, service = runner(
        tmp_path, 0.3, inference_threads=1, max_queue=4, inference_timeout_s=0.05
    )
    big = b"x" * (service.settings.inline_max_bytes + 1)
    with pytest.raises(Unavailable, match="timed out"):
        asyncio.run(infer.run("m", len(big), service.infer))
    assert infer.in_flight == 0
