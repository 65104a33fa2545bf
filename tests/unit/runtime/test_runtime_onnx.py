"""ONNX push-time checks and the ONNX Runtime session that serves the model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkeep.errors import ConfigError, InvalidInput, ModelRefused
from modelkeep.runtime.onnx import STANDARD_DOMAINS, OnnxModel, inspect_onnx
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.testing import (
    build_custom_domain_onnx,
    build_external_data_onnx,
    build_iris_onnx,
    iris_rows,
)

OPSET = [helper.make_opsetid("", 17)]
CUSTOM_DOMAIN = "uses operators from the custom domain 'com.example'"


@pytest.fixture(scope="module")
def iris_bytes() -> bytes:
    return build_iris_onnx()


@pytest.fixture(scope="module")
def iris(iris_bytes: bytes) -> OnnxModel:
    return OnnxModel.load(iris_bytes)


def _model(
    nodes: list[onnx.NodeProto],
    *,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    initializer: list[onnx.TensorProto] | None = None,
    opsets: list[onnx.OperatorSetIdProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs if inputs is not None else [_float("x", [1])],
        outputs if outputs is not None else [_float("y", [1])],
        initializer=initializer or [],
    )
    model = helper.make_model(graph, opset_imports=opsets or OPSET, functions=functions or [])
    return model.SerializeToString()


def _float(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _identity_graph(name: str, node: onnx.NodeProto) -> onnx.GraphProto:
    return helper.make_graph([node], name, [], [_float("z", [1])])


def _external(tensor: onnx.TensorProto) -> onnx.TensorProto:
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return tensor


def _refusal(data: bytes) -> str:
    with pytest.raises(ModelRefused) as caught:
        inspect_onnx(data)
    return caught.value.message


# --- the signature ---------------------------------------------------------------------------


def test_iris_signature_is_what_the_runtime_serves(iris_bytes: bytes) -> None:
    expected = ModelSignature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 3)),
        ),
    )
    assert expected == inspect_onnx(iris_bytes)


def test_symbolic_dimensions_become_minus_one() -> None:
    data = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        inputs=[_float("x", ["batch", 3])],
        outputs=[_float("y", ["batch", 3])],
    )
    assert inspect_onnx(data).inputs[0].shape == (-1, 3)


def test_unicode_tensor_names_are_kept() -> None:
    data = _model(
        [helper.make_node("Identity", ["entrée_données"], ["sortie_é"])],
        inputs=[_float("entrée_données", [2])],
        outputs=[_float("sortie_é", [2])],
    )
    signature = inspect_onnx(data)
    assert (signature.inputs[0].name, signature.outputs[0].name) == ("entrée_données", "sortie_é")


def test_string_tensors_are_bytes_and_run_as_text() -> None:
    string = helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])
    out = helper.make_tensor_value_info("o", TensorProto.STRING, ["n"])
    model = OnnxModel.load(
        _model([helper.make_node("Identity", ["s"], ["o"])], inputs=[string], outputs=[out])
    )
    assert model.signature.inputs[0].datatype == "BYTES"
    result = model.run({"s": np.array(["a", "é"], dtype=object)})
    assert result["o"].tolist() == ["a", "é"]


# --- running ---------------------------------------------------------------------------------


def test_iris_model_classifies_iris(iris: OnnxModel) -> None:
    rows = np.asarray(iris_rows(150), dtype=np.float32)
    result = iris.run({"input": rows})
    assert np.array_equal(result["probabilities"].argmax(axis=1), result["label"])
    assert np.allclose(result["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    from sklearn.datasets import load_iris

    target = load_iris().target[[(i * 37) % 150 for i in range(150)]]
    assert (result["label"] == target).mean() > 0.9


def test_run_returns_outputs_in_signature_order(iris: OnnxModel) -> None:
    result = iris.run({"input": np.asarray(iris_rows(2), dtype=np.float32)})
    assert list(result) == ["label", "probabilities"]


def test_run_returns_only_the_requested_outputs(iris: OnnxModel) -> None:
    result = iris.run({"input": np.asarray(iris_rows(2), dtype=np.float32)}, ["probabilities"])
    assert list(result) == ["probabilities"]


def test_run_refuses_an_unknown_output(iris: OnnxModel) -> None:
    with pytest.raises(InvalidInput, match="unknown output"):
        iris.run({"input": np.asarray(iris_rows(1), dtype=np.float32)}, ["weights"])


@pytest.mark.parametrize(
    "inputs",
    [
        {"input": np.zeros((1, 4), dtype=np.float64)},
        {"input": np.zeros((1, 5), dtype=np.float32)},
        {"other": np.zeros((1, 4), dtype=np.float32)},
        {},
    ],
    ids=["wrong-dtype", "wrong-shape", "wrong-name", "no-input"],
)
def test_runtime_errors_become_invalid_input_without_runtime_text(
    iris: OnnxModel, inputs: dict[str, np.ndarray]
) -> None:
    with pytest.raises(InvalidInput) as caught:
        iris.run(inputs)
    assert caught.value.message == "inference failed: the input does not fit the model"


def test_run_is_safe_from_many_threads(iris: OnnxModel) -> None:
    batches = [np.asarray(iris_rows(150), dtype=np.float32)[i::8] for i in range(8)]
    expected = [iris.run({"input": batch})["probabilities"] for batch in batches]
    results: list[list[np.ndarray]] = [[] for _ in batches]
    start = threading.Barrier(len(batches))

    def work(index: int) -> None:
        start.wait()
        for _ in range(50):
            results[index].append(iris.run({"input": batches[index]})["probabilities"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, runs in enumerate(results):
        assert len(runs) == 50
        assert all(np.array_equal(expected[index], run) for run in runs)


def test_zero_threads_means_the_runtime_default(iris_bytes: bytes) -> None:
    model = OnnxModel.load(iris_bytes, threads=0)
    assert model.run({"input": np.ones((1, 4), np.float32)})["probabilities"].shape == (1, 3)


@pytest.mark.parametrize("threads", [-1, 1.5, True])
def test_bad_thread_counts_are_a_config_error(iris_bytes: bytes, threads: object) -> None:
    with pytest.raises(ConfigError):
        OnnxModel.load(iris_bytes, threads=threads)  # type: ignore[arg-type]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, world", b"\x80\x04\x95 pickle", bytes(range(256)) * 4, b"\x08\x07"],
    ids=["empty", "text", "pickle", "noise", "no-graph"],
)
def test_bytes_that_are_not_an_onnx_model_are_refused(data: bytes) -> None:
    assert "not an ONNX model" in _refusal(data)


def test_every_truncation_of_a_model_is_refused(iris_bytes: bytes) -> None:
    for cut in range(1, len(iris_bytes)):
        with pytest.raises(ModelRefused):
            inspect_onnx(iris_bytes[:cut])


def test_load_refuses_what_inspect_refuses() -> None:
    with pytest.raises(ModelRefused, match=r"com\.example"):
        OnnxModel.load(build_custom_domain_onnx())


def test_custom_domain_is_refused_with_an_actionable_message() -> None:
    message = _refusal(build_custom_domain_onnx())
    assert CUSTOM_DOMAIN in message
    assert "only standard ONNX domains" in message


def test_contrib_domain_is_refused() -> None:
    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    data = _model([node], opsets=[*OPSET, helper.make_opsetid("com.microsoft", 1)])
    assert "uses operators from the custom domain 'com.microsoft'" in _refusal(data)


def test_custom_opset_import_alone_is_refused() -> None:
    data = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        opsets=[*OPSET, helper.make_opsetid("com.example", 1)],
    )
    assert CUSTOM_DOMAIN in _refusal(data)


@pytest.mark.parametrize("op_type", ["If", "Loop", "Scan"])
def test_custom_domain_inside_a_subgraph_is_refused(op_type: str) -> None:
    secret = helper.make_node("Secret", [], ["z"], domain="com.example")
    attribute = "then_branch" if op_type == "If" else "body"
    node = helper.make_node(op_type, ["x"], ["y"], **{attribute: _identity_graph("sub", secret)})
    assert CUSTOM_DOMAIN in _refusal(_model([node]))


def test_custom_domain_nested_two_subgraphs_deep_is_refused() -> None:
    secret = helper.make_node("Secret", [], ["z"], domain="com.example")
    inner = helper.make_node("If", ["c"], ["z"], then_branch=_identity_graph("in", secret))
    outer = helper.make_node("If", ["x"], ["y"], else_branch=_identity_graph("out", inner))
    assert CUSTOM_DOMAIN in _refusal(_model([outer]))


def test_custom_domain_inside_a_local_function_is_refused() -> None:
    body = [helper.make_node("Secret", ["a"], ["b"], domain="com.example")]
    # The function does not import the domain, so only walking its nodes can find the call.
    function = helper.make_function("local", "Wrap", ["a"], ["b"], body, OPSET)
    data = _model(
        [helper.make_node("Wrap", ["x"], ["y"], domain="local")],
        opsets=[*OPSET, helper.make_opsetid("local", 1)],
        functions=[function],
    )
    assert CUSTOM_DOMAIN in _refusal(data)


def test_calls_to_standard_local_functions_are_served() -> None:
    body = [helper.make_node("Neg", ["a"], ["b"])]
    function = helper.make_function("local", "Negate", ["a"], ["b"], body, OPSET)
    data = _model(
        [helper.make_node("Negate", ["x"], ["y"], domain="local")],
        opsets=[*OPSET, helper.make_opsetid("local", 1)],
        functions=[function],
    )
    model = OnnxModel.load(data)
    assert model.run({"x": np.array([2.0], np.float32)})["y"].tolist() == [-2.0]


def test_standard_domains_are_the_onnx_ones() -> None:
    expected = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}
    assert expected == set(STANDARD_DOMAINS)


def test_external_initializer_is_refused_with_a_fix() -> None:
    message = _refusal(build_external_data_onnx())
    assert "external data" in message
    assert "save_as_external_data=False" in message


def test_external_data_is_refused_even_when_the_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x00\x80\x3f")
    monkeypatch.chdir(tmp_path)
    assert "external data" in _refusal(build_external_data_onnx())


def _constant(name: str) -> onnx.NodeProto:
    value = _external(helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    return helper.make_node("Constant", [], [name], value=value)


@pytest.mark.parametrize("where", ["attribute", "subgraph-initializer", "function"])
def test_external_data_anywhere_is_refused(where: str) -> None:
    if where == "attribute":
        data = _model([_constant("c"), helper.make_node("Add", ["x", "c"], ["y"])])
    elif where == "subgraph-initializer":
        weight = _external(helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]))
        sub = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["z"])],
            "sub",
            [],
            [_float("z", [1])],
            initializer=[weight],
        )
        data = _model([helper.make_node("If", ["x"], ["y"], then_branch=sub, else_branch=sub)])
    else:
        function = helper.make_function(
            "local",
            "AddOne",
            ["a"],
            ["b"],
            [_constant("c"), helper.make_node("Add", ["a", "c"], ["b"])],
            OPSET,
        )
        data = _model(
            [helper.make_node("AddOne", ["x"], ["y"], domain="local")],
            opsets=[*OPSET, helper.make_opsetid("local", 1)],
            functions=[function],
        )
    assert "external data" in _refusal(data)


def test_zipmap_output_is_refused_with_the_conversion_hint() -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    classifier = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    model = convert_sklearn(
        classifier, initial_types=[("input", FloatTensorType([None, 4]))], target_opset=17
    )
    message = _refusal(model.SerializeToString())
    assert "not a tensor" in message
    assert "options={'zipmap': False}" in message


def test_sequence_input_is_refused() -> None:
    sequence = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [1])
    data = _model(
        [helper.make_node("SequenceLength", ["x"], ["n"])],
        inputs=[sequence],
        outputs=[helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    assert "input 'x' is a sequence, not a tensor" in _refusal(data)


@pytest.mark.parametrize("elem_type", [TensorProto.BFLOAT16, TensorProto.COMPLEX64])
def test_element_types_without_a_v2_datatype_are_refused(elem_type: int) -> None:
    value = helper.make_tensor_value_info("x", elem_type, [1])
    out = helper.make_tensor_value_info("y", elem_type, [1])
    data = _model([helper.make_node("Identity", ["x"], ["y"])], inputs=[value], outputs=[out])
    message = _refusal(data)
    assert TensorProto.DataType.Name(elem_type) in message
    assert "V2 protocol" in message


def test_checker_rejections_name_the_problem() -> None:
    data = _model([helper.make_node("NoSuchOperator", ["x"], ["y"])])
    assert _refusal(data).startswith("the ONNX checker rejected this model: ")


def test_models_the_runtime_cannot_load_are_refused() -> None:
    # Types are not inferred by the basic checker, so only the runtime notices this mismatch.
    data = _model(
        [helper.make_node("Add", ["x", "i"], ["y"])],
        inputs=[_float("x", [1]), helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
    )
    assert _refusal(data) == "the ONNX runtime could not load this model"
