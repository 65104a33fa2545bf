"""The gRPC servicer in process: each RPC through its handler with a stand-in context.

No socket, no TLS, SQLite in a temp dir (modelkeep.testing.open_service).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelkeep.api.grpc import grpc_predict_v2_pb2 as pb
from modelkeep.api.grpc._servicer import InferenceServicer
from modelkeep.service import Service
from modelkeep.testing import build_iris_onnx, iris_rows, open_service


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


@dataclass
class Context:
    """What the servicer uses of grpc.aio.ServicerContext."""

    metadata: tuple[tuple[str, str], ...] = ()
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:10.1.2.3:5555"

    def set_trailing_metadata(self, trailers: Any) -> None:
        self.trailers = list(trailers)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class Recorder:
    lines: list[dict[str, Any]] = field(default_factory=list)

    def record(self, **line: Any) -> None:
        self.lines.append(line)


@dataclass
class World:
    service: Service
    servicer: InferenceServicer
    recorder: Recorder
    consumer: str
    stranger: str
    admin: Any

    def call(self, rpc: str, request: Any, key: str | None = None) -> Any:
        handler = self.servicer.generic_handler().service(_Details(rpc))
        assert handler is not None
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        body = request if isinstance(request, bytes) else request.SerializeToString()
        if handler.request_deserializer is not None:
            body = handler.request_deserializer(body)
        return asyncio.run(handler.unary_unary(body, Context(metadata)))


@dataclass
class _Details:
    rpc: str

    @property
    def method(self) -> str:
        return f"/inference.GRPCInferenceService/{self.rpc}"

    @property
    def invocation_metadata(self) -> tuple[()]:
        return ()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    service, admin_key = open_service(tmp_path / "data")
    try:
        admin = service.authenticate(f"Bearer {admin_key}")
        for name in ("iris", "other"):
            service.put_model(admin, name, require_signature=False)
            service.push(admin, name, build_iris_onnx(), file_name="iris.onnx")
        consumer = service.create_key(admin, role="consumer", models=["iris"], expires_at=None)
        stranger = service.create_key(admin, role="consumer", models=["other"], expires_at=None)
        recorder = Recorder()
        servicer = InferenceServicer(service, recorder)  # type: ignore[arg-type]
        yield World(service, servicer, recorder, consumer.token, stranger.token, admin)
    finally:
        service.stop()


def _infer_request(model: str = "iris") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.asarray(iris_rows(2), dtype="<f4").tobytes())
    return request


def test_model_infer_answers_with_raw_outputs_and_is_observed(world: World) -> None:
    response = world.call("ModelInfer", _infer_request(), world.consumer)
    assert (response.model_name, response.model_version) == ("iris", "1")
    names = [o.name for o in response.outputs]
    assert names[0] == "label"
    assert len(response.raw_output_contents) == len(names)
    line = world.recorder.lines[-1]
    assert (line["method"], line["route"], line["status"]) == (
        "GRPC",
        "/inference.GRPCInferenceService/ModelInfer",
        200,
    )
    assert (line["model"], line["version"], line["rows"], line["client"]) == (
        "iris",
        1,
        2,
        "10.1.2.3",
    )


def test_no_key_is_unauthenticated_and_audited(world: World) -> None:
    with pytest.raises(Aborted) as caught:
        world.call("ModelInfer", _infer_request(), None)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert world.recorder.lines[-1]["status"] == 401
    failures = world.service.audit_entries(world.admin, action="auth.failure")
    assert len(failures) == 1
    assert failures[0].details["source"] == "10.1.2.3"


def test_a_key_for_another_model_is_permission_denied(world: World) -> None:
    with pytest.raises(Aborted) as caught:
        world.call("ModelInfer", _infer_request(), world.stranger)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Aborted) as unknown:
        world.call("ModelInfer", _infer_request("nope"), world.stranger)
    assert unknown.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details.replace("iris", "M") == unknown.value.details.replace("nope", "M")


def test_metadata_rpcs(world: World) -> None:
    assert world.call("ServerLive", pb.ServerLiveRequest()).live
    assert world.call("ServerReady", pb.ServerReadyRequest()).ready in (True, False)
    server = world.call("ServerMetadata", pb.ServerMetadataRequest(), world.consumer)
    assert server.name == "modelkeep"
    ready = world.call("ModelReady", pb.ModelReadyRequest(name="iris"), world.consumer)
    assert ready.ready
    metadata = world.call("ModelMetadata", pb.ModelMetadataRequest(name="iris"), world.consumer)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 4])
    ]
    with pytest.raises(Aborted) as caught:
        world.call("ModelMetadata", pb.ModelMetadataRequest(name=""), world.consumer)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_repository_rpcs_are_unimplemented_after_authentication(world: World) -> None:
    with pytest.raises(Aborted) as anonymous:
        world.call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="iris"))
    assert anonymous.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Aborted) as caught:
        world.call(
            "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="iris"), world.consumer
        )
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_garbage_and_a_bad_tensor_are_invalid_argument(world: World) -> None:
    with pytest.raises(Aborted) as garbage:
        world.call("ModelInfer", b"\xff\xff\xff", world.consumer)
    assert garbage.value.code == grpc.StatusCode.INVALID_ARGUMENT
    request = _infer_request()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    with pytest.raises(Aborted) as short:
        world.call("ModelInfer", request, world.consumer)
    assert short.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw contents" in short.value.details
