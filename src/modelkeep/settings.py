"""One typed, frozen Settings object, built once at start.

Values come from keyword arguments, then ``MODELKEEP_*`` environment variables, then defaults.
Every default is the secure one; each field says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Effective configuration of one modelkeep process."""

    model_config = SettingsConfigDict(env_prefix="MODELKEEP_", frozen=True, extra="forbid")

    data_dir: Path = Field(description="Directory made by `modelkeep init` (keys, TLS, blobs).")
    # Loopback unless told otherwise: a fresh install is not reachable from the network.
    host: str = "127.0.0.1"
    # Vertex AI tells a custom container its port in AIP_HTTP_PORT, which wins when set.
    port: int = Field(
        default=8443,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("port", "AIP_HTTP_PORT", "MODELKEEP_PORT"),
    )
    workers: int = Field(default=1, ge=1, le=64)
    # The Open Inference Protocol over gRPC (docs/protocols.md): a port of its own on the same
    # host, always TLS with the HTTPS certificate, the same keys and checks. 0 (the default)
    # leaves it off: a fresh install listens on one port only. KServe's usual port is 8081.
    grpc_port: int = Field(default=0, ge=0, le=65535)
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
    # Where an ONNX model's plaintext is decrypted while it loads (a push's smoke load, a served
    # version's load), in a private 0700 directory per process, as a file ONNX Runtime maps.
    # Plaintext must never reach a disk: a directory that is not on tmpfs (or ramfs) is not
    # used, and the model loads from process memory instead (about twice its size).
    plaintext_dir: Path = Path("/dev/shm")  # noqa: S108 (private directory, O_EXCL files)
    # -- pushes (idempotency, leftovers) --
    # How long the server remembers a push's Idempotency-Key (per model and caller): a retry
    # within this time gets the version the first attempt made, never a second one.
    push_key_ttl_s: float = Field(default=24 * 3600.0, ge=60, le=30 * 24 * 3600.0)
    # How often each server applies the models' retention rules (`modelkeep retention set`):
    # versions past "keep the last N" are crypto-shredded, captures past D days destroyed.
    retention_interval_s: float = Field(default=3600.0, ge=10, le=7 * 24 * 3600.0)
    # Unreferenced blobs younger than this may belong to a push still in flight on another
    # replica sharing the blob store, so garbage collection at start leaves them; a local blob
    # directory (one host, collected before its workers start) is swept whole.
    push_max_duration_s: float = Field(default=3600.0, gt=0)
    # -- lifecycle (docs/lifecycle.md) --
    # A change request to move a protected label expires unapproved after this long.
    change_request_ttl_s: float = Field(default=24 * 3600.0, ge=60, le=30 * 24 * 3600.0)
    # An evaluation set upload (.npz) at most this large, and what it may unpack to.
    max_evalset_bytes: int = Field(default=64 * MiB, ge=1)
    max_evalset_unpacked_bytes: int = Field(default=256 * MiB, ge=1)

    # --- Connections: limits and timeouts enforced before any request is authenticated ---
    # (api/_connections.py; docs/limits.md "Connections" gives each default's reason).
    # Request line plus headers of one request: past this, 431 and the connection is closed
    # without reading further, so an unauthenticated caller can make a worker hold no more.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=MiB)
    # Header fields in one request: past this, 431 and close (each field costs a parse and a
    # tuple, and no honest client sends more than a few dozen).
    max_headers: int = Field(default=100, ge=8, le=10_000)
    # Open connections per worker: a new one past this gets 503 and is closed at once, so a
    # flood is refused quickly instead of holding sockets and memory without bound.
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    # Open connections per worker from one client address (the same 503). Behind a proxy that
    # does not keep client addresses, every client shares the proxy's: raise it there.
    max_connections_per_client: int = Field(default=200, ge=1, le=100_000)
    # Seconds a client has to finish the TLS handshake (asyncio's default is 60), and to answer
    # the server's close_notify when a connection is closed.
    tls_handshake_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Seconds from the first byte of a request to the end of its headers; past this, 408 and
    # close. Stops slowloris clients that trickle a header forever.
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # A request body must arrive at body_min_rate bytes per second or more, measured over each
    # window of body_timeout_s seconds (windows in which the server paused reading do not
    # count); a slower body is answered 408 and the connection closed.
    body_timeout_s: float = Field(default=10.0, gt=0, le=300)
    body_min_rate: int = Field(default=1024, ge=1)
    # Seconds a connection may stay open with no request started (after the handshake or the
    # last response) before it is closed.
    keep_alive_timeout_s: int = Field(default=5, ge=1, le=300)

    # -- blob store (sealed artifacts) -------------------------------------------------------
    # None keeps sealed blobs in data_dir/blobs. s3://bucket/prefix puts them in an
    # S3-compatible object store, shared by every replica. Credentials come only from the AWS
    # chain (environment, shared profile, web identity, instance role), never from here.
    blob_url: str | None = Field(
        default=None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[A-Za-z0-9._\-/]*)?$"
    )
    # The object store's endpoint for S3-compatible servers (MinIO, SeaweedFS, Ceph, R2...);
    # None means AWS S3. Plain http is accepted only on loopback.
    blob_s3_endpoint_url: str | None = None
    # None takes the region from the AWS chain (AWS_REGION, the profile).
    blob_s3_region: str | None = None
    # "path" for most S3-compatible servers; "auto" lets the client choose (AWS S3).
    blob_s3_addressing_style: Literal["auto", "virtual", "path"] = "auto"

    # The server certificate (leaf first, then its chain) and its key; default: the files
    # `modelkeep init` made in data_dir/tls. Replaced files (cert-manager, a symlink swap) are
    # picked up without a restart, checked every tls_reload_interval_s.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_reload_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # On SIGTERM: readiness answers 503 at once, every response says Connection: close, and
    # requests are still served for shutdown_delay_s, for load balancers to stop sending (the
    # Helm chart sets 5; none on a single machine); then no new connections, and requests in
    # flight get shutdown_grace_s to finish. The chart's two together stay under Kubernetes'
    # 30 s default.
    shutdown_delay_s: float = Field(default=0.0, ge=0, le=60)
    shutdown_grace_s: int = Field(default=20, ge=1, le=300)

    # -- cloud container contracts (docs/protocols.md) ---------------------------------------
    # SageMaker container mode (`docker run IMAGE serve` under SageMaker): listen on every
    # interface on the port SageMaker uses (SAGEMAKER_BIND_TO_PORT, else 8080) instead of
    # host/port. TLS and keys stay required; see sagemaker_unsafe_plaintext.
    sagemaker: bool = False
    # The model /invocations serves when a request names none (X-Amzn-SageMaker-Target-Model).
    sagemaker_model: str | None = Field(default=None, min_length=1, max_length=200)
    # SageMaker's front end talks plain HTTP to the container. Only with sagemaker=true, and
    # then the listener serves /ping and /invocations only: every other route (management,
    # V2, metrics) answers 404, so no key is ever created or read over plaintext. Keys,
    # authorization, limits and audit still apply to /invocations. A warning is logged at start.
    sagemaker_unsafe_plaintext: bool = False
    # The model Azure ML's /score and /swagger.json serve; the azureml-model-deployment header
    # picks one of its labels (none: the default version).
    azureml_model: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _plaintext_needs_sagemaker(self) -> Settings:
        if self.sagemaker_unsafe_plaintext and not self.sagemaker:
            raise ValueError("sagemaker_unsafe_plaintext is allowed only with sagemaker=true")
        return self

    @property
    def tls_files(self) -> tuple[Path, Path]:
        """The server certificate chain and key files in use."""
        tls = self.data_dir / "tls"
        return (
            self.tls_cert_file or tls / "server.pem",
            self.tls_key_file or tls / "server-key.pem",
        )

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

    # -- Vertex AI custom container (docs/protocols.md, "Vertex AI") --------------------------
    # The routes Vertex sends predictions and health checks to (it sets AIP_PREDICT_ROUTE and
    # AIP_HEALTH_ROUTE in the container); None serves neither. The predict route serves one
    # model, vertex_model, at its default version, with the same key, policy and limits as
    # every route; the health route is public, as /v2/health/* is.
    vertex_predict_route: str | None = Field(
        default=None,
        pattern=r"^/[A-Za-z0-9._~:@!$&'()*+,;=%/-]*$",
        validation_alias=AliasChoices(
            "vertex_predict_route", "AIP_PREDICT_ROUTE", "MODELKEEP_VERTEX_PREDICT_ROUTE"
        ),
    )
    vertex_health_route: str | None = Field(
        default=None,
        pattern=r"^/[A-Za-z0-9._~:@!$&'()*+,;=%/-]*$",
        validation_alias=AliasChoices(
            "vertex_health_route", "AIP_HEALTH_ROUTE", "MODELKEEP_VERTEX_HEALTH_ROUTE"
        ),
    )
    vertex_model: str | None = None

    @model_validator(mode="after")
    def _vertex_routes(self) -> Settings:
        if self.vertex_predict_route is not None and self.vertex_model is None:
            raise ValueError(
                "AIP_PREDICT_ROUTE is set: set MODELKEEP_VERTEX_MODEL to the model it serves"
            )
        # A Vertex route must not hide one of modelkeep's own.
        for route in (self.vertex_predict_route, self.vertex_health_route):
            if route is not None and (
                route.startswith(("/api/", "/v2/", "/v1/models/")) or route in ("/v2", "/metrics")
            ):
                raise ValueError(f"the Vertex AI route {route!r} would hide a modelkeep route")
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'modelkeep.db'}"
