"""Extraction-detector state in Redis, so every replica sees one history per client.

Each (namespace, client) is one Redis hash; each detector key one field, holding a float64
array as ``ndim`` (1 byte), the shape (8-byte little-endian each), then the raw values: plain
numbers, never pickles. Hashes expire after ``ttl_s`` without writes. Replicas updating the same
client at the same moment may lose one of the two updates; the detectors are statistical, and a
lost observation only delays an alarm by a query.
"""

from __future__ import annotations

import struct

import numpy as np
import redis

from modelkeep.errors import Unavailable

_TIMEOUT_S = 0.25


class RedisDetectorState:
    """A :class:`~modelkeep.guard.detection.DetectorState` in Redis; refuses when unreachable."""

    def __init__(self, url: str, *, namespace: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
        )
        self._namespace = namespace
        self._ttl_s = ttl_s

    def _key(self, client: str) -> str:
        return f"{self._namespace}:{client}"

    def get(self, client: str, key: str) -> np.ndarray | None:
        try:
            raw = self._redis.hget(self._key(client), key)
        except redis.RedisError as exc:
            raise _unavailable() from exc
        return None if raw is None else _decode(bytes(raw))  # type: ignore[arg-type]

    def put(self, client: str, key: str, value: np.ndarray) -> None:
        name = self._key(client)
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(name, key, _encode(value))
                pipe.expire(name, self._ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable() from exc

    def clear(self, client: str, prefix: str = "") -> None:
        name = self._key(client)
        try:
            if not prefix:
                self._redis.delete(name)
                return
            wanted = prefix.encode()
            fields = [f for f in self._redis.hkeys(name) if _field(f).startswith(wanted)]
            if fields:
                self._redis.hdel(name, *fields)
        except redis.RedisError as exc:
            raise _unavailable() from exc


def _field(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _encode(value: np.ndarray) -> bytes:
    array = np.ascontiguousarray(value, dtype="<f8")
    return struct.pack(f"<B{array.ndim}q", array.ndim, *array.shape) + array.tobytes()


def _decode(raw: bytes) -> np.ndarray:
    ndim = raw[0]
    shape = struct.unpack_from(f"<{ndim}q", raw, 1)
    data = raw[1 + 8 * ndim :]
    return np.frombuffer(data, dtype="<f8").reshape(shape).astype(np.float64)


def _unavailable() -> Unavailable:
    return Unavailable("detector state storage is unavailable; refusing requests", retry_after=1)
