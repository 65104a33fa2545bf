"""Running the HTTPS server: uvicorn with modelkeep's TLS context, one or more workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import uvicorn
from uvicorn.supervisors import Multiprocess

from modelkeep.audit.logs import configure_json_logging
from modelkeep.crypto import server_ssl_context
from modelkeep.crypto.tls import CertificateReloader
from modelkeep.errors import ConfigError
from modelkeep.registry.upload import clear_staging
from modelkeep.service import Service
from modelkeep.settings import Settings

from ._connections import LimitedHttpToolsProtocol
from ._workers import PerWorkerSocket, reserve_port

log = logging.getLogger(__name__)

APP_FACTORY = "modelkeep.api.app:create_app_from_env"
LOOP_FACTORY = "modelkeep.api._connections:new_event_loop"

# On every response, uvicorn's own error answers and the protocol's included (uvicorn adds
# these to each response head it writes: one precomputed list, no work per request here).
# Strict-Transport-Security: clients keep to HTTPS for a year. nosniff: a JSON body is never
# run as a script. no-store: secrets, predictions and audit entries are kept by no cache in
# between. default-src 'none': an API response loads nothing if a browser renders it.
SECURITY_HEADERS = [
    ("Strict-Transport-Security", "max-age=31536000"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'"),
]


def tls_context_factory(config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn calls this in every worker: TLS 1.2 minimum and modelkeep's cipher list.

    A rotated certificate is loaded into this same context without a restart: a check of
    the files' identity every tls_reload_interval_s on the worker's event loop, which is also
    the thread that starts handshakes with the context.
    """
    cert, key = Path(config.ssl_certfile), Path(config.ssl_keyfile)
    context = server_ssl_context(cert, key)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not called by a serving worker: nothing to keep up to date
        return context
    reloader = CertificateReloader(context, cert, key)
    interval = Settings().tls_reload_interval_s

    def check() -> None:
        reloader.check()
        loop.call_later(interval, check)

    loop.call_later(interval, check)
    return context


def _export(settings: Settings) -> None:
    # Workers are separate processes that rebuild Settings from the environment.
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            os.environ[f"MODELKEEP_{name.upper()}"] = text


def prepare(settings: Settings) -> None:
    """Once, before workers start: migrate the schema and remove leftovers of crashed pushes.

    No push can be in flight yet on this host, so its staging area and a local blob
    directory's temporary files go at once, as do unreferenced blobs of a local blob directory
    (it belongs to this one server). A blob store shared with other replicas keeps unreferenced
    blobs younger than the longest allowed push: another replica may be about to record them.
    """
    service = Service.open(settings)
    try:
        registry = service.registry
        removed = 0
        if registry.staging_dir is not None:
            removed += clear_staging(registry.staging_dir)
        sweep = getattr(registry.blobs, "sweep_temporary", None)
        local = sweep is not None
        if sweep is not None:
            removed += sweep(older_than_s=0)
        removed += registry.collect_garbage(grace_s=0 if local else settings.push_max_duration_s)
        if removed:
            log.info("removed %d leftovers of interrupted pushes", removed)
        forgotten = service.store.purge_push_keys(datetime.now(UTC))
        if forgotten:
            log.info("forgot %d expired push idempotency keys", forgotten)
    finally:
        service.stop()


def sagemaker_listener(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """In SageMaker mode, the address SageMaker calls: every interface, on the port it names in
    SAGEMAKER_BIND_TO_PORT (inference pipelines) or else 8080 (the container contract)."""
    if not settings.sagemaker:
        return settings
    value = environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError("SAGEMAKER_BIND_TO_PORT must be a TCP port number")
    return settings.model_copy(update={"host": "0.0.0.0", "port": int(value)})  # noqa: S104


def run_server(settings: Settings) -> None:
    """Serve HTTPS until interrupted (plain HTTP only for an explicit SageMaker listener)."""
    settings = sagemaker_listener(settings, os.environ)
    cert, key = settings.tls_files
    plaintext = settings.sagemaker_unsafe_plaintext
    if not plaintext and (not cert.is_file() or not key.is_file()):
        raise ConfigError("no TLS certificate and key (run `modelkeep init` or mount them)")
    configure_json_logging()
    if plaintext:
        log.warning(
            "serving PLAIN HTTP on %s:%d for SageMaker (MODELKEEP_SAGEMAKER_UNSAFE_PLAINTEXT): "
            "only /ping and /invocations are served; keys are still required",
            settings.host,
            settings.port,
        )
    prepare(settings)
    _export(settings)
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers are processes: their metrics meet in files (prometheus_client multiprocess).
        metrics_dir = tempfile.mkdtemp(prefix="modelkeep-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # uvicorn raises the SIGTERM it handled again once it has drained (see api/_drain.py);
    # for a server that drained, that is a clean exit (status 0), as Kubernetes expects.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    try:
        _serve(settings, cert, key)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: Settings, cert: Path, key: Path) -> None:
    _allow_open_files(settings.max_connections)
    tls: dict[str, Any] = {
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "ssl_context_factory": tls_context_factory,
    }
    if settings.sagemaker_unsafe_plaintext:
        tls = {}
    config = uvicorn.Config(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=LimitedHttpToolsProtocol,
        loop=LOOP_FACTORY,
        ws="none",
        **tls,
        server_header=False,
        headers=SECURITY_HEADERS,
        proxy_headers=False,
        access_log=False,
        log_config=None,  # stdout JSON lines (audit/logs.py), set up before uvicorn starts
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        # A worker answers the supervisor's ping only once it has imported the app; on a busy
        # host that takes more than uvicorn's 5 s, and the worker was killed and restarted
        # without end.
        timeout_worker_healthcheck=30,
    )
    if settings.workers == 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            raise ConfigError("the server did not start (the log above says why)")
        return
    # Each worker listens on a socket of its own (SO_REUSEPORT), so that a client with a few
    # connections is spread over every worker (see _workers.py).
    try:
        reserved, port = reserve_port(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(f"could not listen on {settings.host}:{settings.port}") from exc
    # The gRPC port likewise: held here, so that it is refused early if taken and no other
    # process joins the workers' group while they restart.
    grpc_reserved = None
    if settings.grpc_port:
        try:
            grpc_reserved, _ = reserve_port(settings.host, settings.grpc_port)
        except OSError as exc:
            reserved.close()
            raise ConfigError(
                f"could not listen for gRPC on {settings.host}:{settings.grpc_port}"
            ) from exc
    try:
        log.info(
            "serving https://%s:%d with %d workers, one socket each",
            settings.host,
            port,
            settings.workers,
        )
        sockets = cast("list[socket.socket]", [PerWorkerSocket(settings.host, port)])
        Multiprocess(config, sockets=sockets).run()
    finally:
        reserved.close()
        if grpc_reserved is not None:
            grpc_reserved.close()


def _allow_open_files(max_connections: int) -> None:
    """Raise the soft open-files limit, so max_connections is what refuses connections and not
    a failing accept(); workers inherit it."""
    wanted = max_connections + 256  # sockets, plus the database, blobs, logs and the runtime
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        if raised < wanted:
            log.warning("open files are limited to %d; max_connections may not be reached", hard)
