"""The gRPC listener: a grpc.aio server on the worker's event loop, next to uvicorn.

Each worker process runs one, on ``grpc_port`` of the HTTPS host, always over TLS with the
HTTPS listener's certificate and key. With several workers every one binds the port with
``SO_REUSEPORT`` (the parent reserves it first, ``api/server.py``), so the kernel spreads
connections over the workers as it does for HTTPS. A replaced certificate is picked up for new
connections, checked at most every ``tls_reload_interval_s``.

gRPC core (BoringSSL) negotiates TLS 1.2 or 1.3 with forward-secret AEAD suites only, the same
profile as ``crypto/tls.py`` gives the HTTPS listener. Message size is capped at the REST body
limit (``max_request_bytes``), metadata at the header limit (``max_header_bytes``), the TLS
handshake at ``tls_handshake_timeout_s`` and calls in progress at ``max_connections``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
from grpc import aio

from modelkeep.crypto import server_ssl_context
from modelkeep.errors import ConfigError
from modelkeep.service import Service
from modelkeep.settings import Settings

from .._observe import ObserveMiddleware
from ._servicer import InferenceServicer

log = logging.getLogger(__name__)

__all__ = ["GrpcListener"]

# Concurrent calls on one HTTP/2 connection; more wait for a free stream.
MAX_CONCURRENT_STREAMS = 100


class _CertificateSource:
    """Hands gRPC core the certificate and key, and a new pair once the files change."""

    def __init__(self, certfile: Path, keyfile: Path, interval_s: float) -> None:
        self._files = (certfile, keyfile)
        self._interval = interval_s
        self._checked = time.monotonic()
        self._identity = self._stat()
        self.initial = self._load()

    def _stat(self) -> tuple[tuple[int, int, int, int], ...] | None:
        try:
            stats = [os.stat(path) for path in self._files]
        except OSError:
            return None  # between the two halves of a swap; look again next time
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        certfile, keyfile = self._files
        try:
            chain, key = certfile.read_bytes(), keyfile.read_bytes()
        except OSError as exc:
            raise ConfigError("the TLS certificate or key cannot be read") from exc
        # The pair must load together (a key that does not match, half a write): gRPC core
        # would only find out at the next handshake.
        server_ssl_context(certfile, keyfile)
        return grpc.ssl_server_certificate_configuration([(key, chain)])

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core before each handshake: cheap unless it is time to look.
        now = time.monotonic()
        if now - self._checked < self._interval:
            return None
        self._checked = now
        current = self._stat()
        if current is None or current == self._identity:
            return None
        try:
            config = self._load()
        except ConfigError:
            log.warning("the replaced TLS certificate or key cannot be loaded; keeping the old")
            return None
        self._identity = current
        log.info("TLS certificate reloaded for gRPC")
        return config


class GrpcListener:
    """The Open Inference Protocol over gRPC for one worker; ``start`` and ``stop`` it."""

    def __init__(
        self,
        service: Service,
        settings: Settings,
        observer: ObserveMiddleware | None = None,
    ) -> None:
        self.settings = settings
        self.servicer = InferenceServicer(service, observer)
        self.server: aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.settings
        certfile, keyfile = settings.tls_files
        source = _CertificateSource(certfile, keyfile, settings.tls_reload_interval_s)
        # gRPC calls the fetcher before each handshake; None keeps the current pair (the
        # stubs leave None out of the fetcher's type, gRPC's documentation does not).
        fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", source)
        credentials = grpc.dynamic_ssl_server_credentials(
            source.initial, fetcher, require_client_authentication=False
        )
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_metadata_size", settings.max_header_bytes),
                ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
                # A client must finish the TLS handshake in the time HTTPS allows (gRPC's
                # default is 120 s).
                ("grpc.server_handshake_timeout_ms", int(settings.tls_handshake_timeout_s * 1000)),
                # Several workers share the port (each its own socket); one alone holds it.
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ],
            maximum_concurrent_rpcs=settings.max_connections,
        )
        server.add_generic_rpc_handlers((self.servicer.generic_handler(),))
        address = _address(settings.host, settings.grpc_port)
        try:
            self.port = server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"could not listen for gRPC on {address}")
        await server.start()
        self.server = server
        log.info("serving gRPC (TLS) on %s", address)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls; those in flight get ``grace_s`` to finish."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
