"""``Service``: the one object the API and the CLI hold, composed of the core and its parts.

Each part is built with what it needs from the core (``core.py``) and knows nothing of the
others, but these, which are handed what they use of another part here:

- the data plane hands sampled calls to the captures and each call's inputs to the drift
  monitor;
- guard administration hands its calibration rows to the drift watch (the drift reference);
- management moves labels through the change requests, which judge gates with the
  evaluations, and has each push evaluated;
- the lineage part reads a version's metrics and approvals from the change requests;
- the key service's last re-wrap pass also re-wraps the evaluation sets' keys;
- the data plane routes canaries and mirrors shadows through the watches the canaries part
  reads and judges, and canaries start and promote through the change requests.

| attribute | part | what it does |
|---|---|---|
| ``core`` | ``Core`` | snapshot, refresh, audit records, alerts, authentication, lookups, loading |
| ``dataplane`` | ``DataPlane`` | metadata, readiness and inference for every protocol |
| ``management`` | ``Management`` | models, versions, labels, publishers, keys, pushes |
| ``guard`` | ``GuardAdmin`` | guard policies, calibration, leakage assessment, blocks and budgets |
| ``auditing`` | ``AuditReader`` | audit entries and verification, metrics exposition |
| ``captures`` | ``Captures`` | payload capture: sealing sampled calls, listing and reading them |
| ``kek`` | ``KekAdmin`` | the key-encryption key: status, rotation, re-wrapping |
| ``evaluations`` | ``Evaluations`` | evaluation sets, gates, metrics (off the request path) |
| ``changes`` | ``Changes`` | protected labels, change requests, approvals, label history |
| ``lineage`` | ``Lineage`` | versions including deleted ones, CycloneDX bills of materials |
| ``retention`` | ``Retention`` | crypto-shredding deletion, retention rules (on the poller) |
| ``drift`` | ``DriftWatch`` | population drift: its reference, its status, the monitor |
| ``canaries`` | ``Canaries`` | canary and shadow traffic on labels, automatic rollback |

The calls the API and the CLI make are also attributes of ``Service`` itself, bound once to
the part that serves them (``service.push`` is ``service.management.push``): no call pays for
the indirection.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from modelkeep.audit import KEY_FILE as AUDIT_KEY_FILE
from modelkeep.audit import AuditLog, CheckpointSigner
from modelkeep.audit.alerts import Alerter
from modelkeep.audit.metrics import Metrics
from modelkeep.bootstrap import BLOB_DIR, DB_FILE, KEK_FILE
from modelkeep.crypto import KeyService, open_key_service
from modelkeep.errors import ConfigError
from modelkeep.guard.admission import Admission
from modelkeep.guard.gate import InferenceGate, shared_state_factory
from modelkeep.policy import Authorizer
from modelkeep.registry.blobs import BlobStore, blob_store_from
from modelkeep.registry.records import Snapshot
from modelkeep.registry.upload import staging_dir
from modelkeep.runtime._plaintext_file import remove_stale
from modelkeep.service._canary_watch import Watches
from modelkeep.service.audit import AuditReader
from modelkeep.service.canary import Canaries
from modelkeep.service.capture import Captures
from modelkeep.service.changes import Changes
from modelkeep.service.core import Core, alerter_from
from modelkeep.service.dataplane import DataPlane
from modelkeep.service.drift import DriftWatch
from modelkeep.service.evaluation import Evaluations
from modelkeep.service.guard_admin import GuardAdmin
from modelkeep.service.kek import KekAdmin
from modelkeep.service.lineage import Lineage
from modelkeep.service.management import Management
from modelkeep.service.retention import Retention
from modelkeep.settings import Settings
from modelkeep.store.metadata import MetadataStore


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Service:
    """modelkeep's service in one worker process, shared by every protocol adapter."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: MetadataStore,
        blobs: BlobStore,
        keys: KeyService,
        authorizer: Authorizer | None = None,
        audit: AuditLog | None = None,
        gate: InferenceGate | None = None,
        metrics: Metrics | None = None,
        alerter: Alerter | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        core = self.core = Core(
            settings,
            store=store,
            blobs=blobs,
            keys=keys,
            authorizer=authorizer,
            audit=audit,
            gate=gate,
            metrics=metrics,
            alerter=alerter,
            clock=clock,
        )
        self.captures = Captures(core)
        self.drift = drift = DriftWatch(core)
        watches = Watches(core.session)
        self.dataplane = DataPlane(core, self.captures, drift.monitor, watches)
        self.evaluations = evaluations = Evaluations(core)
        self.changes = changes = Changes(core, evaluations)
        self.canaries = canaries = Canaries(core, changes, watches)
        self.management = management = Management(core, changes)
        self.guard = guard = GuardAdmin(core, on_calibrated=drift.calibrate_from)
        self.lineage = lineage = Lineage(core, changes.bom_evidence)
        self.retention = retention = Retention(core)
        self.auditing = auditing = AuditReader(core)
        self.kek = kek = KekAdmin(core, rewrap_evalsets=evaluations.rewrap_evalsets)
        # What the core shares.
        self.settings = core.settings
        self.store = core.store
        self.registry = core.registry
        self.audit = core.audit
        self.metrics = core.metrics
        self.gate = core.gate
        self.authorizer = core.authorizer
        self.backends = core.backends
        self.refresh = core.refresh
        self.record = core.record
        self.authenticate = core.authenticate
        self.record_auth_failure = core.record_auth_failure
        self.ready = core.ready
        self.drain = core.drain
        self.start = core.start
        self.stop = core.stop
        self.settings_digest = core.settings_digest
        # The calls of the API and the CLI, served by the parts.
        self.authorize_push = management.authorize_push
        self.push = management.push
        self.put_model = management.put_model
        self.add_publisher = management.add_publisher
        self.remove_publisher = management.remove_publisher
        self.list_models = management.list_models
        self.get_model = management.get_model
        self.get_version = management.get_version
        self.set_label = management.set_label
        self.delete_label = management.delete_label
        self.create_key = management.create_key
        self.list_keys = management.list_keys
        self.revoke_key = management.revoke_key
        self.whoami = management.whoami
        self.get_policy = guard.get_policy
        self.set_policy = guard.set_policy
        self.calibrate_policy = guard.calibrate_policy
        self.assess_policy = guard.assess_policy
        self.privacy_report = guard.privacy_report
        self.unblock = guard.unblock
        self.reset_budget = guard.reset_budget
        self.audit_entries = auditing.audit_entries
        self.audit_verify = auditing.audit_verify
        self.metrics_exposition = auditing.metrics_exposition
        self.list_captures = self.captures.list_captures
        self.read_capture = self.captures.read_capture
        self.purge_captures = self.captures.purge_captures
        self.kek_status = kek.kek_status
        self.kek_rotate = kek.kek_rotate
        self.kek_rewrap = kek.kek_rewrap
        self.set_evalset = evaluations.set_evalset
        self.get_evalset = evaluations.get_evalset
        self.run_evaluation = evaluations.run_evaluation
        self.show_evaluation = evaluations.show_evaluation
        self.evaluations_of = evaluations.evaluations_of
        self.protect_label = changes.protect_label
        self.protections = changes.protections
        self.label_history = changes.label_history
        self.rollback_label = changes.rollback_label
        self.list_changes = changes.list_changes
        self.get_change = changes.get_change
        self.approve_change = changes.approve_change
        self.reject_change = changes.reject_change
        self.version_record = lineage.version_record
        self.all_versions = lineage.all_versions
        self.version_bom = lineage.version_bom
        self.delete_version = retention.delete_version
        self.delete_model = retention.delete_model
        self.get_retention = retention.get_retention
        self.set_retention = retention.set_retention
        self.apply_retention = retention.apply_retention
        self.drift_status = drift.drift_status
        self.configure_drift = drift.configure_drift
        self.start_canary = canaries.start_canary
        self.start_shadow = canaries.start_shadow
        self.promote_canary = canaries.promote
        self.abort_canary = canaries.abort
        self.canary_status = canaries.status

    @classmethod
    def open(cls, settings: Settings, *, clock: Callable[[], datetime] = _utcnow) -> Service:
        """Open the data dir made by ``modelkeep init``; ConfigError if it is not usable.
        ``clock``: the service's time (tests move it)."""
        data_dir = settings.data_dir
        if not (data_dir / KEK_FILE).is_file():
            raise ConfigError("not a modelkeep data directory (run `modelkeep init` first)")
        if settings.database_url is None and not (data_dir / DB_FILE).is_file():
            raise ConfigError("the data directory has no database (run `modelkeep init` first)")
        store = MetadataStore(settings.effective_database_url)
        store.migrate()
        service = cls(
            settings,
            store=store,
            blobs=blob_store_from(settings, data_dir / BLOB_DIR),
            keys=open_key_service(settings, data_dir / KEK_FILE),
            audit=AuditLog(store.engine, signer=CheckpointSigner.load(data_dir / AUDIT_KEY_FILE)),
            gate=InferenceGate(
                Admission(settings.limits_storage),
                # With Redis for limits, detector histories are shared through it too.
                state_factory=None
                if settings.limits_storage == "memory://"
                else shared_state_factory(settings.limits_storage),
            ),
            alerter=alerter_from(settings),
            clock=clock,
        )
        service.registry.staging_dir = staging_dir(data_dir)
        remove_stale(str(settings.plaintext_dir))  # plaintext left by a process that crashed
        service.refresh()
        return service

    @property
    def snapshot(self) -> Snapshot:
        return self.core.snapshot

    @property
    def draining(self) -> bool:
        """Set on SIGTERM (``drain``): not ready any more, though requests are still served."""
        return self.core.draining
