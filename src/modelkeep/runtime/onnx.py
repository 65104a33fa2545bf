"""ONNX models: the push-time check and the ONNX Runtime session that serves them.

ONNX is served because loading it cannot run code, provided three doors stay shut: custom
operator domains (they need native libraries), external data (it makes the runtime read files
named by the model) and non-tensor inputs or outputs (the V2 protocol only carries tensors).
:func:`inspect_onnx` checks those before any runtime sees the bytes, then asks ONNX Runtime
itself for the signature so it is exactly what the session will enforce. :meth:`OnnxModel.load`
runs the same checks, so the server never loads what a push would have refused.

Push and load take one way into ONNX Runtime: the large weights are split off the bytes
unparsed (``_onnx_wire``) and the small graph handed over with each of them marked external.
Given the plaintext in a private tmpfs file (a push's smoke load, a served version's load),
ONNX Runtime maps the weights from it: a smoke load, which does not pre-pack, then holds the
model once; a served load copies the weights and lets go of the file. Given bytes (no usable
tmpfs), it gets the weights as arrays over them and copies them once (bench/README.md,
``make bench-storage``).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from modelkeep.errors import ConfigError, InvalidInput, ModelRefused
from modelkeep.runtime._onnx_wire import MalformedModel, Split, split_weights
from modelkeep.runtime._plaintext_file import PlaintextFile
from modelkeep.runtime.signature import ModelSignature, TensorSpec

__all__ = ["STANDARD_DOMAINS", "OnnxModel", "inspect_onnx"]

STANDARD_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}
)

_TENSOR = onnx.TensorProto
_V2_BY_ONNX_ELEM: dict[int, str] = {
    _TENSOR.BOOL: "BOOL",
    _TENSOR.UINT8: "UINT8",
    _TENSOR.UINT16: "UINT16",
    _TENSOR.UINT32: "UINT32",
    _TENSOR.UINT64: "UINT64",
    _TENSOR.INT8: "INT8",
    _TENSOR.INT16: "INT16",
    _TENSOR.INT32: "INT32",
    _TENSOR.INT64: "INT64",
    _TENSOR.FLOAT16: "FP16",
    _TENSOR.FLOAT: "FP32",
    _TENSOR.DOUBLE: "FP64",
    _TENSOR.STRING: "BYTES",
}
_V2_BY_ORT_TYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_ZIPMAP_HINT = (
    "; a scikit-learn classifier exported with skl2onnx has this output unless you "
    "convert with options={'zipmap': False}"
)
_RUN_FAILED = "inference failed: the input does not fit the model"


def inspect_onnx(data: bytes) -> ModelSignature:
    """Check ONNX bytes for everything modelkeep refuses and return the served signature.

    Raises ``ModelRefused`` with a message the publisher can act on when the bytes are not a
    complete ONNX model, use external data, use an operator domain outside
    :data:`STANDARD_DOMAINS`, have a non-tensor input or output or an element type the V2
    protocol cannot carry, or when ONNX Runtime cannot load them. Nothing is read from disk.
    """
    return OnnxModel.load(data).signature


class OnnxModel:
    """A verified ONNX model held in an ONNX Runtime CPU session; :meth:`run` is thread safe."""

    __slots__ = ("_all_outputs", "_output_names", "_session", "signature")

    def __init__(self, session: ort.InferenceSession, signature: ModelSignature) -> None:
        self._session = session
        self.signature = signature
        self._output_names = tuple(spec.name for spec in signature.outputs)
        self._all_outputs = list(self._output_names)  # ONNX Runtime reads it, never changes it

    @classmethod
    def load(
        cls, data: bytes | PlaintextFile, *, threads: int = 1, prepack: bool = True
    ) -> OnnxModel:
        """Check ``data`` like :func:`inspect_onnx` and load it on the CPU provider.

        ``data`` is the model's bytes, or its plaintext in a private tmpfs file
        (:mod:`._plaintext_file`), which ONNX Runtime then maps instead of copying.
        ``threads`` is ONNX Runtime's intra-op thread count (0 = its default); inter-op
        parallelism is fixed at 1 because the server already runs requests concurrently.
        ``prepack=False`` keeps ONNX Runtime from copying weights into pre-packed layouts: a
        load for a smoke run then costs no memory beyond the file, but a MatMul runs slower
        and may give results that differ in the last bits.
        """
        if type(threads) is not int or threads < 0:
            raise ConfigError("the ONNX runtime thread count must be an integer >= 0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: warnings would repeat per load
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if isinstance(data, PlaintextFile):
            session = _mapped_session(data, options)
        else:
            session = _in_memory_session(data, options)
        return cls(session, _session_signature(session))

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the outputs asked for (default all) in signature order.

        Raises ``InvalidInput`` for an unknown output name or when the runtime rejects the
        inputs; the runtime's own message is never passed on.
        """
        if output_names is None:
            names = self._all_outputs
        else:
            wanted = set(output_names)
            unknown = wanted.difference(self._output_names)
            if unknown:
                raise InvalidInput(f"unknown output {sorted(unknown)[0][:64]!r}")
            names = [name for name in self._output_names if name in wanted]
        try:
            results = self._session.run(names, inputs if type(inputs) is dict else dict(inputs))
        except Exception as exc:  # ORT raises bare pybind11 exception types
            raise InvalidInput(_RUN_FAILED) from exc
        return dict(zip(names, results, strict=True))


def _mapped_session(plain: PlaintextFile, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session whose split-off weights ONNX Runtime maps from ``plain`` (its pages are the
    plaintext's own: nothing is copied for a weight it does not pre-pack)."""
    model, split = _check_model_bytes(plain.buffer, whole=False)
    places = {
        name: {
            "location": plain.name,
            "offset": str(split.offsets[name]),
            "length": str(weight.nbytes),
        }
        for name, weight in split.weights.items()
    }
    del split  # its weights are views over the mapping; the runtime maps the file itself
    _mark_external(model, places)
    # The skeleton goes next to the plaintext (ONNX Runtime resolves external data relative to
    # the model's own file and refuses any other place), as private as the plaintext.
    path = plain.path + ".onnx"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(model.SerializeToString())
        del model
        # 4. The ONNX checker accepts the model: the graph from the file, the weights' places
        #    in the plaintext (inside the directory, sized as their dims say; step 1 checked the
        #    bytes there against each tensor's type and dims).
        _run_checker(path)
        try:
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises bare pybind11 exception types
            raise ModelRefused("the ONNX runtime could not load this model") from exc
    finally:
        os.unlink(path)


def _in_memory_session(data: bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session built from bytes in memory: the large weights reach ONNX Runtime as arrays
    over ``data``, which it copies once into its graph (instead of copying the whole model into
    a string and parsing that: about 2x the model on top of the bytes; this way about 1.3x, the
    rest being one tensor at a time while weights are pre-packed)."""
    model, split = _check_model_bytes(data, whole=True)
    names = list(split.weights)
    options.add_external_initializers(
        names, [ort.OrtValue.ortvalue_from_numpy(split.weights[name]) for name in names]
    )
    graph = _mark_external(
        model, {name: {"location": _WEIGHT_LOCATION} for name in names}
    ).SerializeToString()
    del model, split
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises bare pybind11 exception types
        raise ModelRefused("the ONNX runtime could not load this model") from exc


def _check_model_bytes(data: bytes | mmap.mmap, *, whole: bool) -> tuple[onnx.ModelProto, Split]:
    """The model with its large weights hollow, and those weights (views over ``data``).

    ``whole=False`` leaves step 4 (the ONNX checker, which would parse every weight) to the
    caller, who runs it on the skeleton with the weights marked external."""
    # Each step guarantees what the next one relies on; the order matters.
    # 1. The bytes parse as a ModelProto with a graph (protobuf only; no path, no external
    #    data). The large weights are split off first and the rest parsed, so the model is not
    #    held twice (the weights' own checks are the split's: type, dims and size agree).
    if not isinstance(data, bytes | bytearray | memoryview | mmap.mmap) or len(data) == 0:
        raise ModelRefused("the file is empty or not an ONNX model")
    if not isinstance(data, bytes | mmap.mmap):
        data = bytes(data)
    try:
        split = split_weights(data)
        model = onnx.load_model_from_string(split.skeleton, format="protobuf")
    except MalformedModel as exc:
        if "share a name" in str(exc):
            raise ModelRefused("two initializers of the model's graph share a name") from exc
        raise ModelRefused("the file is not an ONNX model or is truncated") from exc
    except Exception as exc:
        raise ModelRefused("the file is not an ONNX model or is truncated") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise ModelRefused(
            "the file is not an ONNX model (no graph or an empty one) or is truncated"
        )

    # 2. No tensor anywhere points at external data: the runtime would open the file it names.
    #    This must precede the checker, which looks for such files on disk.
    for tensor in _all_tensors(model):
        if tensor.data_location == _TENSOR.EXTERNAL or len(tensor.external_data) > 0:
            raise ModelRefused(
                "the model stores tensors as external data; save it as a single file "
                "(onnx.save_model(model, path, save_as_external_data=False))"
            )

    # 3. Only standard operator domains: anything else needs a native library to run.
    _check_domains(model)

    # 4. The ONNX checker accepts the model, weights and all (it parses the bytes in C++ and
    #    frees that copy on return).
    if whole:
        _run_checker(bytes(data))  # no copy: data is bytes here

    # 5. Every served input and output is a tensor of a type the V2 protocol carries.
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if kind == "input" and value.name in initializer_names:
                continue  # an overridable constant, not a served input
            _check_value_type(kind, value)
    return model, split


def _run_checker(model: bytes | str) -> None:
    # Its message's first line is the publisher's own content.
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "invalid"
        raise ModelRefused(f"the ONNX checker rejected this model: {detail}") from exc


def _mark_external(
    model: onnx.ModelProto, places: Mapping[str, Mapping[str, str]]
) -> onnx.ModelProto:
    """Mark each hollow initializer named in ``places`` as external data with those entries:
    a file ``location`` (in the model file's directory) with ``offset`` and ``length`` where
    ONNX Runtime maps the weight itself, or only :data:`_WEIGHT_LOCATION` where the weight is
    handed over with ``add_external_initializers``, which replaces only tensors marked
    external. The publisher's own external references were refused in step 2, before this."""
    for tensor in model.graph.initializer:
        place = places.get(tensor.name)
        if place is not None:
            tensor.data_location = _TENSOR.EXTERNAL
            for key, value in place.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return model


# Where the graph handed to ONNX Runtime says a weight given with add_external_initializers
# lives. It replaces those tensors before anything reads them, and every tensor so marked is one
# given (exactly the split-off weights), so no file of this name is ever looked for.
_WEIGHT_LOCATION = "modelkeep-weight"


def _check_value_type(kind: str, value: onnx.ValueInfoProto) -> None:
    which = value.type.WhichOneof("value")
    if which != "tensor_type":
        shown = which.removesuffix("_type") if which else "untyped"
        hint = _ZIPMAP_HINT if kind == "output" and which in ("sequence_type", "map_type") else ""
        raise ModelRefused(
            f"{kind} {value.name!r} is a {shown}, not a tensor; the server only serves "
            f"tensors{hint}"
        )
    elem = value.type.tensor_type.elem_type
    if elem not in _V2_BY_ONNX_ELEM:
        type_name = _TENSOR.DataType.Name(elem) if elem in _TENSOR.DataType.values() else elem
        raise ModelRefused(
            f"{kind} {value.name!r} has element type {type_name}, which the V2 protocol "
            "cannot carry; cast it to a supported type (e.g. FLOAT) in the graph"
        )


def _check_domains(model: onnx.ModelProto) -> None:
    # A node in a non-standard domain is allowed only as a call to a function defined in the
    # model itself: those bodies are walked below, so nothing outside ONNX can run.
    local_functions = {(function.domain, function.name) for function in model.functions}
    local_domains = {domain for domain, _ in local_functions}
    imports = list(model.opset_import)
    for function in model.functions:
        imports.extend(function.opset_import)
    for opset in imports:
        if opset.domain not in STANDARD_DOMAINS and opset.domain not in local_domains:
            raise ModelRefused(_domain_message(opset.domain))
    for node in _all_nodes(model):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in (
            local_functions
        ):
            raise ModelRefused(_domain_message(node.domain))


def _domain_message(domain: str) -> str:
    shown = domain if len(domain) <= 100 else domain[:100] + "..."
    return (
        f"the model uses operators from the custom domain {shown!r}; only standard ONNX "
        f"domains are served ({', '.join(repr(d) for d in sorted(STANDARD_DOMAINS))}); "
        "re-export without custom or contrib operators"
    )


def _root_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield model.graph
    for info in model.training_info:
        yield info.initialization
        yield info.algorithm


def _graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                yield from _graph_nodes(subgraph)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in _root_graphs(model):
        yield from _graph_nodes(graph)
    for function in model.functions:
        for node in function.node:
            yield node
            for attribute in node.attribute:
                for subgraph in _attribute_graphs(attribute):
                    yield from _graph_nodes(subgraph)


def _attribute_graphs(attribute: onnx.AttributeProto) -> Iterator[onnx.GraphProto]:
    if attribute.HasField("g"):
        yield attribute.g
    yield from attribute.graphs


def _attribute_tensors(attribute: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    sparse = list(attribute.sparse_tensors)
    if attribute.HasField("sparse_tensor"):
        sparse.append(attribute.sparse_tensor)
    for tensor in sparse:
        yield tensor.values
        yield tensor.indices
    for subgraph in _attribute_graphs(attribute):
        yield from _graph_tensors(subgraph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from _attribute_tensors(attribute)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in _root_graphs(model):
        yield from _graph_tensors(graph)
    for function in model.functions:
        for attribute in function.attribute_proto:
            yield from _attribute_tensors(attribute)
        for node in function.node:
            for attribute in node.attribute:
                yield from _attribute_tensors(attribute)


def _session_signature(session: ort.InferenceSession) -> ModelSignature:
    def spec(kind: str, arg: Any) -> TensorSpec:
        datatype = _V2_BY_ORT_TYPE.get(arg.type)
        if datatype is None:
            raise ModelRefused(f"{kind} {arg.name!r} is not a tensor the V2 protocol can carry")
        shape = tuple(dim if type(dim) is int and dim >= 0 else -1 for dim in arg.shape or ())
        return TensorSpec(name=arg.name, datatype=datatype, shape=shape)

    return ModelSignature(
        inputs=tuple(spec("input", arg) for arg in session.get_inputs()),
        outputs=tuple(spec("output", arg) for arg in session.get_outputs()),
    )
