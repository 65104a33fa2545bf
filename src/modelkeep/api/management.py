"""Management REST API under /api/v1 (see docs/api.md). It translates; the service decides."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from modelkeep.auth import KeyRecord
from modelkeep.errors import InvalidInput
from modelkeep.registry.records import ModelRecord, VersionRecord
from modelkeep.service import Service

from ._auth import principal_of
from ._body import stream_body
from .lifecycle import ChangeOut, accepted, errors


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
    require_signature: bool | None = None


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
    version: int = Field(ge=1, le=2**31 - 1, strict=True)


class LabelOut(BaseModel):
    model: str
    label: str
    version: int


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(max_length=32)
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: datetime | None = None
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
# A key-signed bundle for one file is a few KiB; directories with many files grow it.
MAX_BUNDLE_HEADER = 64 * 1024


def _bundle(request: Request) -> bytes | None:
    value = request.headers.get(SIGNATURE_HEADER)
    if value is None:
        return None
    if len(value) > MAX_BUNDLE_HEADER:
        raise InvalidInput("the Modelkeep-Signature header is too large")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("the Modelkeep-Signature header is not valid base64") from exc


def management_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["management"])
    max_upload = service.settings.max_upload_bytes

    @router.post(
        "/models/{model}/versions",
        status_code=201,
        response_model=VersionOut,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def push(
        request: Request,
        model: str,
        filename: str = Query(default="model", max_length=255),
        layout: Literal["file", "directory"] = "file",
    ) -> VersionOut:
        """Push a new version: the raw model file (or a tar of a directory) as the body,
        streamed and size-capped; the signature bundle, base64, in the Modelkeep-Signature
        header. With an Idempotency-Key header, a retry of the same push (same key, same
        request) answers with the version the first attempt made instead of making another;
        the same key with a different request is refused with 409."""
        principal = principal_of(request)
        # Authorize before reading a possibly huge body.
        service.authorize_push(principal, model)
        bundle = _bundle(request)
        idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
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
                )
            )
        finally:
            upload.close()
        return version_out(record)

    @router.put("/models/{model}", response_model=ModelOut)
    async def put_model(request: Request, model: str, body: ModelIn) -> Response:
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

    @router.get("/models/{model}/publishers", response_model=PublisherList)
    async def list_publishers(request: Request, model: str) -> PublisherList:
        record = service.get_model(principal_of(request), model)
        return PublisherList(
            publishers=[
                PublisherOut(model=model, fingerprint=fp, public_key=pem)
                for fp, pem in sorted(record.publishers.items())
            ]
        )

    @router.post("/models/{model}/publishers", status_code=201, response_model=PublisherOut)
    async def add_publisher(request: Request, model: str, body: PublisherIn) -> PublisherOut:
        """Trust a publisher key for this model (admin)."""
        key = await run_in_threadpool(
            service.add_publisher, principal_of(request), model, body.public_key
        )
        return PublisherOut(model=model, fingerprint=key.fingerprint, public_key=key.pem)

    @router.delete("/models/{model}/publishers/{fingerprint}", status_code=204)
    async def remove_publisher(request: Request, model: str, fingerprint: str) -> Response:
        await run_in_threadpool(service.remove_publisher, principal_of(request), model, fingerprint)
        return Response(status_code=204)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        models = service.list_models(principal_of(request))
        return ModelList(models=[model_out(m) for m in models])

    @router.get("/models/{model}", response_model=ModelOut)
    async def get_model(request: Request, model: str) -> ModelOut:
        return model_out(service.get_model(principal_of(request), model))

    @router.get("/models/{model}/versions", response_model=VersionList)
    async def list_versions(request: Request, model: str) -> VersionList:
        principal = principal_of(request)
        record = service.get_model(principal, model)
        evaluations = await run_in_threadpool(service.evaluations_of, principal, model)
        return VersionList(
            versions=[
                version_out(v).model_copy(update={"evaluation": evaluations.get(n)})
                for n, v in sorted(record.versions.items())
            ]
        )

    @router.get("/models/{model}/versions/{version}", response_model=VersionOut)
    async def get_version(request: Request, model: str, version: str) -> VersionOut:
        principal = principal_of(request)
        found = service.get_version(principal, model, version)
        evaluations = await run_in_threadpool(service.evaluations_of, principal, model)
        return version_out(found).model_copy(update={"evaluation": evaluations.get(found.number)})

    @router.put(
        "/models/{model}/labels/{label}",
        response_model=LabelOut,
        responses={
            **errors(400, 404, 409),
            202: {"model": ChangeOut, "description": "Protected: a change request was opened"},
        },
    )
    async def set_label(request: Request, model: str, label: str, body: LabelIn) -> Response:
        """Point a label at a version. A protected label is not moved: a change request is
        opened (202) and the move happens when enough other keys approve (lifecycle)."""
        principal = principal_of(request)
        change = await run_in_threadpool(service.set_label, principal, model, label, body.version)
        if change is not None:
            return accepted(change)
        out = LabelOut(model=model, label=label, version=body.version)
        return JSONResponse(out.model_dump(mode="json"))

    @router.delete(
        "/models/{model}/labels/{label}", status_code=204, responses=errors(400, 404, 409)
    )
    async def delete_label(request: Request, model: str, label: str) -> Response:
        await run_in_threadpool(service.delete_label, principal_of(request), model, label)
        return Response(status_code=204)

    @router.post("/keys", status_code=201, response_model=CreatedKeyOut)
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

    @router.get("/keys", response_model=KeyList)
    async def list_keys(request: Request) -> dict[str, Any]:
        return {"keys": [key_out(k) for k in service.list_keys(principal_of(request))]}

    @router.delete("/keys/{key_id}", response_model=KeyOut)
    async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.revoke_key, principal_of(request), key_id)
        return key_out(record)

    @router.get("/whoami", response_model=KeyOut)
    async def whoami(request: Request) -> dict[str, Any]:
        return key_out(service.whoami(principal_of(request)))

    return router
