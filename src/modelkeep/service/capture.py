"""Payload capture: sampled requests sealed off the inference path, read back by auditors."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from modelkeep.audit.capture import (
    MAX_CAPTURE_BYTES,
    CaptureRecord,
    CaptureWriter,
    current_request_id,
    expires_at,
    is_capture_id,
    is_expired,
    new_capture_id,
    open_record,
    seal_record,
    should_capture,
)
from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput, ModelkeepError, NotFound
from modelkeep.guard.policy import CapturePolicy
from modelkeep.policy import Action
from modelkeep.registry.records import VersionRecord
from modelkeep.runtime.tensor_json import json_outputs
from modelkeep.service._shared import log, model_target
from modelkeep.service.core import Core
from modelkeep.store.captures import CaptureInfo, CaptureStore, NewCapture


def encode_capture_output(version: VersionRecord, outputs: Mapping[str, np.ndarray]) -> bytes:
    """The outputs a caller got, as a V2 JSON response body (every output as JSON data): the
    neutral form a captured response is kept in, whatever protocol the caller spoke."""
    document = {
        "model_name": version.model,
        "model_version": str(version.number),
        "outputs": json_outputs(outputs),
    }
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


class Captures:
    """Payload capture (opt-in per model through its guard policy): the data plane hands it
    sampled calls; auditors list and read them back."""

    def __init__(self, core: Core) -> None:
        self.registry = core.registry
        self.authorizer = core.authorizer
        self.refresh = core.refresh
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        self.store = CaptureStore(core.store)
        self.capture_writer: CaptureWriter[tuple[CaptureRecord, datetime]] = CaptureWriter(
            self._store_capture
        )
        self.capture_random: Callable[[], float] = random.random
        self._last_capture_purge = -float("inf")
        core.on_poll(self.purge_captures)
        core.on_stop(lambda: self.capture_writer.close(timeout=5))

    def capture(
        self,
        principal: Principal,
        version: VersionRecord,
        capture: CapturePolicy,
        body: bytes,
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Queue a sampled request for sealing and storage; never blocks or fails inference.

        The request is kept as received; the response as the hardened outputs the caller got,
        in V2 JSON whatever the protocol (``encode_capture_output``).
        """
        if not should_capture(capture.sample, self.capture_random):
            return
        content = encode_capture_output(version, outputs)
        if len(body) + len(content) > MAX_CAPTURE_BYTES:
            self.capture_writer.skip_too_large()
            return
        now = self._clock()
        record = CaptureRecord(
            request_sha256=hashlib.sha256(body).hexdigest(),
            request_id=current_request_id(),
            principal=principal.key_id,
            model=version.model,
            version=version.number,
            time=now,
            input=bytes(body),
            output=bytes(content),
        )
        self.capture_writer.submit((record, expires_at(now, capture.days)))

    def _store_capture(self, item: tuple[CaptureRecord, datetime]) -> None:
        # On the writer thread: the wrap may call a remote key service, the insert waits on disk.
        record, expiry = item
        capture_id = new_capture_id()
        sealed = seal_record(record, capture_id, self.registry.keys)
        self.store.add(
            NewCapture(
                id=capture_id,
                model=record.model,
                version=record.version,
                principal=record.principal,
                created_at=record.time,
                expires_at=expiry,
                input_size=len(record.input),
                output_size=len(record.output),
                wrapped_key=sealed.wrapped_key,
                kek_id=sealed.kek_id,
                sealed=sealed.sealed,
            )
        )

    def purge_captures(self, *, force: bool = False) -> int:
        """Delete expired captures, at most hourly unless ``force``; returns how many."""
        if not force and time.monotonic() - self._last_capture_purge < 3600.0:
            return 0
        self._last_capture_purge = time.monotonic()
        try:
            purged = self.store.purge(self._clock())
        except ModelkeepError as exc:
            log.warning("purging expired captures failed: %s", exc.message)
            return 0
        if purged:
            log.info("purged %d expired payload captures", purged)
        return purged

    def list_captures(
        self,
        principal: Principal,
        model: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CaptureInfo]:
        """Metadata of ``model``'s unexpired captures, newest first (auditors and admins)."""
        self.refresh()
        self.authorizer.check(principal, Action.AUDIT_READ)
        record = self._model(principal, Action.MODEL_READ, model)
        for bound in (since, until):
            if bound is not None and bound.tzinfo is None:
                raise InvalidInput("since and until need a time zone (e.g. a trailing Z)")
        found = self.store.find(record.name, since=since, until=until, limit=limit)
        now = self._clock()
        return [info for info in found if not is_expired(info.expires_at, now)]

    def read_capture(
        self, principal: Principal, model: str, capture_id: str
    ) -> tuple[CaptureInfo, CaptureRecord]:
        """One decrypted capture (auditors and admins); the read is audited before it returns."""
        self.refresh()
        details: dict[str, Any] = {"id": capture_id[:64]}
        with self._audited(principal, "capture.read", model_target(model), details):
            self.authorizer.check(principal, Action.AUDIT_READ)
            record = self._model(principal, Action.MODEL_READ, model)
            if not is_capture_id(capture_id):
                raise NotFound(f"model '{record.name}' has no such capture")
            info, wrapped_key, sealed = self.store.get(record.name, capture_id)
            if is_expired(info.expires_at, self._clock()):
                raise NotFound(f"model '{record.name}' has no such capture")
            opened = open_record(record.name, capture_id, wrapped_key, sealed, self.registry.keys)
        return info, opened
