"""Running the HTTPS server: uvicorn with modelkeep's TLS context, one or more workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from modelkeep.audit.logs import configure_json_logging
from modelkeep.crypto import server_ssl_context
from modelkeep.crypto.tls import CertificateReloader
from modelkeep.errors import ConfigError
from modelkeep.service import Service
from modelkeep.settings import Settings

from ._transport import CoalescingHttpToolsProtocol

log = logging.getLogger(__name__)

APP_FACTORY = "modelkeep.api.app:create_app_from_env"


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
    """Once, before workers start: migrate the schema and remove leftovers of crashed pushes."""
    service = Service.open(settings)
    try:
        removed = service.registry.collect_garbage()
        blobs = service.registry.blobs
        sweep = getattr(blobs, "sweep_temporary", None)
        if sweep is not None:
            removed += sweep(older_than_s=3600)
        if removed:
            log.info("removed %d unreferenced blob files", removed)
    finally:
        service.stop()


def run_server(settings: Settings) -> None:
    """Serve HTTPS until interrupted."""
    cert, key = settings.tls_files
    if not cert.is_file() or not key.is_file():
        raise ConfigError("no TLS certificate and key (run `modelkeep init` or mount them)")
    configure_json_logging()
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
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=CoalescingHttpToolsProtocol,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        ssl_context_factory=tls_context_factory,
        server_header=False,
        proxy_headers=False,
        access_log=False,
        log_config=None,  # stdout JSON lines (audit/logs.py), set up before uvicorn starts
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
