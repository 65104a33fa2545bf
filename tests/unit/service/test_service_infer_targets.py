"""What an infer call resolves is remembered per caller, but never past a change that affects it."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelkeep.api.v2.codec import InferRequest, decode_infer_request
from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.errors import Forbidden, NotFound
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service import InferCall, Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx, iris_rows

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}]}
).encode()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Principal]]:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        service.push(admin, "iris", build_iris_onnx(seed=0), file_name="iris.onnx")
        service.push(admin, "iris", build_iris_onnx(seed=1), file_name="iris.onnx")
        yield service, admin
    finally:
        service.stop()


def served_version(service: Service, principal: Principal, version: str | None = None) -> str:
    call = InferCall(BODY, functools.partial(decode, BODY))
    return str(service.dataplane.infer_now(principal, "iris", call, version).version)


def decode(body: bytes, signature: ModelSignature, max_elements: int) -> InferRequest:
    return decode_infer_request(body, signature, max_elements=max_elements)


def consumer(service: Service, admin: Principal, models: list[str] | None) -> Principal:
    created = service.create_key(admin, role="consumer", models=models, expires_at=None)
    return service.authenticate(f"Bearer {created.token}")


def test_a_moved_label_is_followed_at_once(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    user = consumer(svc, admin, ["iris"])
    assert served_version(svc, user) == "2"  # newest, no production label
    assert served_version(svc, user) == "2"  # remembered
    svc.set_label(admin, "iris", "production", 1)
    assert served_version(svc, user) == "1"
    svc.delete_label(admin, "iris", "production")
    assert served_version(svc, user) == "2"


def test_a_block_applies_to_a_caller_already_served(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    user = consumer(svc, admin, ["iris"])
    assert served_version(svc, user) == "2"
    svc.store.restrict_key("iris", user.key_id, kind="block", reason="test", now=datetime.now(UTC))
    svc.refresh()
    with pytest.raises(Forbidden, match="suspended"):
        served_version(svc, user)
    svc.unblock(admin, "iris", user.key_id)
    assert served_version(svc, user) == "2"


def test_each_caller_is_authorized_for_itself(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    allowed = consumer(svc, admin, ["iris"])
    other = consumer(svc, admin, ["somewhere-else"])
    assert served_version(svc, allowed) == "2"
    for _ in range(2):  # a refusal is not remembered as an answer, nor is another's success
        with pytest.raises(Forbidden):
            served_version(svc, other)
    # The same key id with a narrower scope (as after a change) is resolved again.
    narrowed = Principal(allowed.key_id, allowed.role, frozenset({"somewhere-else"}))
    with pytest.raises(Forbidden):
        served_version(svc, narrowed)


def test_a_missing_version_stays_missing_and_a_new_one_is_found(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    user = consumer(svc, admin, ["iris"])
    with pytest.raises(NotFound):
        served_version(svc, user, "3")
    svc.push(admin, "iris", build_iris_onnx(seed=2), file_name="iris.onnx")
    assert served_version(svc, user, "3") == "3"
    assert served_version(svc, user) == "3"
