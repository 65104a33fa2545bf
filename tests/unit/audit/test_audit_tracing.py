"""Tracing: spans over the inference path when on; no OpenTelemetry import when off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelkeep.api.v2.infer import v2_call
from modelkeep.audit import tracing
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx, iris_rows

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> Iterator[None]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    yield
    provider.shutdown()


def test_spans_cover_the_inference_path(tmp_path: Path) -> None:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        service.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}
                ]
            }
        ).encode()
        tracing.enable()
        try:
            service.dataplane.infer_now(admin, "iris", v2_call(body))
        finally:
            tracing.disable()
        service.dataplane.infer_now(admin, "iris", v2_call(body))  # off again: no new spans
    finally:
        service.stop()
    names = [s.name for s in EXPORTER.get_finished_spans()]
    assert sorted(names) == ["modelkeep.decode", "modelkeep.infer", "modelkeep.run"]
    root = next(s for s in EXPORTER.get_finished_spans() if s.name == "modelkeep.infer")
    assert dict(root.attributes or {})["model"] == "iris"


def test_spans_are_no_ops_while_tracing_is_off() -> None:
    tracing.disable()
    before = len(EXPORTER.get_finished_spans())
    with tracing.span("modelkeep.anything", model="x") as current:
        assert current is None
    assert tracing.enabled() is False
    assert len(EXPORTER.get_finished_spans()) == before
