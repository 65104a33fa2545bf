"""Evaluation sets and gates: the metrics each version earns, computed off the request path.

A model's evaluation set is sealed under its own data key (wrapped by the key service, bound to
the model and the set's digest) and stored in the blob store; the plaintext exists only in
memory while a version is evaluated, and every such read is audited. After a push, the new
version is evaluated by one background thread per worker; its metrics are kept with the version
and judged against the model's gates whenever a protected label is to point at it.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable
from typing import Any

from modelkeep.auth import Principal
from modelkeep.crypto import new_data_key, seal, unseal
from modelkeep.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    KeyServiceError,
    ModelkeepError,
    NotFound,
    TooLarge,
)
from modelkeep.lifecycle.evalset import EvalSet, compute_metrics, read_evalset, summary
from modelkeep.lifecycle.gates import Gate, GateResult, check_gates, parse_gates
from modelkeep.policy import Action
from modelkeep.registry.blobs import new_blob_key
from modelkeep.registry.records import ModelRecord
from modelkeep.service._shared import log, model_target
from modelkeep.service.core import Core, resolve_version
from modelkeep.store.metadata import Evaluation, LifecycleStore, StoredEvalSet

_DOMAIN = b"modelkeep/evalset/v1"
# Evaluations waiting per worker at most; past it a push's evaluation is skipped (and logged):
# `modelkeep eval run` starts it again.
_QUEUE = 256


def evalset_associated_data(model: str, sha256_hex: str) -> bytes:
    """Binds an evaluation set's wrapped key and ciphertext to (model, digest); nothing else
    modelkeep seals uses this domain tag, so it can never open as a model version."""
    return b"".join(
        len(field).to_bytes(4, "big") + field
        for field in (_DOMAIN, model.encode("utf-8"), bytes.fromhex(sha256_hex))
    )


class Evaluator:
    """One daemon thread running queued evaluations in order; never blocks its callers.

    The thread ends soon after ``stopped`` is set (the service stopping) and is started again
    by the next ``submit``.
    """

    def __init__(self, run: Callable[[str, int], None], stopped: threading.Event) -> None:
        self._run = run
        self._stopped = stopped
        self._queue: queue.Queue[tuple[str, int]] = queue.Queue(_QUEUE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, model: str, number: int) -> bool:
        try:
            self._queue.put_nowait((model, number))
        except queue.Full:
            log.warning("evaluation of %s version %s skipped: queue full", model, number)
            return False
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="modelkeep-evaluate", daemon=True
                )
                self._thread.start()
        return True

    def wait(self, timeout: float) -> bool:
        """Block until every queued evaluation is done (tests, shutdown); False on timeout."""
        done = threading.Event()

        def join() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=join, daemon=True).start()
        return done.wait(timeout)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                model, number = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._run(model, number)
            except Exception:
                log.exception("evaluation of %s version %s failed", model, number)
            finally:
                self._queue.task_done()


class Evaluations:
    """Evaluation sets, gates and metrics: the ``evaluations`` part of the service."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings
        self.registry = core.registry
        self.refresh = core.refresh
        self.record = core.record
        self.alert = core.alert
        self._model = core.authorized_model
        self._audited = core.audited
        self._clock = core.clock
        self.lifecycle = LifecycleStore(core.store)
        # Runs until the core stops (its stop event), started again by the next submit.
        self.evaluator = Evaluator(self._evaluate_quietly, core.stopped)

    # -- evaluation sets -----------------------------------------------------------------

    def set_evalset(
        self,
        principal: Principal,
        model: str,
        data: bytes | None,
        gates: list[str] | None,
    ) -> dict[str, Any]:
        """Give ``model`` an evaluation set (``data``, an .npz) and/or gates; audited.

        With ``data`` None the stored set stays and only the gates change; with ``gates`` None
        the gates stay. The set is checked, sealed and stored; versions under a label and the
        newest version are then evaluated in the background.
        """
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "eval.set", model_target(model), details):
            record = self._model(principal, Action.EVAL_CONFIGURE, model)
            parsed = None if gates is None else parse_gates(gates)
            current = self.lifecycle.evalset(record.name)
            if data is None and current is None:
                raise InvalidInput("the model has no evaluation set yet: send one with the gates")
            if parsed is not None:
                details["gates"] = [g.text for g in parsed]
            gate_text = (
                json.dumps([g.text for g in parsed])
                if parsed is not None
                else (current.gates if current is not None else "[]")
            )
            if data is None:
                assert current is not None
                stored = StoredEvalSet(**{**_fields(current), "gates": gate_text})
                stored = self._replace_evalset(stored, None)
            else:
                stored = self._seal_evalset(principal, record.name, data, gate_text)
                details.update(sha256=stored.sha256, size=stored.size)
        self._evaluate_labelled(record)
        return self._evalset_out(stored)

    def _seal_evalset(
        self, principal: Principal, model: str, data: bytes, gates: str
    ) -> StoredEvalSet:
        settings = self.settings
        if len(data) > settings.max_evalset_bytes:
            raise TooLarge(f"an evaluation set is at most {settings.max_evalset_bytes} bytes")
        parsed = read_evalset(
            data,
            max_unpacked=settings.max_evalset_unpacked_bytes,
            max_elements=settings.max_tensor_elements,
        )
        digest = hashlib.sha256(data).hexdigest()
        # 1. A fresh data key, wrapped by the key service bound to (model, digest).
        ad = evalset_associated_data(model, digest)
        data_key = new_data_key()
        wrapped = self.registry.keys.wrap(data_key, ad)
        # 2. Sealed straight into the blob store: the plaintext is never written anywhere.
        blob_key = new_blob_key()
        self.registry.blobs.put(blob_key, lambda out: seal(data, data_key, ad, out))
        stored = StoredEvalSet(
            model=model,
            sha256=digest,
            size=len(data),
            summary=json.dumps(summary(parsed), sort_keys=True),
            gates=gates,
            blob_key=blob_key,
            wrapped_key=wrapped,
            kek_id=self.registry.keys.key_id,
            created_by=principal.key_id,
            created_at=self._clock(),
        )
        return self._replace_evalset(stored, blob_key)

    def _replace_evalset(self, stored: StoredEvalSet, blob_key: str | None) -> StoredEvalSet:
        try:
            old = self.lifecycle.put_evalset(stored)
        except BaseException:
            if blob_key is not None:
                self.registry.blobs.delete(blob_key)
            raise
        if old is not None and old != stored.blob_key:
            self.registry.blobs.delete(old)
        return stored

    def _open_evalset(self, stored: StoredEvalSet, purpose: str) -> EvalSet:
        """Decrypt the set in memory; every read is audited (who: the server; why: purpose)."""
        details = {"sha256": stored.sha256, "purpose": purpose}
        target = model_target(stored.model)
        try:
            ad = evalset_associated_data(stored.model, stored.sha256)
            data_key = self.registry.keys.unwrap(stored.wrapped_key, ad)
            with self.registry.blobs.open(stored.blob_key) as src:
                plaintext = unseal(src, data_key, ad, expected_size=stored.size)
            if hashlib.sha256(plaintext).hexdigest() != stored.sha256:
                raise IntegrityError("the evaluation set failed verification")
            opened = read_evalset(
                plaintext,
                max_unpacked=self.settings.max_evalset_unpacked_bytes,
                max_elements=self.settings.max_tensor_elements,
            )
        except ModelkeepError as exc:
            if isinstance(exc, IntegrityError):
                # A changed blob or row: the set is not used, and someone should know.
                self.alert("tampering", model=stored.model, evalset=stored.sha256)
            self.record(
                "server", "evalset.read", target, "failure", {**details, "error": exc.message}
            )
            raise
        self.record("server", "evalset.read", target, "success", details)
        return opened

    def rewrap_evalsets(self) -> tuple[list[str], list[str]]:
        """Re-wrap every evaluation set's data key under the current KEK (after a rotation);
        the models moved and those refused (KEK gone, key does not verify). The blobs stay."""
        keys = self.registry.keys
        current = keys.rotate(new_key=False)
        moved: list[str] = []
        refused: list[str] = []
        for model, sha256, wrapped, kek_id in self.lifecycle.evalset_keys():
            if kek_id == current:
                continue
            try:
                new = keys.rewrap(wrapped, evalset_associated_data(model, sha256))
            except KeyServiceError as exc:
                if exc.retry_after is not None:
                    raise
                refused.append(model)
                continue
            except IntegrityError:
                refused.append(model)
                continue
            if self.lifecycle.rewrap_evalset(model, wrapped, new, keys.key_id):
                moved.append(model)
        return moved, refused

    def get_evalset(self, principal: Principal, model: str) -> dict[str, Any]:
        """What may be shown of ``model``'s evaluation set: digest, size, shape, gates."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        stored = self.lifecycle.evalset(record.name)
        if stored is None:
            raise NotFound(f"model '{record.name}' has no evaluation set")
        return self._evalset_out(stored)

    @staticmethod
    def _evalset_out(stored: StoredEvalSet) -> dict[str, Any]:
        return {
            "model": stored.model,
            "sha256": stored.sha256,
            "size": stored.size,
            **json.loads(stored.summary),
            "gates": json.loads(stored.gates),
            "created_by": stored.created_by,
            "created_at": stored.created_at.isoformat(),
        }

    # -- evaluating ----------------------------------------------------------------------

    def schedule_evaluation(self, model: str, number: int) -> None:
        """Evaluate a version in the background if its model has an evaluation set."""
        self.evaluator.submit(model, number)

    def _evaluate_labelled(self, record: ModelRecord) -> None:
        numbers = set(record.labels.values())
        if record.latest_version is not None:
            numbers.add(record.latest_version)
        for number in sorted(numbers):
            self.schedule_evaluation(record.name, number)

    def run_evaluation(self, principal: Principal, model: str, version: str) -> int:
        """Queue (again) the evaluation of a version on the current set; audited."""
        self.refresh()
        details: dict[str, Any] = {}
        with self._audited(principal, "eval.run", model_target(model), details):
            record = self._model(principal, Action.LABEL_SET, model)
            found = resolve_version(record, version)
            details["version"] = found.number
            if self.lifecycle.evalset(record.name) is None:
                raise NotFound(f"model '{record.name}' has no evaluation set")
            if not self.evaluator.submit(record.name, found.number):
                raise Conflict("too many evaluations are waiting; try again later")
        return found.number

    def _evaluate_quietly(self, model: str, number: int) -> None:
        try:
            self.evaluate_now(model, number)
        except ModelkeepError as exc:
            log.warning("evaluation of %s version %s: %s", model, number, exc.message)

    def evaluate_now(self, model: str, number: int, *, force: bool = False) -> Evaluation | None:
        """Evaluate one version on its model's current set and keep the metrics; audited.

        Returns the evaluation (None if the model has no set). A version already evaluated on
        this set is not evaluated again unless ``force``.
        """
        stored = self.lifecycle.evalset(model)
        if stored is None:
            return None
        known = self.lifecycle.evaluations(model, stored.sha256).get(number)
        if known is not None and known.status == "done" and not force:
            return known
        self.refresh()
        record = self.core.snapshot.models.get(model)
        version = None if record is None else record.versions.get(number)
        if version is None:
            return None
        target = model_target(model)
        failure: ModelkeepError | None = None
        try:
            evalset = self._open_evalset(stored, f"evaluate version {number}")
            session = self.core.loaded(version)
            metrics = compute_metrics(session, evalset)
        except ModelkeepError as exc:
            failure = exc
        except Exception:
            # A runtime's own error on rows it cannot take: kept as a failed evaluation, with
            # a message that names no internals (the details go to the log).
            log.exception("evaluation of %s version %s failed in the runtime", model, number)
            failure = InvalidInput("the model could not run the evaluation set's rows")
        if failure is not None:
            self.lifecycle.save_evaluation(
                model,
                number,
                stored.sha256,
                status="error",
                metrics=None,
                error=failure.message,
                now=self._clock(),
            )
            self.record(
                "server",
                "version.evaluate",
                target,
                "failure",
                {"version": number, "sha256": stored.sha256, "error": failure.message},
            )
            raise failure
        self.lifecycle.save_evaluation(
            model,
            number,
            stored.sha256,
            status="done",
            metrics=metrics,
            error=None,
            now=self._clock(),
        )
        self.record(
            "server",
            "version.evaluate",
            target,
            "success",
            {"version": number, "sha256": stored.sha256, "metrics": metrics},
        )
        return self.lifecycle.evaluations(model, stored.sha256).get(number)

    # -- gates ---------------------------------------------------------------------------

    def gate_results(
        self,
        record: ModelRecord,
        number: int,
        *,
        relative: bool = True,
        evaluate_references: bool = False,
        known: tuple[StoredEvalSet, dict[int, Evaluation]] | None = None,
    ) -> list[GateResult]:
        """The model's gates decided for version ``number`` now (empty: no gates).

        Relative gates compare with the version under their label at this moment; with
        ``evaluate_references`` a reference version not yet evaluated on the current set is
        evaluated first (synchronously). ``relative`` False leaves relative gates out.
        ``known`` is the set and its evaluations when the caller has just read them.
        """
        if known is None:
            stored = self.lifecycle.evalset(record.name)
            if stored is None:
                return []
            evaluations = self.lifecycle.evaluations(record.name, stored.sha256)
        else:
            stored, evaluations = known
        gates: tuple[Gate, ...] = parse_gates(json.loads(stored.gates))
        if not relative:
            gates = tuple(g for g in gates if g.label is None)
        references: dict[str, tuple[int, dict[str, float] | None] | None] = {}
        for label in {g.label for g in gates if g.label is not None}:
            ref = record.labels.get(label)
            if ref is None:
                references[label] = None
                continue
            found = evaluations.get(ref)
            if (found is None or found.status != "done") and evaluate_references:
                try:
                    found = self.evaluate_now(record.name, ref)
                except ModelkeepError:
                    found = None
            references[label] = (ref, _metrics(found))
        return check_gates(gates, _metrics(evaluations.get(number)), references)

    def evaluations_of(self, principal: Principal, model: str) -> dict[int, dict[str, Any]]:
        """Each evaluated version's metrics and gate verdict, for listings."""
        record = self._model(principal, Action.MODEL_READ, model)
        stored = self.lifecycle.evalset(record.name)
        if stored is None:
            return {}
        found = self.lifecycle.evaluations(record.name, stored.sha256)
        return {
            number: self._evaluation_out(record, number, (stored, found))
            for number in record.versions
        }

    def show_evaluation(
        self, principal: Principal, model: str, version: str | None
    ) -> dict[str, Any]:
        """The evaluation set (never its rows) and each version's metrics and gates."""
        self.refresh()
        record = self._model(principal, Action.MODEL_READ, model)
        stored = self.lifecycle.evalset(record.name)
        body: dict[str, Any] = {
            "model": record.name,
            "evalset": None if stored is None else self._evalset_out(stored),
        }
        numbers = (
            sorted(record.versions)
            if version is None
            else [resolve_version(record, version).number]
        )
        known = None
        if stored is not None:
            known = (stored, self.lifecycle.evaluations(record.name, stored.sha256))
        body["versions"] = [
            {"version": n, **self._evaluation_out(record, n, known)} for n in numbers
        ]
        return body

    def _evaluation_out(
        self,
        record: ModelRecord,
        number: int,
        known: tuple[StoredEvalSet, dict[int, Evaluation]] | None,
    ) -> dict[str, Any]:
        if known is None:
            none: dict[str, Any] = {"metrics": None, "error": None, "evaluated_at": None}
            return {"status": "no evaluation set", **none, "gates": []}
        found = known[1].get(number)
        results = self.gate_results(record, number, known=known)
        verdicts = [r.passed for r in results]
        if found is None:
            status = "pending"
        elif found.status == "error":
            status = "error"
        elif False in verdicts:
            status = "failed"
        elif None in verdicts:
            status = "undecided"
        else:
            status = "passed"
        return {
            "status": status,
            "metrics": None if found is None else found.metrics,
            "error": None if found is None else found.error,
            "evaluated_at": None if found is None else found.evaluated_at.isoformat(),
            "gates": [r.to_json() for r in results],
        }


def _metrics(found: Evaluation | None) -> dict[str, float] | None:
    if found is None or found.status != "done":
        return None
    return found.metrics


def _fields(stored: StoredEvalSet) -> dict[str, Any]:
    return {name: getattr(stored, name) for name in StoredEvalSet.__dataclass_fields__}
