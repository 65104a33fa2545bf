"""Admission against a real Redis: shared state across replicas, exact counts, failing closed.

Two ``Admission`` objects on one Redis stand for two replicas. Every test uses its own key
prefix, and deletes its keys afterwards, so runs never collide.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from admission_helpers import refusal, run_together
from modelkeep.errors import Unavailable
from modelkeep.guard.admission import Admission, Admitted, Limits

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    value = f"mk-test-{secrets.token_hex(6)}"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def replicas(redis_url: str, prefix: str) -> Iterator[tuple[Admission, Admission]]:
    first = Admission(redis_url, key_prefix=prefix)
    second = Admission(redis_url, key_prefix=prefix)
    yield first, second
    first.close()
    second.close()


# --- two replicas share every limit -------------------------------------------------------


def test_two_replicas_share_the_request_rate_exactly(
    replicas: tuple[Admission, Admission],
) -> None:
    limits = Limits(rate="10/minute")
    admitted = run_together(40, lambda i: replicas[i % 2].admit("alice", "iris", 1, limits))
    assert admitted == (10, 30)


def test_two_replicas_share_the_row_rate_exactly(replicas: tuple[Admission, Admission]) -> None:
    limits = Limits(row_rate="100/minute")
    assert run_together(30, lambda i: replicas[i % 2].admit("alice", "iris", 7, limits)) == (
        14,
        16,
    )


def test_two_replicas_share_the_model_rate_across_principals(
    replicas: tuple[Admission, Admission],
) -> None:
    limits = Limits(model_rate="15/minute")
    admitted = run_together(40, lambda i: replicas[i % 2].admit(f"user{i}", "iris", 1, limits))
    assert admitted == (15, 25)


def test_two_replicas_share_the_budget(replicas: tuple[Admission, Admission]) -> None:
    limits = Limits(budget="50/day")
    assert run_together(30, lambda i: replicas[i % 2].admit("alice", "iris", 5, limits)) == (
        10,
        20,
    )
    status = replicas[1].budget_status("alice", "iris", limits)
    assert status is not None
    assert status[:2] == (0, 50)
    replicas[0].reset_budget("alice", "iris")
    assert replicas[1].admit("alice", "iris", 50, limits).budget_remaining == 0


def test_two_replicas_share_concurrency_slots(replicas: tuple[Admission, Admission]) -> None:
    first, second = replicas
    limits = Limits(concurrency=3)
    held: list[Admitted] = []
    lock = threading.Lock()

    def attempt(index: int) -> Admitted:
        admitted = replicas[index % 2].admit("alice", "iris", 1, limits)
        with lock:
            held.append(admitted)
        return admitted

    assert run_together(20, attempt) == (3, 17)
    refusal(lambda: second.admit("alice", "iris", 1, limits))
    held[0].release()  # released through whichever replica admitted it
    second.admit("alice", "iris", 1, limits)
    refusal(lambda: first.admit("alice", "iris", 1, limits))


def test_slots_of_a_crashed_replica_expire_with_their_lease(redis_url: str, prefix: str) -> None:
    crashed = Admission(redis_url, key_prefix=prefix, slot_lease=30.0)
    limits = Limits(concurrency=2)
    crashed.admit("alice", "iris", 1, limits)
    crashed.admit("alice", "iris", 1, limits)  # neither is ever released
    crashed.close()
    survivor = Admission(redis_url, key_prefix=prefix)
    refusal(lambda: survivor.admit("alice", "iris", 1, limits))
    # Seen from 31 s later (a clock ahead of the lease), both slots have expired.
    later = Admission(redis_url, key_prefix=prefix, clock=lambda: time.time() + 31.0)
    later.admit("alice", "iris", 1, limits)
    later.admit("alice", "iris", 1, limits)
    refusal(lambda: later.admit("alice", "iris", 1, limits))
    survivor.close()
    later.close()


def test_a_refused_request_consumes_nothing_under_contention(
    replicas: tuple[Admission, Admission],
) -> None:
    limits = Limits(rate="20/minute", row_rate="30/minute")
    # 2-row requests: the row rate stops them at 15, long before the request rate's 20.
    assert run_together(40, lambda i: replicas[i % 2].admit("alice", "iris", 2, limits)) == (
        15,
        25,
    )
    # The 25 refusals took nothing from the request rate: 5 requests remain.
    for index in range(5):
        replicas[index % 2].admit("alice", "iris", 0, limits)
    assert refusal(lambda: replicas[0].admit("alice", "iris", 0, limits)).details == {
        "limit": "rate"
    }


# --- honest Retry-After ----------------------------------------------------------------------


def test_retry_after_is_within_the_real_window_and_honoured(
    replicas: tuple[Admission, Admission],
) -> None:
    first, second = replicas
    limits = Limits(rate="5/2second")
    started = time.time()
    for index in range(5):
        replicas[index % 2].admit("alice", "iris", 1, limits)
    refused_at = time.time()
    retry_after = refusal(lambda: second.admit("alice", "iris", 1, limits)).retry_after
    assert retry_after is not None
    # The oldest request leaves the window 2 s after it was admitted: no sooner, no later.
    assert 2.0 - (refused_at - started) - 0.05 <= retry_after <= 2.0
    time.sleep(retry_after + 0.01)
    first.admit("alice", "iris", 1, limits)


def test_row_rate_retry_after_matches_the_script_with_an_injected_clock(
    redis_url: str, prefix: str
) -> None:
    now = [time.time()]
    admission = Admission(redis_url, key_prefix=prefix, clock=lambda: now[0])
    limits = Limits(row_rate="10/minute")
    start = now[0]
    for offset, rows in ((0.0, 4), (1.0, 3), (2.0, 3)):
        now[0] = start + offset
        admission.admit("alice", "iris", rows, limits)
    now[0] = start + 5.0
    retry_after = refusal(lambda: admission.admit("alice", "iris", 6, limits)).retry_after
    assert pytest.approx(retry_after, abs=1e-3) == 56.0
    now[0] = start + 60.5
    refusal(lambda: admission.admit("alice", "iris", 6, limits))
    now[0] = start + 61.0
    admission.admit("alice", "iris", 6, limits)
    admission.close()


def test_budget_refusal_says_when_the_next_day_starts(
    replicas: tuple[Admission, Admission],
) -> None:
    limits = Limits(budget="10/day")
    admitted = replicas[0].admit("alice", "iris", 10, limits)
    assert admitted.budget_reset is not None
    refused = refusal(lambda: replicas[1].admit("alice", "iris", 1, limits))
    assert refused.retry_after is not None
    expected = admitted.budget_reset.timestamp() - time.time()
    assert abs(refused.retry_after - expected) < 1.0


def test_every_key_written_expires(redis_url: str, prefix: str) -> None:
    admission = Admission(redis_url, key_prefix=prefix)
    limits = Limits(rate="5/minute", row_rate="50/minute", model_rate="9/minute", budget="99/day")
    admission.admit("alice", "iris", 3, Limits(concurrency=1, **limits.to_json()))
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    ttls = {key: client.pttl(key) for key in keys}
    client.close()
    admission.close()
    assert len(keys) == 8  # three windows with their sums, one budget, one slot set
    assert all(ttl > 0 for ttl in ttls.values()), ttls


# --- failing closed -----------------------------------------------------------------------------


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_redis_down_refuses_promptly_and_never_admits() -> None:
    admission = Admission(f"redis://127.0.0.1:{_unused_port()}/0", key_prefix="down")
    limits = Limits(rate="1000/second", budget="10/day")
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        admission.admit("alice", "iris", 1, limits)
    assert time.monotonic() - started < 1.0
    assert info.value.message == "rate limit storage is unavailable; refusing requests"
    assert info.value.retry_after == 1.0
    with pytest.raises(Unavailable):
        admission.budget_status("alice", "iris", limits)
    with pytest.raises(Unavailable):
        admission.reset_budget("alice", "iris")


def test_a_redis_that_never_answers_times_out_promptly() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never replies
        port = silent.getsockname()[1]
        admission = Admission(f"redis://127.0.0.1:{port}/0", key_prefix="hung", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            admission.admit("alice", "iris", 1, Limits(rate="5/second"))
        assert time.monotonic() - started < 1.0


class Proxy:
    """A TCP relay to Redis that can be cut, standing for Redis going down mid-service."""

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self._upstream = (url.hostname or "127.0.0.1", url.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        # A plain close would leave the accept() in progress serving new connections.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_redis_going_down_mid_service_fails_closed(redis_url: str, prefix: str) -> None:
    proxy = Proxy(redis_url)
    admission = Admission(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=prefix)
    limits = Limits(rate="100/minute", concurrency=5)
    admitted = admission.admit("alice", "iris", 1, limits)
    proxy.cut()
    # The release cannot reach Redis: it stays quiet and leaves the slot to its lease.
    admitted.release()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        admission.admit("alice", "iris", 1, limits)
    assert time.monotonic() - started < 1.0
    admission.close()
