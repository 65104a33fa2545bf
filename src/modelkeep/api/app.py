"""The ASGI application: one FastAPI app over one Service per worker process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
from ._entry import ProtocolEntry
from ._errors import install_error_handlers
from ._limits import BodyLimitMiddleware
from ._observe import ObserveMiddleware
from ._openapi import install_openapi
from .audit import audit_router
from .azureml._routes import azureml_routes
from .capture import capture_router
from .grpc.server import GrpcListener
from .kek import kek_router
from .lifecycle import lifecycle_router
from .management import management_router
from .policy import policy_router
from .sagemaker._routes import plaintext_guard, sagemaker_routes
from .tfserving import protocol_openapi_paths, tfserving_matcher
from .v2.infer import FastInfer
from .v2.routes import infer_openapi_paths, v2_router
from .vertex import vertex_matcher


def create_app(
    service: Service,
    *,
    manage_lifecycle: bool = True,
    drain_on_sigterm: bool = False,
    tls_certfile: Path | None = None,
    serve_grpc: bool = False,
) -> ASGIApp:
    """Build the app. With ``manage_lifecycle`` the app starts and stops the service's poller;
    with ``drain_on_sigterm`` (the server) SIGTERM drains it first (``api/_drain.py``); with
    ``tls_certfile`` it watches when that certificate expires (metric and log warning); with
    ``serve_grpc`` its lifespan also runs the gRPC listener on ``grpc_port`` (``api/grpc/``)."""

    access_log = AccessLog() if service.settings.access_log else None
    grpc_listener: GrpcListener | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            service.start()
        if drain_on_sigterm:
            _drain.install(service, service.settings.shutdown_delay_s)
        watch = None
        if tls_certfile is not None:
            watch = asyncio.create_task(watch_certificate(tls_certfile, service.metrics))
        if grpc_listener is not None:
            await grpc_listener.start()
        try:
            yield
        finally:
            if grpc_listener is not None:
                await grpc_listener.stop(service.settings.shutdown_grace_s)
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
    settings = service.settings

    def protocol_paths() -> dict[str, Any]:
        # The infer routes of every protocol are served by pure-ASGI entries before routing;
        # documented here.
        vertex = protocol_openapi_paths(settings.vertex_predict_route, settings.vertex_health_route)
        return {**infer_openapi_paths(), **vertex}

    install_openapi(app, protocol_paths)
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
    if serve_grpc:
        grpc_listener = GrpcListener(service, service.settings, observed)
    # The other protocols' ways in, each recognising its own paths in pure ASGI; the V2 infer
    # entry goes first, so V2 requests pay nothing for them. The cloud contracts' routes
    # (SageMaker, Azure ML; docs/protocols.md) are a fixed table.
    cloud = {**sagemaker_routes(service), **azureml_routes(service)}
    entry: ASGIApp = ProtocolEntry(
        observed, service, lambda method, path: cloud.get((method, path)), observed
    )
    entry = ProtocolEntry(entry, service, tfserving_matcher(service), observed)
    vertex = vertex_matcher(service)
    if vertex is not None:
        entry = ProtocolEntry(entry, service, vertex, observed)
    entry = FastInfer(entry, service, observer=observed)
    if service.settings.sagemaker_unsafe_plaintext:
        return plaintext_guard(entry, observed)
    return entry


def create_app_from_env() -> ASGIApp:
    """Factory for uvicorn workers: settings come from MODELKEEP_* variables."""
    settings = Settings()  # data_dir comes from MODELKEEP_DATA_DIR
    configure_json_logging()
    if settings.access_log:
        configure_access_log(cache=True)
    if settings.tracing:
        tracing.enable()
    certfile = None if settings.sagemaker_unsafe_plaintext else settings.tls_files[0]
    return create_app(
        Service.open(settings),
        drain_on_sigterm=True,
        tls_certfile=certfile,
        serve_grpc=settings.grpc_port != 0,
    )
