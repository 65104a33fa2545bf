"""Payload capture: sampled inference requests and responses, sealed for auditors only.

A model's policy may turn capture on (``{"sample": 0..1, "days": 1..365}``; off by default,
DESIGN §1). A sampled request becomes one :class:`CaptureRecord`, sealed with
:func:`modelkeep.crypto.seal` under a fresh data key of its own; the key service wraps that key
with associated data binding it to ``(model, record id)``, so neither the key nor the sealed
bytes can be moved to another record or model. Storage only ever holds the wrapped key, the
sealed bytes and the metadata needed to list records (who, when, which version, sizes).

A data key per record, rather than per hour, costs one wrap per captured request; it runs on the
background writer (:class:`CaptureWriter`), never on the inference path, and it means one
unwrapped key opens exactly one record. Every way a record can fail to open is the one opaque
:class:`~modelkeep.errors.IntegrityError`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import queue
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from modelkeep.audit.access import current_request_id
from modelkeep.crypto import KeyService, new_data_key, seal, unseal
from modelkeep.errors import IntegrityError, ModelkeepError

__all__ = [
    "MAX_CAPTURE_BYTES",
    "CaptureRecord",
    "CaptureWriter",
    "SealedCapture",
    "associated_data_for",
    "current_request_id",
    "expires_at",
    "is_capture_id",
    "is_expired",
    "new_capture_id",
    "open_record",
    "seal_record",
    "should_capture",
]

log = logging.getLogger(__name__)

#: Requests whose body and response together exceed this are not captured (and are counted).
MAX_CAPTURE_BYTES = 1 << 20
_DOMAIN = b"modelkeep/capture/v1"
_FAILED = "capture record failed verification"
_ID = re.compile(r"[0-9a-f]{32}")
_DROP_LOG_INTERVAL_S = 10.0

T = TypeVar("T")


def should_capture(sample: float, rand: Callable[[], float] = random.random) -> bool:
    """Whether to capture this request: true with probability ``sample`` (0 never, 1 always).

    ``rand`` returns floats in [0, 1); tests pass their own.
    """
    return rand() < sample


def new_capture_id() -> str:
    """A fresh random record id: 32 lowercase hex characters (128 bits)."""
    return secrets.token_hex(16)


def is_capture_id(text: str) -> bool:
    """Whether ``text`` has the shape of a record id (checked before any lookup)."""
    return _ID.fullmatch(text) is not None


def associated_data_for(model: str, capture_id: str) -> bytes:
    """The associated data binding a wrapped key and a sealed record to ``(model, capture_id)``.

    Length-prefixed fields after a domain tag: two different pairs never give the same bytes,
    and nothing else modelkeep seals or wraps uses this tag.
    """
    return b"".join(
        len(field).to_bytes(4, "big") + field
        for field in (_DOMAIN, model.encode("utf-8"), capture_id.encode("ascii"))
    )


def expires_at(now: datetime, days: int) -> datetime:
    """When a record captured at ``now`` and kept ``days`` days must be gone."""
    return now + timedelta(days=days)


def is_expired(expiry: datetime, now: datetime) -> bool:
    """Whether a record expiring at ``expiry`` is past its retention at ``now``."""
    return expiry <= now


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One captured inference call: exactly the request body and the response body."""

    request_sha256: str
    request_id: str | None
    principal: str
    model: str
    version: int
    time: datetime
    input: bytes
    output: bytes

    def to_json(self) -> dict[str, Any]:
        """The record as JSON; ``input`` and ``output`` are base64 of the exact bytes."""
        return {
            "request_sha256": self.request_sha256,
            "request_id": self.request_id,
            "principal": self.principal,
            "model": self.model,
            "version": self.version,
            "time": self.time.isoformat(),
            "input": base64.b64encode(self.input).decode("ascii"),
            "output": base64.b64encode(self.output).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaptureRecord:
        """Inverse of :meth:`to_json`; KeyError, TypeError or ValueError on a malformed record."""
        return cls(
            request_sha256=str(data["request_sha256"]),
            request_id=None if data["request_id"] is None else str(data["request_id"]),
            principal=str(data["principal"]),
            model=str(data["model"]),
            version=int(data["version"]),
            time=datetime.fromisoformat(data["time"]),
            input=base64.b64decode(data["input"], validate=True),
            output=base64.b64decode(data["output"], validate=True),
        )


@dataclass(frozen=True, slots=True)
class SealedCapture:
    """What storage holds of a record's content: the wrapped data key and the sealed bytes."""

    wrapped_key: bytes
    kek_id: str
    sealed: bytes


def seal_record(record: CaptureRecord, capture_id: str, keys: KeyService) -> SealedCapture:
    """Seal ``record`` under a fresh data key, wrapped by ``keys``; both bound to
    ``(record.model, capture_id)``. The plaintext never leaves memory."""
    ad = associated_data_for(record.model, capture_id)
    data_key = new_data_key()
    plaintext = json.dumps(record.to_json(), separators=(",", ":")).encode("utf-8")
    out = io.BytesIO()
    seal(plaintext, data_key, ad, out)
    return SealedCapture(
        wrapped_key=keys.wrap(data_key, ad), kek_id=keys.key_id, sealed=out.getvalue()
    )


def open_record(
    model: str, capture_id: str, wrapped_key: bytes, sealed: bytes, keys: KeyService
) -> CaptureRecord:
    """The record, only if its key unwraps and its bytes verify for ``(model, capture_id)``.

    Any failure (other KEK, other model or id, a changed byte) is one IntegrityError.
    """
    # 1. The data key unwraps only under this KEK and this (model, id).
    ad = associated_data_for(model, capture_id)
    data_key = keys.unwrap(wrapped_key, ad)
    # 2. Every segment verifies under that key and the same binding, or nothing is returned.
    plaintext = unseal(io.BytesIO(sealed), data_key, ad)
    # 3. Only authenticated bytes are parsed; a well-sealed but malformed record is still
    #    refused, and so is one that names another model.
    try:
        record = CaptureRecord.from_json(json.loads(plaintext))
    except (KeyError, TypeError, ValueError):
        record = None
    if record is None or record.model != model:
        raise IntegrityError(_FAILED)
    return record


class CaptureWriter(Generic[T]):
    """Hands items to ``write`` on one background thread through a bounded queue.

    :meth:`submit` never blocks: when the queue is full the item is dropped, counted and logged
    (without its content), so a slow disk or key service slows capture, never inference. The
    thread starts with the first item, so a server that captures nothing runs no thread.
    """

    def __init__(self, write: Callable[[T], None], *, max_queue: int = 256) -> None:
        self._write = write
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_drop_log = -_DROP_LOG_INTERVAL_S
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.too_large = 0

    def submit(self, item: T) -> bool:
        """Queue ``item`` for writing; False (and counted) if the queue is full or closed."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="modelkeep-capture", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop()
            return False
        return True

    def skip_too_large(self) -> None:
        """Count a sampled request that was not captured because of its size."""
        with self._lock:
            self.too_large += 1

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1
            dropped = self.dropped
            now = time.monotonic()
            if now - self._last_drop_log < _DROP_LOG_INTERVAL_S:
                return
            self._last_drop_log = now
        log.warning("payload capture queue full: %d captures dropped so far", dropped)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._write(item)
            except ModelkeepError as exc:
                self._count_failure()
                log.error("payload capture not stored: %s", exc.message)
            except Exception:
                # Only the type: a traceback could show a local holding the payload.
                self._count_failure()
                log.error("payload capture not stored: unexpected error")
            else:
                with self._lock:
                    self.written += 1
            finally:
                self._queue.task_done()

    def _count_failure(self) -> None:
        with self._lock:
            self.failed += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued item has been handled; False on timeout (for tests)."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking items, write what is queued (up to ``timeout``), stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                log.warning("payload capture writer did not drain before shutdown")
                return
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
