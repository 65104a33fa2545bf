"""The GRPCInferenceService RPCs: each one authenticated and checked like its V2 REST twin.

Every RPC but ServerLive and ServerReady (public, like ``/v2/health/*``) starts with
authentication of the ``authorization`` metadata (``Bearer mk_...``), audited when refused, and
then asks the service, which authorizes with Cedar before it looks anything up; ModelInfer goes
through the data plane (limits, queue, runtime, detectors, hardening, capture). Each call is
counted in the metrics and written to the access log like an HTTP request, under the route
``/inference.GRPCInferenceService/<RPC>``, with the HTTP status its outcome maps to.

Labels: a call names a modelkeep label (``modelkeep label set``) instead of a version with the
``modelkeep-label`` metadata key, on ModelInfer, ModelReady and ModelMetadata, or on ModelInfer
with the request parameter ``label`` (a string). ``model_version`` stays the version number;
naming both a version and a label is refused (INVALID_ARGUMENT), as is a label named twice
differently.

Errors: the modelkeep error tree maps to gRPC status codes in ``STATUS_BY_CODE``; a message is
sent only when the error's message is written to be shown (as for REST), and anything else is
INTERNAL "internal error" with the details in the server log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from modelkeep import __version__
from modelkeep.audit.access import bind_request, input_digest, new_request_id, reset_request
from modelkeep.auth import Principal
from modelkeep.errors import InvalidInput, ModelkeepError
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import InferCall, Observed, Service

from .._auth import authenticate_request
from .._errors import STATUS_BY_CODE as HTTP_STATUS_BY_CODE
from .._observe import ObserveMiddleware
from . import grpc_predict_v2_pb2 as pb
from ._codec import (
    GrpcInferRequest,
    decode_infer_request,
    encode_infer_response,
    model_metadata_response,
    parse_infer_request,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# Where a call names a modelkeep label: this metadata key (every RPC that names a version) or,
# on ModelInfer, this request parameter.
LABEL_METADATA = "modelkeep-label"
LABEL_PARAMETER = "label"
Context = aio.ServicerContext[Any, Any]

# The one map from modelkeep error codes to gRPC status codes.
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.ABORTED,
    # A tensor or body over its limit is the request's fault and retrying will not help.
    "too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "model_refused": grpc.StatusCode.FAILED_PRECONDITION,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "integrity": grpc.StatusCode.UNAVAILABLE,
    "config": grpc.StatusCode.INTERNAL,
    "internal": grpc.StatusCode.INTERNAL,
}


@dataclass(slots=True)
class _Call:
    # What one RPC learns for its access line.
    rpc: str
    peer: str | None
    model: str | None = None
    version: str | int | None = None
    principal: Principal | None = None
    label: str | None = None  # the modelkeep-label metadata, read with the key
    rows: int | None = None
    digest: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    trailers: list[tuple[str, str]] = field(default_factory=list)


class InferenceServicer:
    """Answers the Open Inference Protocol RPCs over ``service`` (one per worker)."""

    def __init__(self, service: Service, observer: ObserveMiddleware | None = None) -> None:
        self.service = service
        self.dataplane = service.dataplane
        self.observer = observer

    # -- the RPCs ------------------------------------------------------------------------

    async def server_live(
        self, _request: pb.ServerLiveRequest, _call: _Call, _context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, _request: pb.ServerReadyRequest, _call: _Call, _context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def server_metadata(
        self, _request: pb.ServerMetadataRequest, call: _Call, context: Context
    ) -> pb.ServerMetadataResponse:
        principal = await self._authenticate(call, context)
        metadata = self.dataplane.server_metadata(principal)
        return pb.ServerMetadataResponse(
            name=metadata.get("name", "modelkeep"),
            version=metadata.get("version", __version__),
            extensions=metadata.get("extensions", []),
        )

    async def model_ready(
        self, request: pb.ModelReadyRequest, call: _Call, context: Context
    ) -> pb.ModelReadyResponse:
        call.model, call.version = request.name, request.version or None
        principal = await self._authenticate(call, context)
        _named(request.name)
        ready = self.dataplane.model_ready(
            principal, request.name, request.version or None, call.label
        )
        return pb.ModelReadyResponse(ready=ready)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, call: _Call, context: Context
    ) -> pb.ModelMetadataResponse:
        call.model, call.version = request.name, request.version or None
        principal = await self._authenticate(call, context)
        _named(request.name)
        metadata = self.dataplane.model_metadata(
            principal, request.name, request.version or None, call.label
        )
        return model_metadata_response(metadata)

    async def model_infer(
        self, body: bytes, call: _Call, context: Context
    ) -> pb.ModelInferResponse:
        # 1. Authentication, before a byte of the message is parsed.
        principal = await self._authenticate(call, context)
        call.bytes_in, call.digest = len(body), input_digest(body)
        # 2. The message names the model; its tensors are checked only once the caller may
        # use that model (the decoder runs inside the data plane, after authorization).
        message = parse_infer_request(body)
        call.model, call.version = message.model_name, message.model_version or None
        _named(message.model_name)
        label = _infer_label(message, call.label)

        def decode(signature: ModelSignature, max_elements: int) -> GrpcInferRequest:
            return decode_infer_request(message, signature, max_elements)

        observed = Observed()
        try:
            result = await self.dataplane.infer(
                principal,
                message.model_name,
                InferCall(body, decode, "v2-grpc", observed),
                message.model_version or None,
                label,
            )
        finally:
            # Known once decoded, also when admission then refused the call.
            if observed.version is not None:
                call.version = observed.version
            call.rows = observed.rows
        if result.budget is not None:
            call.trailers.append(("x-budget-limit", str(result.budget.limit)))
            call.trailers.append(("x-budget-remaining", str(result.budget.remaining)))
            if result.budget.reset is not None:
                call.trailers.append(("x-budget-reset", result.budget.reset.isoformat()))
        return encode_infer_response(
            model_name=result.model,
            model_version=str(result.version),
            request=result.request,
            outputs=result.outputs,
        )

    async def repository_unsupported(self, _request: Any, call: _Call, context: Context) -> Any:
        await self._authenticate(call, context)
        raise _Refusal(
            grpc.StatusCode.UNIMPLEMENTED,
            "model versions come from signed pushes (modelkeep push), not a repository",
            501,
        )

    # -- plumbing ------------------------------------------------------------------------

    async def _authenticate(self, call: _Call, context: Context) -> Principal:
        authorization = None
        labels: list[str | bytes] = []
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                if authorization is None:
                    authorization = value if isinstance(value, str) else None
            elif key == LABEL_METADATA:
                labels.append(value)
        # A refusal is audited durably before it is raised.
        principal = await authenticate_request(self.service, authorization, call.peer)
        call.principal = principal
        # Only a known caller hears what is wrong with the rest of its metadata.
        if labels:
            if len(labels) > 1 or not isinstance(labels[0], str):
                raise InvalidInput(f"name at most one label, as text, in {LABEL_METADATA}")
            call.label = labels[0]
        return principal

    def handler(
        self,
        rpc: str,
        method: Callable[[Any, _Call, Context], Awaitable[Any]],
        request_type: Any,
        response_type: Any,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A unary handler for ``method`` with errors mapped, observation and request id.

        ``request_type`` None hands ``method`` the message bytes as received.
        """

        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            request_id = new_request_id()
            token = bind_request(request_id)
            call = _Call(rpc=rpc, peer=_peer_host(context.peer()))
            status, refusal = 200, None
            try:
                response = await method(request, call, context)
                call.bytes_out = response.ByteSize()
                return response
            except _Refusal as exc:
                refusal = exc
            except ModelkeepError as exc:
                refusal = _refusal(exc)
            except Exception:
                log.exception("unhandled error in %s", rpc)
                refusal = _Refusal(grpc.StatusCode.INTERNAL, "internal error", 500)
            finally:
                if refusal is not None:
                    status = refusal.http_status
                self._observe(call, request_id, status, started)
                reset_request(token)
            context.set_trailing_metadata([("x-request-id", request_id), *refusal.trailers])
            await context.abort(refusal.code, refusal.message)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=None if request_type is None else request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    def _observe(self, call: _Call, request_id: str, status: int, started: float) -> None:
        if self.observer is None:
            return
        try:
            self.observer.record(
                request_id=request_id,
                method="GRPC",
                route=f"/{SERVICE_NAME}/{call.rpc}",
                model=call.model,
                version=call.version,
                status=status,
                started=started,
                principal=None if call.principal is None else call.principal.key_id,
                rows=call.rows,
                input_digest=call.digest,
                bytes_in=call.bytes_in,
                bytes_out=call.bytes_out,
                client=call.peer,
            )
        except Exception:
            log.exception("request observation failed")

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of GRPCInferenceService, for ``server.add_generic_rpc_handlers``."""
        unsupported = self.repository_unsupported
        handlers = {
            "ServerLive": self.handler(
                "ServerLive", self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse
            ),
            "ServerReady": self.handler(
                "ServerReady", self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse
            ),
            "ModelReady": self.handler(
                "ModelReady", self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse
            ),
            "ServerMetadata": self.handler(
                "ServerMetadata",
                self.server_metadata,
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ModelMetadata": self.handler(
                "ModelMetadata",
                self.model_metadata,
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            # The message as bytes: its digest and size are taken as received, and it is
            # parsed only after the caller is authenticated.
            "ModelInfer": self.handler("ModelInfer", self.model_infer, None, pb.ModelInferResponse),
            "RepositoryModelLoad": self.handler(
                "RepositoryModelLoad",
                unsupported,
                pb.RepositoryModelLoadRequest,
                pb.RepositoryModelLoadResponse,
            ),
            "RepositoryModelUnload": self.handler(
                "RepositoryModelUnload",
                unsupported,
                pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _Refusal(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        http_status: int,
        trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.trailers = trailers


def _refusal(exc: ModelkeepError) -> _Refusal:
    """The status, shown message and trailers of a modelkeep error (the REST rule for text)."""
    http_status = HTTP_STATUS_BY_CODE.get(exc.code, 500)
    code = STATUS_BY_CODE.get(exc.code, grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    shown = http_status < 500 or exc.code in ("unavailable", "integrity")
    trailers: tuple[tuple[str, str], ...] = ()
    if exc.retry_after is not None:
        trailers = (("retry-after", str(max(1, int(-(-exc.retry_after // 1))))),)
    return _Refusal(code, exc.message if shown else "internal error", http_status, trailers)


def _infer_label(message: pb.ModelInferRequest, from_metadata: str | None) -> str | None:
    """The label a ModelInfer call names, in its metadata or its ``label`` parameter."""
    if LABEL_PARAMETER not in message.parameters:
        return from_metadata
    parameter = message.parameters[LABEL_PARAMETER]
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"the request parameter '{LABEL_PARAMETER}' must be a string")
    label = parameter.string_param
    if from_metadata is not None and from_metadata != label:
        raise InvalidInput(
            f"the request names two labels (parameter '{LABEL_PARAMETER}' and {LABEL_METADATA})"
        )
    return label


def _named(model: str) -> None:
    # proto3 cannot tell an absent name from an empty one; either is the caller's mistake.
    if not model:
        raise InvalidInput("the request names no model")


def _peer_host(peer: str | None) -> str | None:
    """The client address of a gRPC peer string (``ipv4:10.0.0.7:5123``, ``ipv6:[::1]:5123``)."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None
