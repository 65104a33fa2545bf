"""Large ONNX weights reach ONNX Runtime split off the graph: same model, same predictions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkeep.errors import ModelRefused
from modelkeep.runtime._onnx_wire import MIN_SPLIT_BYTES, MalformedModel, split_weights
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.scanning import Verdict, scan_bytes
from modelkeep.testing import build_big_onnx

OPSET = [helper.make_opsetid("", 17)]
WIDTH = 96  # a WIDTH x WIDTH float32 matrix is 36 KiB: above MIN_SPLIT_BYTES


def _layers(count: int, *, float_data_at: int | None = None, seed: int = 0) -> bytes:
    """``count`` dense layers (MatMul, Add of a bias, Relu); the weights of layer
    ``float_data_at`` are stored in ``float_data`` instead of ``raw_data``."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    previous = "x"
    for index in range(count):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / WIDTH).astype(np.float32)
        bias = rng.standard_normal(WIDTH).astype(np.float32)
        if index == float_data_at:
            tensor = helper.make_tensor(
                f"w{index}", TensorProto.FLOAT, weight.shape, weight.reshape(-1).tolist()
            )
            assert not tensor.HasField("raw_data")
            assert len(tensor.float_data) == weight.size
        else:
            tensor = numpy_helper.from_array(weight, f"w{index}")
        initializers += [tensor, numpy_helper.from_array(bias, f"b{index}")]
        nodes += [
            helper.make_node("MatMul", [previous, f"w{index}"], [f"m{index}"]),
            helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]),
            helper.make_node("Relu", [f"a{index}"], [f"h{index}"]),
        ]
        previous = f"h{index}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=OPSET).SerializeToString()


def _plain_session_outputs(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What ONNX Runtime answers when handed the whole model as bytes (the old way in)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _rows(count: int = 5) -> np.ndarray:
    return np.random.default_rng(9).standard_normal((count, WIDTH)).astype(np.float32)


def test_a_model_of_many_weights_predicts_exactly_as_when_loaded_whole() -> None:
    data = _layers(40)

    split = split_weights(data)
    served = OnnxModel.load(data).run({"x": _rows()})

    assert sorted(split.weights) == sorted(f"w{index}" for index in range(40))
    np.testing.assert_array_equal(_plain_session_outputs(data, {"x": _rows()})[0], served["y"])


def test_weights_in_float_data_stay_in_the_graph_and_predict_the_same() -> None:
    data = _layers(4, float_data_at=2)

    split = split_weights(data)
    served = OnnxModel.load(data).run({"x": _rows()})

    assert sorted(split.weights) == ["w0", "w1", "w3"]
    kept = {t.name: t for t in onnx.load_model_from_string(split.skeleton).graph.initializer}
    assert len(kept["w2"].float_data) == WIDTH * WIDTH
    np.testing.assert_array_equal(_plain_session_outputs(data, {"x": _rows()})[0], served["y"])


def test_a_weight_the_runtime_folds_at_load_is_folded_from_the_right_data() -> None:
    # ReduceSum of a constant is computed once at load by ONNX Runtime's constant folding,
    # from the weight as it was handed over.
    data = build_big_onnx(4 * 1024 * 1024, seed=4)
    rows = np.ones((2, 4), dtype=np.float32)

    served = OnnxModel.load(data).run({"input": rows})

    np.testing.assert_array_equal(_plain_session_outputs(data, {"input": rows})[0], served["y"])


def test_split_weights_are_views_over_the_bytes_and_the_graph_keeps_their_shapes() -> None:
    data = _layers(3)

    split = split_weights(data)

    assert len(split.skeleton) < 4 * 1024  # only the graph and the small biases
    source = np.frombuffer(data, dtype=np.uint8)
    model = onnx.load_model_from_string(data)
    for tensor in model.graph.initializer:
        if tensor.name in split.weights:
            weight = split.weights[tensor.name]
            assert np.shares_memory(weight, source)  # no copy
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), weight)
    hollow = {t.name: t for t in onnx.load_model_from_string(split.skeleton).graph.initializer}
    assert [list(hollow["w1"].dims), hollow["w1"].data_type] == [[WIDTH, WIDTH], 1]
    assert not hollow["w1"].HasField("raw_data")
    assert hollow["b1"].raw_data == model.graph.initializer[3].raw_data  # small: kept whole


def test_only_plain_main_graph_tensors_of_matching_size_are_split() -> None:
    big = np.ones(MIN_SPLIT_BYTES // 4, dtype=np.float32)
    short = numpy_helper.from_array(big, "short")
    short.raw_data = short.raw_data[:-4]  # fewer bytes than its dims declare
    small = numpy_helper.from_array(big[:8], "small")
    external = numpy_helper.from_array(big, "external")
    external.external_data.add(key="location", value="elsewhere.bin")
    external.data_location = TensorProto.EXTERNAL
    inner = helper.make_graph(
        [helper.make_node("Identity", ["inner_w"], ["out"])],
        "inner",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [len(big)])],
        initializer=[numpy_helper.from_array(big, "inner_w")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner),
        ],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(big)])],
        initializer=[short, small, external, numpy_helper.from_array(big, "plain")],
    )
    data = helper.make_model(graph, opset_imports=OPSET).SerializeToString()

    split = split_weights(data)

    assert list(split.weights) == ["plain"]
    kept = onnx.load_model_from_string(split.skeleton)
    whole = onnx.load_model_from_string(data)
    assert kept.graph.initializer[:3] == whole.graph.initializer[:3]
    assert kept.graph.node == whole.graph.node  # the subgraph's weight too


def test_two_initializers_of_one_name_are_refused() -> None:
    weight = numpy_helper.from_array(np.ones(MIN_SPLIT_BYTES, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [MIN_SPLIT_BYTES])],
        initializer=[weight, weight],
    )
    data = helper.make_model(graph, opset_imports=OPSET).SerializeToString()

    with pytest.raises(MalformedModel):
        split_weights(data)
    with pytest.raises(ModelRefused, match="share a name"):
        OnnxModel.load(data)


def test_every_truncation_of_a_model_with_weights_is_refused() -> None:
    data = _layers(1)
    for end in range(0, len(data) - 1, 997):
        with pytest.raises(ModelRefused):
            OnnxModel.load(data[:end])


def test_a_publisher_tensor_pointing_where_split_weights_point_is_refused() -> None:
    # The location the server marks its own split-off weights with is no way in for a
    # publisher: every external reference in a pushed model is refused before the runtime.
    weight = numpy_helper.from_array(np.ones(MIN_SPLIT_BYTES, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="modelkeep-weight")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [MIN_SPLIT_BYTES])],
        initializer=[weight],
    )
    data = helper.make_model(graph, opset_imports=OPSET).SerializeToString()

    with pytest.raises(ModelRefused, match="external data"):
        OnnxModel.load(data)


def test_the_scan_of_a_model_with_weights_is_unchanged_by_the_split() -> None:
    data = _layers(3)

    report = scan_bytes(data, "model.onnx")

    assert (report.verdict, report.format) == (Verdict.SAFE, "onnx")


def test_the_scan_still_reads_a_split_weight_an_allocating_operator_takes() -> None:
    # Tile's repeats are a constant the allocation check reads; stored large, they are split
    # off, and the check must read them from the split weights.
    repeats = np.ones(MIN_SPLIT_BYTES // 8, dtype=np.int64)
    repeats[0] = 10**9
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1] * len(repeats))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(repeats, "repeats")],
    )
    data = helper.make_model(graph, opset_imports=OPSET).SerializeToString()
    assert list(split_weights(data).weights) == ["repeats"]

    report = scan_bytes(data, "model.onnx")

    assert report.verdict is Verdict.MALICIOUS
    assert any("Tile builds a tensor" in finding.message for finding in report.findings)
