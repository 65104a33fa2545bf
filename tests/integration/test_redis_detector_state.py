"""Extraction-detector state in a real Redis: two replicas see one history per client."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from modelkeep.errors import Unavailable
from modelkeep.guard._redis_state import RedisDetectorState
from modelkeep.guard.detection import PradaConfig, PradaDetector

pytestmark = pytest.mark.integration


@pytest.fixture
def namespace(redis_url: str) -> str:
    return f"modelkeep-test:{secrets.token_hex(6)}"


def test_arrays_round_trip_and_clear_by_prefix(redis_url: str, namespace: str) -> None:
    state = RedisDetectorState(redis_url, namespace=namespace)
    matrix = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    state.put("alice", "prada/3/set", matrix)
    state.put("alice", "prada/3/dist", np.array([0.5, 1.5]))
    state.put("alice", "ood/window", np.array([1.0]))
    np.testing.assert_array_equal(state.get("alice", "prada/3/set"), matrix)
    assert state.get("alice", "missing") is None
    assert state.get("bob", "prada/3/set") is None
    state.clear("alice", "prada/")
    assert state.get("alice", "prada/3/set") is None
    np.testing.assert_array_equal(state.get("alice", "ood/window"), np.array([1.0]))
    state.clear("alice")
    assert state.get("alice", "ood/window") is None


def test_two_replicas_build_one_history(redis_url: str, namespace: str) -> None:
    rng = np.random.default_rng(0)
    config = PradaConfig(min_samples=10)
    first = PradaDetector(config, state=RedisDetectorState(redis_url, namespace=namespace))
    second = PradaDetector(config, state=RedisDetectorState(redis_url, namespace=namespace))
    alone = PradaDetector(config)
    shared, local = [], []
    for i in range(40):
        x, label = rng.standard_normal((1, 8)), np.array([i % 3])
        replica = first if i % 2 == 0 else second
        shared.append(replica.observe("caller", x, label))
        local.append(alone.observe("caller", x, label))
    # Alternating between replicas gives exactly what one in-process detector sees.
    assert [(r.samples, r.score) for r in shared] == [(r.samples, r.score) for r in local]
    assert shared[-1].samples > config.min_samples


def test_an_unreachable_redis_refuses(namespace: str) -> None:
    state = RedisDetectorState("redis://127.0.0.1:1/0", namespace=namespace)
    with pytest.raises(Unavailable) as info:
        state.get("alice", "prada/0/set")
    assert info.value.message == "detector state storage is unavailable; refusing requests"
