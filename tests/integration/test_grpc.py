"""The Open Inference Protocol over gRPC against a real server: clients, auth, limits, hostility.

tritonclient.grpc and the KServe SDK's InferenceGRPCClient are used unchanged, over TLS with the
server's CA, the key in the ``authorization`` metadata. Hostile messages are sent as raw bytes
on a plain gRPC channel, so that no client library tidies them up first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from harness import Server, create_key, free_port, init_server, push
from tritonclient.utils import InferenceServerException

from modelkeep.api.grpc import grpc_predict_v2_pb2 as pb
from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration

INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class World:
    server: Server
    grpc_port: int
    admin: httpx.Client

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def triton(self) -> tgrpc.InferenceServerClient:
        return tgrpc.InferenceServerClient(
            self.target, ssl=True, root_certificates=str(self.server.ca_cert)
        )

    def consumer(self, model: str) -> str:
        return str(create_key(self.server, "consumer", [model])["key"])

    def policy(self, model: str, **policy: object) -> None:
        r = self.admin.put(f"/api/v1/models/{model}/policy", json=policy)
        assert r.status_code == 200, r.text

    def raw_call(self, body: bytes, key: str | None) -> tuple[grpc.StatusCode, str]:
        """Send ``body`` as a ModelInfer message; the status code and details."""
        credentials = grpc.ssl_channel_credentials(self.server.ca_cert.read_bytes())
        metadata = [("authorization", f"Bearer {key}")] if key else []
        with grpc.secure_channel(self.target, credentials) as channel:
            call = channel.unary_unary(INFER)
            try:
                call(body, metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                return exc.code(), str(exc.details())
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    server = init_server(
        tmp_path_factory.mktemp("grpc"), extra_env={"MODELKEEP_GRPC_PORT": str(port)}
    )
    server.start()
    try:
        iris = build_iris_onnx()
        for name in ("iris", "other", "rated", "hardened", "labelled"):
            assert push(server, name, iris).status_code == 201
        # "labelled" has two versions; its label "canary" names the older one.
        assert push(server, "labelled", build_iris_onnx(seed=1)).status_code == 201
        with server.client(server.admin_key) as admin:
            world = World(server, port, admin)
            for name in ("iris", "other", "hardened", "labelled"):
                world.policy(name, limits={})  # unlimited: only "rated" is rate-limited
            r = admin.put("/api/v1/models/labelled/labels/canary", json={"version": 1})
            assert r.status_code == 200, r.text
            yield world
    finally:
        server.stop()


def triton_inputs(rows: np.ndarray) -> list[tgrpc.InferInput]:
    tensor = tgrpc.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return [tensor]


def rest_answer(world: World, key: str, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    with world.server.client(key) as client:
        r = client.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_tritonclient_over_tls_answers_as_v2_rest_does(world: World) -> None:
    key = world.consumer("iris")
    headers = {"authorization": f"Bearer {key}"}
    rows = np.asarray(iris_rows(6), dtype=np.float32)
    with world.triton() as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("iris", headers=headers)
        assert client.get_server_metadata(headers=headers).name == "modelkeep"
        metadata = client.get_model_metadata("iris", headers=headers)
        assert (metadata.name, list(metadata.versions)) == ("iris", ["1"])
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("input", "FP32", [-1, 4])
        ]
        result = client.infer("iris", triton_inputs(rows), headers=headers)
    expected = rest_answer(world, key, "iris", rows)
    assert result.get_response().model_version == "1"
    assert result.as_numpy("label").tolist() == expected["label"].tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"])


def test_a_label_names_the_version_over_grpc(world: World) -> None:
    key = world.consumer("labelled")
    plain = {"authorization": f"Bearer {key}"}
    canary = {**plain, "modelkeep-label": "canary"}
    inputs = triton_inputs(np.asarray(iris_rows(2), dtype=np.float32))
    with world.triton() as client:

        def version_of(**call: object) -> str:
            result = client.infer("labelled", inputs, **call)  # type: ignore[arg-type]
            return str(result.get_response().model_version)

        # Neither a version nor a label: the newest version; the label names version 1, in
        # the metadata or as the request parameter, which tritonclient sends unchanged.
        assert version_of(headers=plain) == "2"
        assert version_of(headers=canary) == "1"
        assert version_of(headers=plain, parameters={"label": "canary"}) == "1"
        assert version_of(headers=canary, parameters={"label": "canary"}) == "1"
        assert client.is_model_ready("labelled", headers=canary)
        assert client.get_model_metadata("labelled", headers=canary).name == "labelled"

        def refused(status: str, call: object) -> None:
            with pytest.raises(InferenceServerException) as caught:
                call()  # type: ignore[operator]
            assert caught.value.status() == f"StatusCode.{status}"

        missing = {**plain, "modelkeep-label": "no-such-label"}
        refused("NOT_FOUND", lambda: client.infer("labelled", inputs, headers=missing))
        refused("NOT_FOUND", lambda: client.is_model_ready("labelled", headers=missing))
        refused("NOT_FOUND", lambda: client.get_model_metadata("labelled", headers=missing))
        # A version and a label, or two different labels, are refused.
        refused(
            "INVALID_ARGUMENT",
            lambda: client.infer("labelled", inputs, model_version="2", headers=canary),
        )
        refused(
            "INVALID_ARGUMENT",
            lambda: client.infer(
                "labelled", inputs, model_version="2", headers=plain, parameters={"label": "canary"}
            ),
        )
        refused(
            "INVALID_ARGUMENT",
            lambda: client.is_model_ready("labelled", model_version="2", headers=canary),
        )
        refused(
            "INVALID_ARGUMENT",
            lambda: client.get_model_metadata("labelled", model_version="1", headers=canary),
        )
        refused(
            "INVALID_ARGUMENT",
            lambda: client.infer(
                "labelled", inputs, headers=canary, parameters={"label": "production"}
            ),
        )
        refused(
            "INVALID_ARGUMENT",
            lambda: client.infer("labelled", inputs, headers=plain, parameters={"label": 1}),
        )
    # A caller without a valid key learns nothing about the label it sent.
    with world.triton() as client:
        stranger = {"authorization": "Bearer mk_nope_nope", "modelkeep-label": "canary"}
        refused("UNAUTHENTICATED", lambda: client.infer("labelled", inputs, headers=stranger))


def test_requested_outputs_and_typed_contents_are_honoured(world: World) -> None:
    key = world.consumer("iris")
    rows = np.asarray(iris_rows(2), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="iris", id="req-7")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    request.outputs.add(name="label")
    credentials = grpc.ssl_channel_credentials(world.server.ca_cert.read_bytes())
    with grpc.secure_channel(world.target, credentials) as channel:
        call = channel.unary_unary(
            INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = call(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)
    expected = rest_answer(world, key, "iris", rows)
    assert response.id == "req-7"
    assert [o.name for o in response.outputs] == ["label"]
    assert list(response.outputs[0].contents.int64_contents) == expected["label"].tolist()
    assert not response.raw_output_contents


def test_no_key_is_unauthenticated(world: World) -> None:
    rows = np.asarray(iris_rows(1), dtype=np.float32)
    with world.triton() as client:
        for headers in (None, {"authorization": "Bearer mk_nope_nope"}):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("iris", triton_inputs(rows), headers=headers)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("iris", headers=headers)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"


def test_a_key_for_another_model_is_denied_and_learns_nothing(world: World) -> None:
    headers = {"authorization": f"Bearer {world.consumer('other')}"}
    rows = np.asarray(iris_rows(1), dtype=np.float32)
    answers = []
    with world.triton() as client:
        for model in ("iris", "no-such-model"):
            with pytest.raises(InferenceServerException) as caught:
                client.infer(model, triton_inputs(rows), headers=headers)
            assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
            answers.append(caught.value.message().replace(model, "M"))
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata(model, headers=headers)
            assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    # The same answer for a model that exists and one that does not.
    assert answers[0] == answers[1]


def _hostile(name: str) -> bytes:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    raw = np.zeros((1, 4), dtype=np.float32).tobytes()
    if name == "wrong dtype":
        tensor.datatype = "INT64"
        request.raw_input_contents.append(np.zeros(4, dtype=np.int64).tobytes())
    elif name == "huge declared shape":
        del tensor.shape[:]
        tensor.shape.extend([2**40, 4])
        request.raw_input_contents.append(raw)
    elif name == "negative shape":
        del tensor.shape[:]
        tensor.shape.extend([-1, 4])
        request.raw_input_contents.append(raw)
    elif name == "raw contents too short":
        request.raw_input_contents.append(raw[:-1])
    elif name == "more raw contents than inputs":
        request.raw_input_contents.extend([raw, raw])
    elif name == "typed contents of another type":
        tensor.contents.int64_contents.extend([1, 2, 3, 4])
    elif name == "too few typed values":
        tensor.contents.fp32_contents.extend([1.0, 2.0])
    elif name == "no contents":
        pass
    elif name == "unknown input":
        tensor.name = "nope"
        request.raw_input_contents.append(raw)
    elif name == "unknown output":
        request.raw_input_contents.append(raw)
        request.outputs.add(name="secret")
    elif name == "unknown model":
        request.model_name = "no-such-model"
        request.raw_input_contents.append(raw)
    elif name == "bad version":
        request.model_version = "../1"
        request.raw_input_contents.append(raw)
    elif name == "shared memory":
        tensor.parameters["shared_memory_region"].string_param = "r"
        request.raw_input_contents.append(raw)
    return request.SerializeToString()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrong dtype", grpc.StatusCode.INVALID_ARGUMENT),
        ("huge declared shape", grpc.StatusCode.INVALID_ARGUMENT),
        ("negative shape", grpc.StatusCode.INVALID_ARGUMENT),
        ("raw contents too short", grpc.StatusCode.INVALID_ARGUMENT),
        ("more raw contents than inputs", grpc.StatusCode.INVALID_ARGUMENT),
        ("typed contents of another type", grpc.StatusCode.INVALID_ARGUMENT),
        ("too few typed values", grpc.StatusCode.INVALID_ARGUMENT),
        ("no contents", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown input", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown output", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown model", grpc.StatusCode.NOT_FOUND),
        ("bad version", grpc.StatusCode.NOT_FOUND),
        ("shared memory", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_hostile_messages_get_a_clear_status_never_internal(
    world: World, name: str, expected: grpc.StatusCode
) -> None:
    code, details = world.raw_call(_hostile(name), world.server.admin_key)
    assert code == expected, (name, details)
    assert "Traceback" not in details
    assert "/" not in details.replace("../1", ""), details


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff garbage", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc", b""],
    ids=["garbage", "bad length", "truncated raw", "empty"],
)
def test_garbage_bytes_are_invalid_argument(world: World, body: bytes) -> None:
    code, details = world.raw_call(body, world.server.admin_key)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    # Without a key the bytes are never parsed: the answer is about the key.
    assert world.raw_call(body, None)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_a_message_over_the_body_limit_is_refused_by_grpc(world: World) -> None:
    # 64 MiB is the default REST body limit; gRPC refuses the message before modelkeep sees it.
    code, _ = world.raw_call(b"\x3a" + b"\x80\x80\x80\x20" + b"\0" * (64 * 1024 * 1024), "x")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_over_rate_caller_is_resource_exhausted(world: World) -> None:
    world.policy("rated", limits={"rate": "5/10second"})
    headers = {"authorization": f"Bearer {world.consumer('rated')}"}
    rows = np.asarray(iris_rows(1), dtype=np.float32)
    barrier = threading.Barrier(10)

    def one(_: int) -> str:
        barrier.wait(timeout=30)
        try:
            with world.triton() as client:
                client.infer("rated", triton_inputs(rows), headers=headers)
        except InferenceServerException as exc:
            return str(exc.status())
        return "OK"

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = sorted(pool.map(one, range(10)))
    assert statuses == ["OK"] * 5 + ["StatusCode.RESOURCE_EXHAUSTED"] * 5


def test_label_only_strips_probabilities(world: World) -> None:
    world.policy("hardened", output="label_only", limits={})
    key = world.consumer("hardened")
    rows = np.asarray(iris_rows(3), dtype=np.float32)
    with world.triton() as client:
        result = client.infer(
            "hardened", triton_inputs(rows), headers={"authorization": f"Bearer {key}"}
        )
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("probabilities") is None
    assert (
        result.as_numpy("label").tolist()
        == rest_answer(world, key, "hardened", rows)["label"].tolist()
    )


def test_grpc_calls_are_in_the_access_log_and_metrics(world: World) -> None:
    key = world.consumer("iris")
    principal = key.split("_")[1]
    rows = np.asarray(iris_rows(1), dtype=np.float32)
    with world.triton() as client:
        client.infer("iris", triton_inputs(rows), headers={"authorization": f"Bearer {key}"})
    route = "/inference.GRPCInferenceService/ModelInfer"
    found: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while not found and time.monotonic() < deadline:  # access lines are written in batches
        time.sleep(0.2)
        lines = [json.loads(x) for x in world.server.log().splitlines() if '"access"' in x]
        found = [x for x in lines if x.get("route") == route and x.get("principal") == principal]
    assert found, "no access line for ModelInfer"
    line = found[-1]
    assert (line["method"], line["status"], line["model"], line["version"], line["rows"]) == (
        "GRPC",
        200,
        "iris",
        "1",
        1,
    )
    assert line["bytes_in"] > 0
    assert line["input_digest"]
    metrics = world.admin.get("/metrics").text
    assert f'route="{route}"' in metrics


KSERVE_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    target, ca, key = sys.argv[1:4]

    async def main():
        client = InferenceGRPCClient(
            target, use_ssl=True, root_certificates=ca, timeout=30
        )
        headers = (("authorization", "Bearer " + key),)
        live = await client.is_server_live()
        tensor = InferInput("input", [2, 4], "FP32")
        tensor.set_data_from_numpy(np.asarray(json.loads(sys.argv[4]), dtype=np.float32))
        response = await client.infer(
            InferRequest(model_name="iris", infer_inputs=[tensor]), headers=headers
        )
        out = {o.name: o.as_numpy().tolist() for o in response.outputs}
        await client.close()
        print(json.dumps({"live": live, "outputs": out}))

    asyncio.run(main())
    """
)


def test_the_kserve_sdk_grpc_client_works(world: World) -> None:
    # Its own process: kserve's generated module and tritonclient's declare the same protobuf
    # names in the default pool, so one process cannot import both.
    key = world.consumer("iris")
    rows = np.asarray(iris_rows(2), dtype=np.float32)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KSERVE_CLIENT,
            world.target,
            str(world.server.ca_cert),
            key,
            json.dumps(rows.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = rest_answer(world, key, "iris", rows)
    assert answer["live"] is True
    assert answer["outputs"]["label"] == expected["label"].tolist()
    np.testing.assert_allclose(
        answer["outputs"]["probabilities"], expected["probabilities"], rtol=1e-6
    )


def test_every_worker_serves_grpc_on_the_shared_port(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    server = init_server(
        tmp_path_factory.mktemp("grpc-workers"),
        workers=2,
        extra_env={"MODELKEEP_GRPC_PORT": str(port)},
    )
    server.start()
    try:
        assert push(server, "iris", build_iris_onnx()).status_code == 201
        time.sleep(1.0)  # the other worker learns of the push at its next refresh
        headers = {"authorization": f"Bearer {server.admin_key}"}
        rows = np.asarray(iris_rows(1), dtype=np.float32)
        for _ in range(12):  # a new connection each time: the kernel spreads them
            with tgrpc.InferenceServerClient(
                f"127.0.0.1:{port}", ssl=True, root_certificates=str(server.ca_cert)
            ) as client:
                result = client.infer("iris", triton_inputs(rows), headers=headers)
                assert result.as_numpy("label") is not None
        listening = [line for line in server.log().splitlines() if "serving gRPC" in line]
        assert len(listening) == 2, server.log()
    finally:
        server.stop()


def test_the_docs_tritonclient_example_works(world: World) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocols.md").read_text()
    section = text[text.index("### Example: tritonclient") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    example = example.replace("localhost:8081", f"localhost:{world.grpc_port}")
    env = {
        **os.environ,
        "MODELKEEP_TOKEN": world.consumer("iris"),
        "MODELKEEP_CACERT": str(world.server.ca_cert),
    }
    proc = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[0 2]"), proc.stdout


def _client_context(world: World, tls12_cipher: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(world.server.ca_cert))
    context.set_alpn_protocols(["h2"])
    if tls12_cipher is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_cipher)
    return context


def _handshake(world: World, *, tls12_cipher: str | None = None) -> str:
    """Connect to the gRPC port with TLS 1.2 (and only ``tls12_cipher``) or any version."""
    context = _client_context(world, tls12_cipher)
    with (
        socket.create_connection(("127.0.0.1", world.grpc_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return f"{tls.version()} {tls.cipher()[0]}"


def test_the_grpc_port_speaks_only_modern_tls(world: World) -> None:
    assert _handshake(world).startswith("TLSv1.3")
    assert _handshake(world, tls12_cipher="ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    for weak in ("ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256"):  # CBC; no forward secrecy
        # The client can offer it: the refusal below is the server's.
        offered = [c["name"] for c in _client_context(world, weak).get_ciphers()]
        assert [name for name in offered if not name.startswith("TLS_")] == [weak]
        with pytest.raises(ssl.SSLError):
            _handshake(world, tls12_cipher=weak)


def test_sigterm_makes_grpc_not_ready_then_stops_cleanly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    server = init_server(
        tmp_path_factory.mktemp("grpc-drain"),
        extra_env={"MODELKEEP_GRPC_PORT": str(port), "MODELKEEP_SHUTDOWN_DELAY_S": "3"},
    )
    server.start()
    try:
        assert server.proc is not None
        with tgrpc.InferenceServerClient(
            f"127.0.0.1:{port}", ssl=True, root_certificates=str(server.ca_cert)
        ) as client:
            assert client.is_server_ready()
            os.killpg(server.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 2.5
            while client.is_server_ready() and time.monotonic() < deadline:
                time.sleep(0.1)
            # Draining: not ready, still live and still answering.
            assert not client.is_server_ready()
            assert client.is_server_live()
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
