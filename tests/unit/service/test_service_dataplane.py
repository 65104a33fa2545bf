"""The data plane: which version a call reaches, the order of its checks, what it returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelkeep.api.v2.codec import InferRequest, decode_infer_request
from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.errors import Forbidden, InvalidInput, NotFound, RateLimited, TooLarge, Unavailable
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import InferCall, Observed, Service
from modelkeep.settings import Settings
from modelkeep.testing import build_dense_onnx, build_iris_onnx, iris_rows

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": iris_rows(2)}]}
).encode()


class Decoder:
    """A V2 decoder that counts its calls and remembers the limit it was given."""

    def __init__(self, body: bytes = BODY) -> None:
        self.body = body
        self.calls = 0
        self.max_elements: int | None = None

    def __call__(self, signature: ModelSignature, max_elements: int) -> InferRequest:
        self.calls += 1
        self.max_elements = max_elements
        return decode_infer_request(self.body, signature, max_elements=max_elements)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Service, Principal]]:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data", max_tensor_elements=1000))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        service.push(admin, "iris", build_iris_onnx(seed=0), file_name="iris.onnx")
        service.push(admin, "iris", build_iris_onnx(seed=1), file_name="iris.onnx")
        service.put_model(admin, "other", require_signature=False)
        service.push(admin, "other", build_iris_onnx(seed=2), file_name="iris.onnx")
        yield service, admin
    finally:
        service.stop()


def consumer(service: Service, admin: Principal, models: list[str] | None) -> Principal:
    created = service.create_key(admin, role="consumer", models=models, expires_at=None)
    return service.authenticate(f"Bearer {created.token}")


def infer(
    service: Service,
    principal: Principal,
    call: InferCall[InferRequest] | None = None,
    version: str | None = None,
    label: str | None = None,
    model: str = "iris",
) -> int:
    call = call or InferCall(BODY, Decoder())
    result = asyncio.run(service.dataplane.infer(principal, model, call, version, label))
    return result.version


def test_version_label_and_default_resolve_to_the_version_they_name(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    assert infer(svc, admin) == 2  # no production label: the newest
    assert infer(svc, admin, version="1") == 1
    svc.set_label(admin, "iris", "canary", 1)
    assert infer(svc, admin, label="canary") == 1
    svc.set_label(admin, "iris", "production", 1)
    assert infer(svc, admin) == 1  # the production label is the default
    assert infer(svc, admin, label="production") == 1
    assert infer(svc, admin, version="2") == 2
    for version, label in (("3", None), ("one", None), (None, "staging"), (None, "../x")):
        with pytest.raises(NotFound):
            infer(svc, admin, version=version, label=label)
    with pytest.raises(InvalidInput, match="not both"):
        infer(svc, admin, version="1", label="canary")


def test_metadata_and_signature_follow_the_same_resolution(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    svc.set_label(admin, "iris", "canary", 1)
    plane = svc.dataplane
    meta = plane.model_metadata(admin, "iris", label="canary")
    assert (meta["name"], meta["version"], meta["versions"]) == ("iris", 1, ["1", "2"])
    assert [i["name"] for i in meta["inputs"]] == ["input"]
    assert plane.model_metadata(admin, "iris")["version"] == 2
    found, signature = plane.signature(admin, "iris", version="1")
    assert found.number == 1
    assert [spec.name for spec in signature.inputs] == ["input"]
    assert plane.model_ready(admin, "iris", label="canary") is True
    with pytest.raises(NotFound):
        plane.model_ready(admin, "iris", label="nope")


def test_a_caller_not_allowed_the_model_never_reaches_the_decoder(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    stranger = consumer(svc, admin, ["other"])
    decoder = Decoder()
    observed = Observed()
    with pytest.raises(Forbidden):
        infer(svc, stranger, InferCall(BODY, decoder, observed=observed))
    assert decoder.calls == 0
    assert observed == Observed()  # nothing learnt about the model's versions
    # Unknown models answer the same to a caller bound to other models: nothing is revealed.
    with pytest.raises(Forbidden):
        infer(svc, stranger, InferCall(BODY, decoder), model="no-such-model")
    assert decoder.calls == 0


def test_a_blocked_key_is_refused_before_decoding(world: tuple[Service, Principal]) -> None:
    svc, admin = world
    user = consumer(svc, admin, ["iris"])
    svc.store.restrict_key("iris", user.key_id, kind="block", reason="test", now=datetime.now(UTC))
    svc.refresh()
    decoder = Decoder()
    with pytest.raises(Forbidden, match="suspended"):
        infer(svc, user, InferCall(BODY, decoder))
    assert decoder.calls == 0


def test_the_decoder_gets_the_element_limit_and_its_refusal_stops_the_call(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    decoder = Decoder()
    infer(svc, admin, InferCall(BODY, decoder))
    assert decoder.max_elements == 1000
    big = json.dumps(
        {"inputs": [{"name": "input", "shape": [300, 4], "datatype": "FP32", "data": [0.0]}]}
    ).encode()
    with pytest.raises(TooLarge):
        infer(svc, admin, InferCall(big, Decoder(big)))


def test_label_only_hardening_leaves_only_the_label_output(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    policy = {"output": "label_only", "output_for": {"admin": "full"}, "detect": []}
    svc.set_policy(admin, "iris", policy)
    user = consumer(svc, admin, ["iris"])
    result = asyncio.run(svc.dataplane.infer(user, "iris", InferCall(BODY, Decoder())))
    assert list(result.outputs) == ["label"]
    assert result.outputs["label"].shape == (2,)
    assert result.rows == 2
    # The admin's role is given the full outputs.
    full = asyncio.run(svc.dataplane.infer(admin, "iris", InferCall(BODY, Decoder())))
    assert list(full.outputs) == ["label", "probabilities"]


def test_an_output_filter_keeps_the_requested_outputs_only(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}
            ],
            "outputs": [{"name": "probabilities"}],
        }
    ).encode()
    result = asyncio.run(svc.dataplane.infer(admin, "iris", InferCall(body, Decoder(body))))
    assert list(result.outputs) == ["probabilities"]


def test_the_budget_is_in_the_result_and_a_refusal_still_reports_rows_and_version(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    svc.set_policy(admin, "iris", {"limits": {"budget": "3/day"}, "detect": []})
    user = consumer(svc, admin, ["iris"])
    first = asyncio.run(svc.dataplane.infer(user, "iris", InferCall(BODY, Decoder())))
    assert first.budget is not None
    assert (first.budget.limit, first.budget.remaining) == (3, 1)
    assert first.budget.reset is not None
    assert first.budget.reset > datetime.now(UTC)
    observed = Observed()
    with pytest.raises(RateLimited):
        infer(svc, user, InferCall(BODY, Decoder(), observed=observed))
    assert observed == Observed(rows=2, version=2)


def test_past_the_queue_bound_a_call_is_shed_before_anything_else(
    world: tuple[Service, Principal],
) -> None:
    svc, admin = world
    runner = svc.dataplane.runner
    runner.in_flight = runner.max_queue  # as if that many calls were waiting or running
    decoder = Decoder()
    try:
        with pytest.raises(Unavailable, match="overloaded"):
            infer(svc, admin, InferCall(BODY, decoder))
    finally:
        runner.in_flight = 0
    assert decoder.calls == 0
    assert infer(svc, admin) == 2  # room again: served


def test_a_model_with_large_weights_serves_what_onnx_runtime_computes_from_its_bytes(
    tmp_path: Path,
) -> None:
    # Pushed, then loaded for serving through the path every version takes (decrypt, verify,
    # weights split off the graph for ONNX Runtime): the answers are the runtime's own.
    data = build_dense_onnx(4 * 256 * 1024, layer_bytes=256 * 1024, seed=5)  # 4 x [256, 256]
    rows = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [3, 256], "datatype": "FP32", "data": rows.ravel().tolist()}
            ]
        }
    ).encode()
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "dense", require_signature=False)
        service.push(admin, "dense", data, file_name="dense.onnx")
        result = asyncio.run(
            service.dataplane.infer(admin, "dense", InferCall(body, Decoder(body)), None, None)
        )
    finally:
        service.stop()

    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": rows})
    np.testing.assert_array_equal(expected[0], result.outputs["y"])
