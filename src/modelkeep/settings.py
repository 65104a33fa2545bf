"""One typed, frozen Settings object, built once at start.

Values come from keyword arguments, then ``MODELKEEP_*`` environment variables, then defaults.
Every default is the secure one; each field says why.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Effective configuration of one modelkeep process."""

    model_config = SettingsConfigDict(env_prefix="MODELKEEP_", frozen=True, extra="forbid")

    data_dir: Path = Field(description="Directory made by `modelkeep init` (keys, TLS, blobs).")
    # Loopback unless told otherwise: a fresh install is not reachable from the network.
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # None means the embedded SQLite database inside data_dir.
    database_url: str | None = None
    # Pushes are streamed and refused with 413 as soon as this many bytes have arrived.
    max_upload_bytes: int = Field(default=2 * GiB, ge=1)
    # Inference and management bodies are refused while being read once over this size.
    max_request_bytes: int = Field(default=64 * MiB, ge=1)
    # Checked against the declared shape before any tensor is built.
    max_tensor_elements: int = Field(default=16_000_000, ge=1)
    # How often each worker looks for changes (keys, labels, versions); bounds revocation delay.
    refresh_interval_s: float = Field(default=0.25, gt=0, le=5)
    # Where rate limits, budgets and concurrency are counted: memory:// per process, or
    # redis://host:port/db shared by every worker and replica. Unreachable means refusal.
    limits_storage: str = "memory://"
    # Inference requests waiting or running per worker before new ones are shed with 503.
    max_queue: int = Field(default=64, ge=1)
    # Inference bodies up to this size run inline on the event loop (faster for small models);
    # larger ones, or any when limits are counted in Redis, run in a thread under the timeout.
    inline_max_bytes: int = Field(default=64 * 1024, ge=0)
    # Slow or large inference calls running in the runtime at once per worker; the others wait
    # their turn in the queue above. 0 = one per CPU the worker may use. More threads than
    # CPUs only time-slice the same cores and starve the event loop that sheds overload.
    inference_threads: int = Field(default=0, ge=0, le=256)
    # A request still running after this is answered 503 (its thread finishes in the background).
    inference_timeout_s: float = Field(default=30.0, gt=0)
    # One JSON line per request on stdout: who, what, status, latency, rows, an input digest;
    # never a payload or a credential.
    access_log: bool = True
    # Alert webhooks (http or https URLs, a JSON list in MODELKEEP_ALERT_WEBHOOKS). Bodies are
    # signed with HMAC-SHA256 under alert_webhook_secret (at least 16 characters).
    alert_webhooks: tuple[str, ...] = ()
    alert_webhook_secret: str | None = Field(default=None, repr=False)
    # Authentication failures from one source within a minute that raise an alert.
    alert_auth_failures_per_minute: int = Field(default=20, ge=1)
    # OpenTelemetry spans over the request path (needs the `tracing` extra); off by default.
    tracing: bool = False
    # How often each worker signs the audit chain's head (also at shutdown).
    audit_checkpoint_interval_s: float = Field(default=60.0, gt=0)
    # Threads per ONNX Runtime session; 0 lets ONNX Runtime decide.
    runtime_threads: int = Field(default=1, ge=0, le=256)

    # -- key service (docs/scale-out.md, "Key services") ------------------------------------
    # Who wraps the per-version data keys: `local` (the key file made by `modelkeep init`),
    # `openbao` / `openbao+https://HOST:PORT/MOUNT/keys/NAME` (OpenBao or Vault Transit), or
    # `awskms` / `awskms:KEY` (AWS KMS key id, ARN or alias/NAME). An unreachable key service
    # means refusal (503); nothing ever falls back to the local key file.
    key_service: str = "local"
    # The bare forms need these: the OpenBao address (https://HOST:PORT) and the key
    # (MOUNT/keys/NAME for OpenBao; key id, ARN or alias/NAME for AWS KMS).
    key_service_address: str | None = None
    key_service_key: str | None = None
    # CA certificate(s) that verify the key service's TLS certificate; None: the system's.
    # TLS is always verified; plain http is accepted only to a loopback address.
    key_service_ca_file: Path | None = None
    # OpenBao credentials: a token file (re-read when the token is refused, so an agent can
    # renew it), or AppRole (role id, and a file holding the secret id).
    key_service_token_file: Path | None = None
    key_service_approle_role_id: str | None = None
    key_service_approle_secret_id_file: Path | None = None
    key_service_approle_mount: str = "approle"
    # AWS KMS: region, and an endpoint for KMS-compatible servers; credentials come from the
    # usual AWS environment/profile chain, never from modelkeep's settings.
    key_service_region: str | None = None
    key_service_endpoint: str | None = None
    # Every call to the key service gives up after this long (connect and read).
    key_service_timeout_s: float = Field(default=5.0, gt=0, le=120)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'modelkeep.db'}"
