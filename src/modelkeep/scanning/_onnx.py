"""ONNX models: where they read files, which operators they need, and what they allocate.

Loading ONNX runs no Python, but three things in a model still reach outside it:

- external data: a tensor whose bytes live in a file the model names. An absolute name, a
  ``..``, or (scanning a directory or archive) a symlink or hardlink makes the runtime read
  any file on the server: malicious. A plain relative file next to the model is checked for
  existence and size;
- operators outside the standard domains (:data:`modelkeep.runtime.onnx.STANDARD_DOMAINS`)
  need native libraries: malicious, since a model cannot bring its own safely;
- sizes: a tensor declaring more elements than ``max_tensor_elements``, or operators that build
  tensors from constant inputs (ConstantOfShape, Expand, Tile, Range, Resize, Upsample, Pad,
  OneHot, RandomNormal/Uniform) beyond ``max_alloc_elements``, alone or together: a resource
  bomb that exhausts the server's memory on the first request.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from modelkeep.runtime._onnx_wire import MalformedModel, split_weights
from modelkeep.runtime.onnx import STANDARD_DOMAINS
from modelkeep.scanning._context import Buffer, Scan, Siblings, show

__all__ = ["scan_onnx"]

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_CONSTANT = 1_000_000  # constants larger than this are not decoded for the allocation check
_ALLOCATING = frozenset(
    {
        "ConstantOfShape",
        "Expand",
        "Tile",
        "Range",
        "Resize",
        "Upsample",
        "Pad",
        "OneHot",
        "RandomNormal",
        "RandomUniform",
    }
)


def scan_onnx(
    scan: Scan,
    data: Buffer,
    location: str,
    depth: int,
    siblings: Siblings | None = None,
    base: str = "",
) -> str:
    """Check an ONNX model; ``siblings``/``base`` resolve external data next to it."""
    import onnx

    model = onnx.ModelProto()
    try:
        # The large weights are split off unparsed (views over ``data``) and the rest parsed,
        # so a large model is held once while it is scanned, not twice (the buffer and the
        # parsed tensors); the split checks that each weight's size fits its type and dims.
        split = split_weights(data if isinstance(data, bytes) else bytes(data))
        model.ParseFromString(split.skeleton)
    except MalformedModel as exc:
        scan.high(location, f"not a valid ONNX model ({exc})")
        return "onnx"
    except Exception as exc:  # DecodeError, RuntimeError or ValueError by protobuf backend
        scan.high(location, f"not a valid ONNX model ({type(exc).__name__})")
        return "onnx"
    if not model.HasField("graph"):
        scan.high(location, "the ONNX model has no graph")
        return "onnx"
    before = scan.finding_count
    _check_domains(scan, model, location)
    for tensor, where in _tensors(model, location):
        _check_tensor(scan, tensor, where, siblings, base)
    _check_allocations(scan, model, location, split.weights)
    if scan.finding_count == before:
        scan.info(location, "standard ONNX operators, no external data, sizes within limits")
    return "onnx"


# -- operators --------------------------------------------------------------------------------


def _check_domains(scan: Scan, model: Any, location: str) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    local_domains = {domain for domain, _ in local}
    opsets = list(model.opset_import) + [o for f in model.functions for o in f.opset_import]
    for opset in opsets:
        if opset.domain not in STANDARD_DOMAINS and opset.domain not in local_domains:
            scan.critical(location, _domain_message(opset.domain))
    for node, where in _nodes(model, location):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            scan.critical(f"{where} ({show(node.op_type, 40)})", _domain_message(node.domain))


def _domain_message(domain: str) -> str:
    return (
        f"operators from the custom domain {show(domain, 80)!r}: they run native code from "
        "a library outside ONNX; re-export the model with standard operators only"
    )


def _graphs(graph: Any, where: str) -> Iterator[tuple[Any, str]]:
    yield graph, where
    for index, node in enumerate(graph.node):
        for attribute in node.attribute:
            subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for sub in subgraphs:
                yield from _graphs(sub, f"{where} > node {index} {show(attribute.name, 20)}")


def _all_graphs(model: Any, location: str) -> Iterator[tuple[Any, str]]:
    yield from _graphs(model.graph, location)
    for index, info in enumerate(model.training_info):
        yield from _graphs(info.initialization, f"{location} > training {index}")
        yield from _graphs(info.algorithm, f"{location} > training {index}")


def _nodes(model: Any, location: str) -> Iterator[tuple[Any, str]]:
    for graph, where in _all_graphs(model, location):
        for index, node in enumerate(graph.node):
            yield node, f"{where} @ node {index}"
    for function in model.functions:
        for index, node in enumerate(function.node):
            yield node, f"{location} > function {show(function.name, 40)} @ node {index}"
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.HasField("g") else []
                for sub in subgraphs + list(attribute.graphs):
                    for sub_graph, sub_where in _graphs(sub, f"{location} > function"):
                        for i, inner in enumerate(sub_graph.node):
                            yield inner, f"{sub_where} @ node {i}"


# -- tensors ----------------------------------------------------------------------------------


def _tensors(model: Any, location: str) -> Iterator[tuple[Any, str]]:
    def from_attribute(attribute: Any, where: str) -> Iterator[tuple[Any, str]]:
        if attribute.HasField("t"):
            yield attribute.t, where
        for tensor in attribute.tensors:
            yield tensor, where
        sparse = list(attribute.sparse_tensors)
        if attribute.HasField("sparse_tensor"):
            sparse.append(attribute.sparse_tensor)
        for item in sparse:
            yield item.values, where
            yield item.indices, where

    for graph, where in _all_graphs(model, location):
        for tensor in graph.initializer:
            yield tensor, f"{where} @ initializer {show(tensor.name, 60)}"
        for sparse in graph.sparse_initializer:
            yield sparse.values, f"{where} @ sparse initializer"
            yield sparse.indices, f"{where} @ sparse initializer"
        for index, node in enumerate(graph.node):
            for attribute in node.attribute:
                yield from from_attribute(attribute, f"{where} @ node {index}")
    for function in model.functions:
        for attribute in function.attribute_proto:
            yield from from_attribute(attribute, f"{location} > function {show(function.name, 40)}")
        for node in function.node:
            for attribute in node.attribute:
                yield from from_attribute(
                    attribute, f"{location} > function {show(function.name, 40)}"
                )


def _check_tensor(
    scan: Scan, tensor: Any, where: str, siblings: Siblings | None, base: str
) -> None:
    import onnx

    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        scan.high(where, "the tensor has a negative dimension")
        return
    count = math.prod(dims)
    if count > scan.limits.max_tensor_elements:
        scan.critical(
            where,
            f"the tensor declares {count} elements, over the limit of "
            f"{scan.limits.max_tensor_elements}: a runtime allocates it when loading (a "
            "resource bomb)",
        )
        return
    external = {entry.key: entry.value for entry in tensor.external_data}
    if tensor.data_location == onnx.TensorProto.EXTERNAL or external:
        _check_external(scan, external, where, siblings, base)
        return
    elem = tensor.data_type
    if tensor.HasField("raw_data") and elem not in (onnx.TensorProto.STRING, 0):
        bits = _ELEMENT_BITS.get(elem)
        if bits is not None and len(tensor.raw_data) * 8 != -(-count * bits // 8) * 8:
            scan.high(
                where,
                f"the tensor declares {count} elements but holds {len(tensor.raw_data)} bytes",
            )


def _check_external(
    scan: Scan, external: dict[str, str], where: str, siblings: Siblings | None, base: str
) -> None:
    raw: str | bytes = external.get("location", "")
    # protobuf hands out invalid UTF-8 in a string field as bytes.
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    unified = name.replace("\\", "/")
    if not name:
        scan.high(where, "external data without a file name")
        return
    if unified.startswith("/") or _DRIVE.match(unified) or unified.startswith("//"):
        scan.critical(
            where,
            f"external data in {show(name, 100)!r}, an absolute path: the "
            "runtime would read any file on the server",
        )
        return
    if ".." in unified.split("/"):
        scan.critical(
            where,
            f"external data in {show(name, 100)!r} climbs out of the model's "
            "directory with '..': the runtime would read files outside it",
        )
        return
    if siblings is None:
        scan.high(
            where,
            f"the tensor's data is in a separate file ({show(name, 80)!r}) that is "
            "not part of what was scanned; scan the model's directory, or save the model "
            "as one file (save_as_external_data=False)",
        )
        return
    reference = posixpath.normpath(unified)
    sibling = siblings.lookup(base, reference)
    # Whatever it is, the file is this model's data: judged here, not scanned as a model.
    siblings.mark_data(base, reference)
    if sibling.kind in ("symlink", "hardlink"):
        scan.critical(
            where,
            f"external data in {show(name, 80)!r}, which is a {sibling.kind}: "
            "the runtime would read whatever file it points at",
        )
        return
    if sibling.kind != "file":
        scan.high(where, f"external data in {show(name, 80)!r}, which is {sibling.kind}")
        return
    try:
        offset = int(external.get("offset", "0"))
        length = int(external["length"]) if "length" in external else sibling.size - offset
    except ValueError:
        scan.high(where, "external data with a non-numeric offset or length")
        return
    if offset < 0 or length < 0 or offset + length > sibling.size:
        scan.high(
            where,
            f"external data [{offset}, {offset + length}) lies outside "
            f"{show(name, 80)!r} ({sibling.size} bytes)",
        )
    else:
        scan.info(where, f"external data in {show(name, 80)!r}, a regular file next to the model")


_ELEMENT_BITS = {
    1: 32,
    2: 8,
    3: 8,
    4: 16,
    5: 16,
    6: 32,
    7: 64,
    9: 8,
    10: 16,
    11: 64,
    12: 32,
    13: 64,
    14: 64,
    15: 128,
    16: 16,
    17: 8,
    18: 8,
    19: 8,
    20: 8,
    21: 4,
    22: 4,
    23: 4,
}


# -- allocations from constants ---------------------------------------------------------------


def _check_allocations(
    scan: Scan, model: Any, location: str, weights: dict[str, np.ndarray]
) -> None:
    total = 0
    limit = scan.limits.max_alloc_elements
    for index, (graph, where) in enumerate(_all_graphs(model, location)):
        allocating = [
            (index, node)
            for index, node in enumerate(graph.node)
            if node.op_type in _ALLOCATING and node.domain in ("", "ai.onnx")
        ]
        # Only what these nodes read is decoded: every small tensor of a large model as Python
        # floats would cost many times the model's size.
        constants = _constants(
            graph,
            {name for _, node in allocating for name in node.input},
            weights if index == 0 else {},  # only the main graph's weights are split off
        )
        shapes = _static_shapes(graph, constants)
        for index, node in allocating:
            elements = _allocation(node, constants, shapes)
            if elements is None:
                continue
            total += elements
            if elements > limit:
                scan.critical(
                    f"{where} @ node {index} ({node.op_type})",
                    f"{node.op_type} builds a tensor of {elements} elements from constant "
                    f"inputs, over the limit of {limit} (max_alloc_elements): a memory bomb "
                    "that takes the server down on the first request",
                )
    if total > limit:
        scan.critical(
            location,
            f"operators with constant inputs allocate {total} elements "
            f"together, over the limit of {limit} (max_alloc_elements)",
        )


def _constants(
    graph: Any, wanted: set[str], weights: dict[str, np.ndarray]
) -> dict[str, list[float]]:
    """The values of the constants (initializers, Constant nodes) named in ``wanted``; an
    initializer named in ``weights`` (split off, hollow in ``graph``) is read from there."""
    import onnx
    from onnx import numpy_helper

    values: dict[str, list[float]] = {}

    def keep(name: str, tensor: Any, split_off: np.ndarray | None = None) -> None:
        if (
            name not in wanted
            or math.prod(tensor.dims) > _MAX_CONSTANT
            or tensor.data_location == onnx.TensorProto.EXTERNAL
        ):
            return
        try:
            array = numpy_helper.to_array(tensor) if split_off is None else split_off
        except Exception:  # malformed tensors are reported by _check_tensor
            return
        if array.dtype.kind in "iuf":
            values[name] = [float(v) for v in array.reshape(-1)]

    for tensor in graph.initializer:
        keep(tensor.name, tensor, weights.get(tensor.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in wanted:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    keep(node.output[0], attribute.t)
                elif attribute.name == "value_ints":
                    values[node.output[0]] = [float(v) for v in attribute.ints]
                elif attribute.name == "value_int":
                    values[node.output[0]] = [float(attribute.i)]
                elif attribute.name == "value_floats":
                    values[node.output[0]] = [float(v) for v in attribute.floats]
                elif attribute.name == "value_float":
                    values[node.output[0]] = [float(attribute.f)]
    return values


def _static_shapes(graph: Any, constants: dict[str, list[float]]) -> dict[str, int]:
    """Element counts of values whose shape is fully known (inputs, initializers)."""
    counts: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info):
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
            counts[value.name] = math.prod(max(d.dim_value, 0) for d in dims)
    for tensor in graph.initializer:
        counts[tensor.name] = math.prod(tensor.dims)
    for name, values in constants.items():
        counts.setdefault(name, len(values))
    return counts


def _allocation(node: Any, constants: dict[str, list[float]], shapes: dict[str, int]) -> int | None:
    inputs = list(node.input)

    def const(index: int) -> list[float] | None:
        return constants.get(inputs[index]) if index < len(inputs) and inputs[index] else None

    def known(index: int) -> int:
        return shapes.get(inputs[index], 1) if index < len(inputs) else 1

    op = node.op_type
    if op in ("ConstantOfShape", "Expand"):
        shape = const(0 if op == "ConstantOfShape" else 1)
        return _prod(shape)
    if op == "Tile":
        repeats = _prod(const(1))
        return None if repeats is None else repeats * known(0)
    if op == "Range":
        start, limit, delta = const(0), const(1), const(2)
        if not (start and limit and delta) or delta[0] == 0:
            return None
        return max(0, math.ceil((limit[0] - start[0]) / delta[0]))
    if op in ("Resize", "Upsample"):
        sizes = const(3) if op == "Resize" else None
        if sizes:
            return _prod(sizes)
        scales = const(2) if op == "Resize" and len(inputs) > 2 else const(1)
        if not scales:
            return None
        product = math.prod(max(s, 0.0) for s in scales)
        return math.ceil(product * known(0))
    if op == "Pad":
        pads = const(1)
        if not pads or len(pads) % 2:
            return None
        # At least every padded dimension times one: a lower bound without the input's shape.
        rank = len(pads) // 2
        padded = math.prod(1 + max(pads[i], 0.0) + max(pads[i + rank], 0.0) for i in range(rank))
        return max(known(0), math.ceil(padded))
    if op == "OneHot":
        depth = const(1)
        return None if not depth else int(max(depth[0], 0)) * known(0)
    # RandomNormal / RandomUniform: the shape is an attribute.
    for attribute in node.attribute:
        if attribute.name == "shape":
            return _prod([float(v) for v in attribute.ints])
    return None


def _prod(values: list[float] | None) -> int | None:
    if values is None:
        return None
    return math.prod(max(int(v), 0) for v in values)
