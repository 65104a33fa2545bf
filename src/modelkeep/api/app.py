"""The ASGI application: one FastAPI app over one Service per worker process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp

from modelkeep import __version__
from modelkeep.audit import tracing
from modelkeep.audit.access import AccessLog, configure_access_log
from modelkeep.audit.logs import configure_json_logging
from modelkeep.service import Service
from modelkeep.settings import Settings

from . import _drain
from ._auth import AuthenticationMiddleware, principal_of
from ._certwatch import watch_certificate
from ._errors import install_error_handlers
from ._fast import FastInfer
from ._infer import InferRunner
from ._limits import BodyLimitMiddleware
from ._observe import ObserveMiddleware
from .audit import audit_router
from .capture import capture_router
from .kek import kek_router
from .lifecycle import lifecycle_router
from .management import management_router
from .policy import policy_router
from .v2 import v2_router


def create_app(
    service: Service,
    *,
    manage_lifecycle: bool = True,
    drain_on_sigterm: bool = False,
    tls_certfile: Path | None = None,
) -> ASGIApp:
    """Build the app. With ``manage_lifecycle`` the app starts and stops the service's poller;
    with ``drain_on_sigterm`` (the server) SIGTERM drains it first (``api/_drain.py``); with
    ``tls_certfile`` it watches when that certificate expires (metric and log warning)."""

    access_log = AccessLog() if service.settings.access_log else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            service.start()
        if drain_on_sigterm:
            _drain.install(service, service.settings.shutdown_delay_s)
        watch = None
        if tls_certfile is not None:
            watch = asyncio.create_task(watch_certificate(tls_certfile, service.metrics))
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            if access_log is not None:
                access_log.flush()
            if manage_lifecycle:
                service.stop()

    app = FastAPI(
        title="modelkeep",
        version=__version__,
        description="A secure model server. Every route but /v2/health/* needs an API key.",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(v2_router(service))
    app.include_router(management_router(service))
    app.include_router(policy_router(service))
    app.include_router(audit_router(service))
    app.include_router(capture_router(service))
    app.include_router(kek_router(service))
    app.include_router(lifecycle_router(service))
    # The last added runs first: authentication, then the body limit, so a caller without
    # a valid key never gets a byte of its body read.
    app.add_middleware(
        BodyLimitMiddleware,
        max_request_bytes=service.settings.max_request_bytes,
        max_upload_bytes=service.settings.max_upload_bytes,
    )
    app.add_middleware(AuthenticationMiddleware, service=service)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics, for auditor and admin keys."""
        body, content_type = await run_in_threadpool(
            service.metrics_exposition, principal_of(request)
        )
        return Response(body, media_type=content_type)

    observed = ObserveMiddleware(app, service.metrics, access_log=access_log)
    return FastInfer(observed, service, InferRunner(service), observer=observed)


def create_app_from_env() -> ASGIApp:
    """Factory for uvicorn workers: settings come from MODELKEEP_* variables."""
    settings = Settings()  # data_dir comes from MODELKEEP_DATA_DIR
    configure_json_logging()
    if settings.access_log:
        configure_access_log(cache=True)
    if settings.tracing:
        tracing.enable()
    return create_app(
        Service.open(settings), drain_on_sigterm=True, tls_certfile=settings.tls_files[0]
    )
