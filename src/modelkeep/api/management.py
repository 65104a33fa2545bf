"""Management REST API under /api/v1 (see docs/api.md). It translates; the service decides."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.auth import ROLES, KeyRecord
from modelkeep.errors import InvalidInput
from modelkeep.registry.lineage import parse_lineage_header
from modelkeep.registry.records import ModelRecord, VersionRecord
from modelkeep.service import Service

from ._auth import principal_of
from ._body import stream_body
from ._change_out import ChangeOut, accepted
from ._openapi import NAME_SCHEMA, DateTime, LabelName, ModelName, WholeNumber, errors


class TensorOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class SignatureOut(BaseModel):
    inputs: list[TensorOut]
    outputs: list[TensorOut]


class VersionOut(BaseModel):
    model: str
    version: int
    sha256: str
    size: int
    format: str
    signature: SignatureOut
    uploaded_by: str
    created_at: datetime
    layout: str = Field(description="`file`, or `directory` for a pushed directory")
    file_name: str = Field(description="The served file, as the signature's manifest names it")
    signer: str | None = Field(description="Fingerprint of the publisher key that signed it")
    lineage: dict[str, Any] | None = Field(
        default=None, description="What the publisher declared at push (Modelkeep-Lineage)"
    )
    deleted_at: datetime | None = Field(
        default=None, description="When it was crypto-shredded; a deleted version is never served"
    )
    deleted_by: str | None = Field(default=None, description="Who deleted it")
    evaluation: dict[str, Any] | None = Field(
        default=None,
        description="Metrics on the model's evaluation set and the gates' verdict (lifecycle)",
    )


class VersionList(BaseModel):
    versions: list[VersionOut]


class ModelOut(BaseModel):
    name: str
    description: str
    created_by: str
    created_at: datetime
    latest_version: int | None
    labels: dict[str, int]
    require_signature: bool = Field(
        description="False means unsigned pushes are accepted (unsafe; set by an admin)"
    )
    publishers: list[str] = Field(description="Fingerprints of the trusted publisher keys")


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(default=None, max_length=1000)
    require_signature: bool | None = Field(default=None, strict=True)


class PublisherIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public_key: str = Field(max_length=10_000, description="PEM EC P-256 or P-384 public key")


class PublisherOut(BaseModel):
    model: str
    fingerprint: str
    public_key: str


class PublisherList(BaseModel):
    publishers: list[PublisherOut]


class ModelList(BaseModel):
    models: list[ModelOut]


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: WholeNumber = Field(ge=1, le=2**31 - 1)


class LabelOut(BaseModel):
    model: str
    label: str
    version: int


class KeyIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        # Admin keys are never limited to models (the service refuses it with 400).
        json_schema_extra={
            "if": {"properties": {"role": {"const": "admin"}}, "required": ["role"]},
            "then": {"properties": {"models": {"type": "null"}}},
        },
    )
    role: str = Field(max_length=32, json_schema_extra={"enum": list(ROLES)})
    models: list[Annotated[str, Field(json_schema_extra=NAME_SCHEMA)]] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="The models the key may use; null (the default) for every model",
    )
    expires_at: DateTime | None = Field(
        default=None, description="A time in the future, with a time zone; null never expires"
    )
    description: str = Field(default="", max_length=1000)


class KeyOut(BaseModel):
    id: str
    role: str
    models: list[str] | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class CreatedKeyOut(KeyOut):
    key: str = Field(description="The API key. It is shown only once.")


class KeyList(BaseModel):
    keys: list[KeyOut]


def version_out(v: VersionRecord) -> VersionOut:
    sig = v.signature.to_json()
    return VersionOut(
        model=v.model,
        version=v.number,
        sha256=v.sha256,
        size=v.size,
        format=v.format,
        signature=SignatureOut.model_validate(sig),
        uploaded_by=v.uploaded_by,
        created_at=v.created_at,
        layout=v.layout,
        file_name=v.file_name,
        signer=v.signer,
        lineage=None if v.lineage is None else json.loads(v.lineage),
        deleted_at=v.deleted_at,
        deleted_by=v.deleted_by,
    )


def model_out(m: ModelRecord) -> ModelOut:
    return ModelOut(
        name=m.name,
        description=m.description,
        created_by=m.created_by,
        created_at=m.created_at,
        latest_version=m.latest_version,
        labels=dict(m.labels),
        require_signature=m.require_signature,
        publishers=sorted(m.publishers),
    )


def key_out(k: KeyRecord) -> dict[str, Any]:
    return {
        "id": k.key_id,
        "role": k.role,
        "models": None if k.models is None else sorted(k.models),
        "description": k.description,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
    }


SIGNATURE_HEADER = "modelkeep-signature"
IDEMPOTENCY_HEADER = "idempotency-key"
LINEAGE_HEADER = "modelkeep-lineage"
# A key-signed bundle for one file is a few KiB; directories with many files grow it.
MAX_BUNDLE_HEADER = 64 * 1024
# Room the request line and the other headers of a push need beside the signature header.
_HEAD_ROOM = 2 * 1024


def bundle_header_limit(max_header_bytes: int) -> int:
    """The longest Modelkeep-Signature header a push can carry: the whole request head must
    also fit in ``max_header_bytes`` (the connection layer answers 431 past it)."""
    return max(0, min(MAX_BUNDLE_HEADER, max_header_bytes - _HEAD_ROOM))


def _bundle(value: str | None, limit: int) -> bytes | None:
    if value is None:
        return None
    if len(value) > limit:
        raise InvalidInput("the Modelkeep-Signature header is too large")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("the Modelkeep-Signature header is not valid base64") from exc


def management_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["management"])
    max_upload = service.settings.max_upload_bytes
    bundle_limit = bundle_header_limit(service.settings.max_header_bytes)

    @router.post(
        "/models/{model}/versions",
        status_code=201,
        response_model=VersionOut,
        responses=errors(400, 403, 404, 409, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def push(
        request: Request,
        model: ModelName,
        # Defaults, not Annotated: the signature's limit is this server's, known only here.
        signature: str | None = Header(
            default=None,
            alias=SIGNATURE_HEADER,
            description=(
                "The signature bundle (model-signing), base64. Its length is bounded by the"
                " server's request head limit (MODELKEEP_MAX_HEADER_BYTES)"
            ),
            json_schema_extra={"maxLength": bundle_limit, "format": "byte"},
        ),
        idempotency_key: str | None = Header(
            default=None,
            alias=IDEMPOTENCY_HEADER,
            description="Makes a retried push answer with the version the first one made",
            json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._:+=/-]{7,127}$"},
        ),
        lineage_header: str | None = Header(
            default=None,
            alias=LINEAGE_HEADER,
            description=(
                "Declared lineage (training data, code revision, frameworks, parent version,"
                " tags, metrics), base64 JSON of at most 8 KiB; see docs/lifecycle.md"
            ),
        ),
        filename: str = Query(
            default="model",
            max_length=255,
            json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$"},
        ),
        layout: Literal["file", "directory"] = "file",
    ) -> VersionOut:
        """Push a new version: the raw model file (or a tar of a directory) as the body,
        streamed and size-capped; the signature bundle, base64, in the Modelkeep-Signature
        header; declared lineage (training data, code revision, frameworks, parent version,
        tags, metrics; see docs/lifecycle.md), base64 JSON of at most 8 KiB, in the
        Modelkeep-Lineage header. With an Idempotency-Key header, a retry of the same push
        (same key, same request) answers with the version the first attempt made instead of
        making another; the same key with a different request is refused with 409."""
        principal = principal_of(request)
        # Authorize before reading a possibly huge body.
        service.authorize_push(principal, model)
        bundle = _bundle(signature, bundle_limit)
        lineage = None if lineage_header is None else parse_lineage_header(lineage_header)
        # The body is sealed into an unnamed staging file as it arrives, never held whole.
        upload = service.registry.new_upload()
        try:
            await stream_body(
                request.receive,
                request.headers.get("content-length"),
                max_upload,
                upload.write_all,
            )
            await run_in_threadpool(upload.finish)
            record = await run_in_threadpool(
                lambda: service.push(
                    principal,
                    model,
                    upload,
                    file_name=filename,
                    is_directory=layout == "directory",
                    bundle=bundle,
                    idempotency_key=idempotency_key,
                    lineage=lineage,
                )
            )
        finally:
            upload.close()
        return version_out(record)

    @router.put(
        "/models/{model}",
        response_model=ModelOut,
        responses={201: {"model": ModelOut, "description": "Created"}, **errors(400, 403, 409)},
    )
    async def put_model(request: Request, model: ModelName, body: ModelIn) -> Response:
        """Create a model, or change its description or signature requirement (admin)."""
        record, created = await run_in_threadpool(
            lambda: service.put_model(
                principal_of(request),
                model,
                description=body.description,
                require_signature=body.require_signature,
            )
        )
        return JSONResponse(
            model_out(record).model_dump(mode="json"), status_code=201 if created else 200
        )

    @router.get(
        "/models/{model}/publishers", response_model=PublisherList, responses=errors(403, 404)
    )
    async def list_publishers(request: Request, model: ModelName) -> PublisherList:
        record = service.get_model(principal_of(request), model)
        return PublisherList(
            publishers=[
                PublisherOut(model=model, fingerprint=fp, public_key=pem)
                for fp, pem in sorted(record.publishers.items())
            ]
        )

    @router.post(
        "/models/{model}/publishers",
        status_code=201,
        response_model=PublisherOut,
        responses=errors(400, 403, 404, 409),
    )
    async def add_publisher(request: Request, model: ModelName, body: PublisherIn) -> PublisherOut:
        """Trust a publisher key for this model (admin)."""
        key = await run_in_threadpool(
            service.add_publisher, principal_of(request), model, body.public_key
        )
        return PublisherOut(model=model, fingerprint=key.fingerprint, public_key=key.pem)

    @router.delete(
        "/models/{model}/publishers/{fingerprint}",
        status_code=204,
        responses=errors(403, 404),
    )
    async def remove_publisher(request: Request, model: ModelName, fingerprint: str) -> Response:
        await run_in_threadpool(service.remove_publisher, principal_of(request), model, fingerprint)
        return Response(status_code=204)

    @router.get("/models", response_model=ModelList, responses=errors(403))
    async def list_models(request: Request) -> ModelList:
        models = service.list_models(principal_of(request))
        return ModelList(models=[model_out(m) for m in models])

    @router.get("/models/{model}", response_model=ModelOut, responses=errors(403, 404))
    async def get_model(request: Request, model: ModelName) -> ModelOut:
        return model_out(service.get_model(principal_of(request), model))

    @router.get("/models/{model}/versions", response_model=VersionList, responses=errors(403, 404))
    async def list_versions(request: Request, model: ModelName) -> VersionList:
        """Every version, oldest first, with its evaluation; crypto-shredded ones show
        ``deleted_at``."""
        principal = principal_of(request)
        found = service.all_versions(principal, model)
        evaluations = await run_in_threadpool(service.evaluations_of, principal, model)
        return VersionList(
            versions=[
                version_out(v).model_copy(update={"evaluation": evaluations.get(v.number)})
                for v in found
            ]
        )

    @router.get(
        "/models/{model}/versions/{version}", response_model=VersionOut, responses=errors(403, 404)
    )
    async def get_version(request: Request, model: ModelName, version: str) -> VersionOut:
        """One version's metadata and evaluation, also of a deleted one (``deleted_at`` set)."""
        principal = principal_of(request)
        found = service.version_record(principal, model, version)
        evaluations = await run_in_threadpool(service.evaluations_of, principal, model)
        return version_out(found).model_copy(update={"evaluation": evaluations.get(found.number)})

    @router.put(
        "/models/{model}/labels/{label}",
        response_model=LabelOut,
        responses={
            **errors(400, 403, 404, 409),
            202: {"model": ChangeOut, "description": "Protected: a change request was opened"},
        },
    )
    async def set_label(
        request: Request, model: ModelName, label: LabelName, body: LabelIn
    ) -> Response:
        """Point a label at a version. A protected label is not moved: a change request is
        opened (202) and the move happens when enough other keys approve (lifecycle)."""
        principal = principal_of(request)
        change = await run_in_threadpool(service.set_label, principal, model, label, body.version)
        if change is not None:
            return accepted(change)
        out = LabelOut(model=model, label=label, version=body.version)
        return JSONResponse(out.model_dump(mode="json"))

    @router.delete(
        "/models/{model}/labels/{label}", status_code=204, responses=errors(400, 403, 404, 409)
    )
    async def delete_label(request: Request, model: ModelName, label: LabelName) -> Response:
        await run_in_threadpool(service.delete_label, principal_of(request), model, label)
        return Response(status_code=204)

    @router.post(
        "/keys", status_code=201, response_model=CreatedKeyOut, responses=errors(400, 403, 409)
    )
    async def create_key(request: Request, body: KeyIn) -> dict[str, Any]:
        created = await run_in_threadpool(
            lambda: service.create_key(
                principal_of(request),
                role=body.role,
                models=body.models,
                expires_at=body.expires_at,
                description=body.description,
            )
        )
        return {**key_out(created.record), "key": created.token}

    @router.get("/keys", response_model=KeyList, responses=errors(403))
    async def list_keys(request: Request) -> dict[str, Any]:
        return {"keys": [key_out(k) for k in service.list_keys(principal_of(request))]}

    @router.delete("/keys/{key_id}", response_model=KeyOut, responses=errors(403, 404))
    async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.revoke_key, principal_of(request), key_id)
        return key_out(record)

    @router.get("/whoami", response_model=KeyOut, responses=errors(404))
    async def whoami(request: Request) -> dict[str, Any]:
        return key_out(service.whoami(principal_of(request)))

    return router
