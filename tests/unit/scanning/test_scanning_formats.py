"""ONNX, safetensors, GGUF, Keras, skops, XGBoost and LightGBM rules, and content detection."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from modelkeep.runtime.onnx import STANDARD_DOMAINS
from modelkeep.scanning import Severity, Verdict, _onnx, detect_format, scan_bytes


def worst_messages(data: bytes) -> list[str]:
    report = scan_bytes(data)
    return [f.message for f in report.findings if f.severity in (Severity.CRITICAL, Severity.HIGH)]


def onnx_model(
    nodes: list[object], initializers: list[object], functions: list[object] = ()
) -> bytes:  # type: ignore[assignment]
    graph = helper.make_graph(
        nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17)]
    if functions:
        opsets.append(helper.make_opsetid("local", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    return bytes(model.SerializeToString())


def test_onnx_scanner_uses_the_runtime_standard_domains() -> None:
    assert STANDARD_DOMAINS is _onnx.STANDARD_DOMAINS


def test_onnx_iris_is_safe(iris_onnx: bytes) -> None:
    report = scan_bytes(iris_onnx, "iris.onnx")
    assert (report.verdict, report.format) == (Verdict.SAFE, "onnx")


def test_onnx_local_function_in_its_own_domain_is_not_a_custom_operator() -> None:
    body = helper.make_function(
        "local", "Twice", ["x"], ["z"], [helper.make_node("Add", ["x", "x"], ["z"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    x = helper.make_tensor("x", TensorProto.FLOAT, [1], [1.0])
    data = onnx_model([helper.make_node("Twice", ["x"], ["y"], domain="local")], [x], [body])
    assert scan_bytes(data).verdict == Verdict.SAFE


@pytest.mark.parametrize(
    ("op", "inputs", "values"),
    [
        ("Expand", ["x", "shape"], {"shape": (TensorProto.INT64, [2], [100_000, 100_000])}),
        ("OneHot", ["x", "depth", "pair"], {"depth": (TensorProto.INT64, [], [10**10]),
                                            "pair": (TensorProto.FLOAT, [2], [0.0, 1.0])}),
        ("Pad", ["x", "pads"], {"pads": (TensorProto.INT64, [2], [10**9, 10**9])}),
        ("Resize", ["x", "", "", "sizes"], {"sizes": (TensorProto.INT64, [1], [10**10])}),
        ("Upsample", ["x", "scales"], {"scales": (TensorProto.FLOAT, [1], [1e10])}),
    ],
)  # fmt: skip
def test_onnx_allocating_operators_over_the_limit_are_malicious(
    op: str, inputs: list[str], values: dict[str, tuple[int, list[int], list[float]]]
) -> None:
    tensors = [helper.make_tensor("x", TensorProto.FLOAT, [1], [1.0])]
    tensors += [
        helper.make_tensor(name, kind, dims, vals) for name, (kind, dims, vals) in values.items()
    ]
    data = onnx_model([helper.make_node(op, inputs, ["y"])], tensors)
    assert any(f"{op} builds a tensor" in m for m in worst_messages(data))


def test_onnx_allocations_are_summed() -> None:
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**27])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], [f"y{i}"]) for i in range(3)]
    data = onnx_model(nodes, [shape])
    messages = worst_messages(data)
    assert len(messages) == 1
    assert "together" in messages[0]


def test_onnx_declared_size_must_match_its_data() -> None:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=b"\x00" * 12)
    data = onnx_model([helper.make_node("Identity", ["w"], ["y"])], [tensor])
    assert any("holds 12 bytes" in m for m in worst_messages(data))


def test_safetensors_header_is_parsed_without_the_library(asm: ModuleType) -> None:
    entry = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}
    good = asm.safetensors_raw({"a": entry, "__metadata__": {"format": "np"}}, b"\x00" * 8)
    assert scan_bytes(good).verdict == Verdict.SAFE
    gap = asm.safetensors_raw({"a": {**entry, "data_offsets": [4, 12]}}, b"\x00" * 12)
    assert any("belong to no tensor" in m for m in worst_messages(gap))
    unknown = asm.safetensors_raw({"a": {**entry, "dtype": "F128"}}, b"\x00" * 8)
    assert any("unknown dtype" in m for m in worst_messages(unknown))


def test_safetensors_element_limit(asm: ModuleType) -> None:
    entry = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 8]}
    messages = worst_messages(asm.safetensors_raw({"a": entry}, b"\x00" * 8))
    assert any("over the limit" in m for m in messages)


def gguf(kvs: bytes, kv_count: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, kv_count) + kvs


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_gguf_duplicate_key_and_bad_alignment_are_errors() -> None:
    pair = gguf_string("general.name") + struct.pack("<I", 8) + gguf_string("m")
    assert scan_bytes(gguf(pair + pair, 2)).verdict == Verdict.ERROR
    alignment = gguf_string("general.alignment") + struct.pack("<II", 4, 3)
    assert any("power of two" in m for m in worst_messages(gguf(alignment, 1)))


def test_gguf_array_count_is_checked_before_reading() -> None:
    array = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)
    assert any("2^40" in m or "1099511627776 items" in m for m in worst_messages(gguf(array, 1)))


def test_gguf_benign_chat_template_with_system_role_is_safe() -> None:
    template = "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    pair = gguf_string("tokenizer.chat_template") + struct.pack("<I", 8) + gguf_string(template)
    assert scan_bytes(gguf(pair, 1)).verdict == Verdict.SAFE


@pytest.mark.parametrize(
    "template",
    ["{{ x|attr('__class__') }}", "{{ lipsum.__globals__ }}", "{{ self.__init__ }}",
     "{{ x['\\x5f\\x5fclass\\x5f\\x5f'] }}", "{{ cycler.__init__.__globals__.os.popen('true') }}"],
)  # fmt: skip
def test_gguf_chat_templates_reaching_python_internals_are_malicious(template: str) -> None:
    pair = gguf_string("tokenizer.chat_template") + struct.pack("<I", 8) + gguf_string(template)
    assert scan_bytes(gguf(pair, 1)).verdict == Verdict.MALICIOUS


def keras_zip(asm: ModuleType, layer: dict[str, object]) -> bytes:
    config = {"module": "keras", "class_name": "Sequential", "config": {"layers": [layer]}}
    return asm.zip_bytes({"config.json": json.dumps(config).encode(), "metadata.json": b"{}"})


@pytest.mark.parametrize(
    ("layer", "verdict"),
    [
        ({"module": "keras.src.layers", "class_name": "Dense", "registered_name": None}, "safe"),
        ({"module": "keras.layers", "class_name": "Dense", "config": {"activation": {
            "module": "keras.activations", "class_name": "function", "config": "relu",
            "registered_name": "relu"}}}, "safe"),
        ({"module": "keras.config", "class_name": "enable_unsafe_deserialization"}, "malicious"),
        ({"module": "builtins", "class_name": "function", "config": "eval"}, "malicious"),
        ({"module": "keras.layers", "class_name": "Bidirectional", "config": {"layer": {
            "class_name": "TFOpLambda", "config": {}}}}, "malicious"),
        ({"module": "keras.layers", "class_name": "Dense", "registered_name": "pkg>Dense"},
         "malicious"),
    ],
)  # fmt: skip
def test_keras_configuration_rules(asm: ModuleType, layer: dict[str, object], verdict: str) -> None:
    assert verdict == scan_bytes(keras_zip(asm, layer)).verdict.value


def test_skops_report_lists_the_approved_types() -> None:
    import skops.io as sio
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    features, labels = load_iris(return_X_y=True)
    report = scan_bytes(sio.dumps(DecisionTreeClassifier(max_depth=2).fit(features, labels)))
    assert (report.verdict, report.format) == (Verdict.SAFE, "skops")
    assert report.trusted_types == ("sklearn.tree._tree.Tree",)
    assert report.to_json()["trusted_types"] == ["sklearn.tree._tree.Tree"]


def test_skops_without_a_valid_schema_is_an_error(asm: ModuleType) -> None:
    report = scan_bytes(asm.zip_bytes({"schema.json": b"[1, 2]"}))
    assert (report.verdict, report.format) == (Verdict.ERROR, "skops")


def test_xgboost_ubjson_with_a_count_past_the_data_is_an_error() -> None:
    data = b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner[$d#L\x00\x00\x00\x00\xff\xff\xff\xff}"
    assert (
        scan_bytes(data).format,
        scan_bytes(data).verdict,
    ) == ("xgboost-ubj", Verdict.ERROR)


def test_lightgbm_tree_count_must_match_tree_sizes() -> None:
    text = (
        "tree\nversion=v4\nmax_feature_idx=3\ntree_sizes=10 10\n\n"
        "Tree=0\nnum_leaves=1\nleaf_value=0.5\n\nend of trees\n"
    )
    assert scan_bytes(text.encode()).verdict == Verdict.ERROR


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"PK\x03\x04" + b"\x00" * 30, "zip"),
        (b"GGUF\x03\x00\x00\x00", "gguf"),
        (b"\x93NUMPY\x01\x00", "numpy"),
        (b"\x80\x04\x95", "pickle"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\x89HDF\r\n\x1a\n", "hdf5"),
        (struct.pack("<Q", 20) + b'{"a": 1}', "safetensors"),
        (b"a README, not a model\n", "text"),
        (bytes(range(256)), "unknown"),
    ],
)  # fmt: skip
def test_detect_format_by_content(data: bytes, kind: str) -> None:
    assert kind == detect_format(data)


def test_names_do_not_decide_the_format(iris_onnx: bytes) -> None:
    report = scan_bytes(iris_onnx, "model.pkl")
    assert report.format == "onnx"


def test_hdf5_with_user_block_is_found() -> None:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=512) as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Lambda", "config": {}})
    assert scan_bytes(buffer.getvalue()).verdict == Verdict.MALICIOUS


def test_hdf5_user_block_holding_a_pickle_is_malicious(asm: ModuleType) -> None:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=512) as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {}})
    payload = asm.os_system_p0()
    data = payload + buffer.getvalue()[len(payload) :]
    report = scan_bytes(data)
    assert report.format == "keras-h5"
    assert report.verdict == Verdict.MALICIOUS


def _xgboost_document() -> dict[str, Any]:
    import xgboost as xgb

    rng = np.random.default_rng(0)
    rows = rng.random((64, 3))
    booster = xgb.train(
        {"max_depth": 2, "nthread": 1}, xgb.DMatrix(rows, label=rows[:, 0]), num_boost_round=3
    )
    document: dict[str, Any] = json.loads(bytes(booster.save_raw("json")))
    return document


def _last_tree(document: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = document["learner"]["gradient_booster"]["model"]["trees"][-1]
    return tree


@pytest.mark.parametrize(
    ("key", "change", "expected"),
    [
        ("split_indices", lambda values: [3, *values[1:]], "tree 2 node 0 splits on a missing"),
        ("parents", lambda values: values[1:], "tree 2: parents has"),
        ("right_children", lambda values: [99, *values[1:]], "tree 2 node 0 points outside"),
        ("left_children", lambda values: [1.0, *values[1:]], "3 trees, structure consistent"),
    ],
    ids=["feature", "short-parents", "child-outside", "float-child-read-as-int"],
)
def test_an_xgboost_json_tree_is_checked_from_what_is_kept_of_it_as_it_is_parsed(
    key: str, change: Callable[[list[Any]], list[Any]], expected: str
) -> None:
    # The scan keeps each tree's checked arrays compactly as the JSON is parsed; the feature
    # count it checks them against comes after the trees in XGBoost's key order.
    document = _xgboost_document()
    tree = _last_tree(document)
    tree[key] = change(tree[key])

    report = scan_bytes(json.dumps(document).encode())

    assert report.format == "xgboost-json"
    assert expected in " ".join(finding.message for finding in report.findings)
