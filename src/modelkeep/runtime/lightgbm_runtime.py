"""LightGBM boosters saved in LightGBM's text model format (``Booster.save_model``).

Only the text format is loaded: it is plain data, and LightGBM has no code-running loader
behind it. But LightGBM's text parser trusts the file. A ``tree_sizes`` entry larger than the
tree, a tree line without ``=``, or a child index outside the tree make it read past the
buffer, loop for ever or abort the whole process (an error raised inside its parallel tree
parser terminates the interpreter). So :func:`_check_text_model` re-reads the layout the parser
relies on, in Python, before LightGBM sees a byte: every tree sits where ``tree_sizes`` says and
ends inside it, every field the predictor indexes with is present, of the right length and in
range, and every tree is a tree.

The served signature: ``input`` FP32 ``[-1, num_feature]``; ``predictions`` FP32 ``[-1]``
(``[-1, num_class]`` for multiclass objectives); for ``binary``, ``multiclass`` and
``multiclassova`` also ``label`` INT64 ``[-1]`` (probability above 0.5, or the arg-max).
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from modelkeep.errors import InvalidInput, ModelRefused
from modelkeep.runtime.base import (
    RUN_FAILED,
    ModelSource,
    check_feature_count,
    check_threads,
    empty_outputs,
    feature_matrix,
    matrix_signature,
    read_whole,
    select_outputs,
)
from modelkeep.runtime.signature import ModelSignature, TensorSpec

__all__ = ["LightGBMModel"]

_SAVE_HINT = "save the booster as text with booster.save_model('model.txt')"
_MULTICLASS = frozenset({"multiclass", "multiclassova"})
_INT = re.compile(rb"-?[0-9]{1,10}")
_SIZE = re.compile(rb"[0-9]{1,15}")
_FLOAT = re.compile(
    rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I
)
# LightGBM's tree parser reads at most this many "key=value" lines per tree.
_MAX_TREE_KEYS = 22
_MAX_LEAVES = 1 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Header:
    num_class: int
    num_feature: int
    objective: str  # the objective's name ("" when the file names none, e.g. a custom one)


class LightGBMModel:
    """A checked LightGBM booster; :meth:`run` takes a lock.

    LightGBM builds a predictor over the shared booster on every call and that construction
    writes booster state without synchronisation (LightGBM issue #6142, still open), so only
    one prediction runs at a time per model; each may use ``threads`` OpenMP threads.
    """

    __slots__ = ("_booster", "_header", "_lock", "_threads", "_width", "signature")

    def __init__(self, booster: lgb.Booster, header: _Header, threads: int) -> None:
        self._booster = booster
        self._header = header
        self._threads = threads
        self._lock = threading.Lock()
        self._width = header.num_class
        shape: tuple[int, ...] = (-1,) if self._width == 1 else (-1, self._width)
        outputs = [TensorSpec(name="predictions", datatype="FP32", shape=shape)]
        if header.objective == "binary" or header.objective in _MULTICLASS:
            outputs.append(TensorSpec(name="label", datatype="INT64", shape=(-1,)))
        self.signature: ModelSignature = matrix_signature(header.num_feature, outputs)

    @classmethod
    def load(cls, data: ModelSource, *, threads: int = 1) -> LightGBMModel:
        """Check LightGBM text-model bytes (or a seekable file of them), then load them from
        memory.

        Raises ``ModelRefused`` when the bytes are not a LightGBM text model (binary, JSON
        dumps and pickles included), when its layout or a tree is malformed, or when LightGBM
        cannot load it.
        """
        threads = check_threads(threads, "LightGBM")
        whole = read_whole(data.tobytes() if isinstance(data, memoryview) else data)
        header = _check_text_model(whole)
        # LightGBM loads from memory only out of a str (which it encodes to UTF-8 once more).
        # A file read here is let go of as soon as it is text: the model is then held twice
        # while LightGBM parses it (the text and its encoding), not three times.
        text = str(whole, "utf-8")
        del whole
        try:
            booster = lgb.Booster(model_str=text)
        except Exception as exc:  # LightGBMError; its message may quote the file
            raise ModelRefused(f"LightGBM could not load this model; {_SAVE_HINT}") from exc
        if (
            booster.num_feature() != header.num_feature
            or booster.num_model_per_iteration() != header.num_class
        ):
            raise ModelRefused("the LightGBM model disagrees with itself on its shape")
        return cls(booster, header, threads)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Predict; returns the outputs asked for (default all) in signature order.

        Raises ``InvalidInput`` for an unknown output name or an input LightGBM rejects; its
        own message is never passed on.
        """
        names = select_outputs(self.signature, output_names)
        matrix = feature_matrix(inputs, self._header.num_feature)
        rows = matrix.shape[0]
        if rows == 0:
            return empty_outputs(self.signature, names)
        try:
            with self._lock:
                raw = self._booster.predict(matrix, num_threads=self._threads)
        except Exception as exc:
            raise InvalidInput(RUN_FAILED) from exc
        predictions = np.asarray(raw, dtype=np.float32)
        if predictions.size != rows * self._width:
            raise InvalidInput(RUN_FAILED)
        predictions = predictions.reshape((rows,) if self._width == 1 else (rows, self._width))
        result = {"predictions": predictions}
        if "label" in names:
            if self._width == 1:
                result["label"] = (predictions > 0.5).astype(np.int64)
            else:
                result["label"] = np.asarray(np.argmax(predictions, axis=1), dtype=np.int64)
        return {name: result[name] for name in names}


def _refuse(detail: str) -> ModelRefused:
    return ModelRefused(f"the LightGBM model is malformed: {detail}; {_SAVE_HINT}")


def _tokens(value: bytes, pattern: re.Pattern[bytes], count: int | None, what: str) -> list[bytes]:
    # LightGBM splits number lists on single spaces and drops empty pieces; anything else in
    # a piece (a tab, a stray letter) would make its fast parsers read a different number.
    tokens = [token for token in value.split(b" ") if token]
    if count is not None and len(tokens) != count:
        raise _refuse(f"{what} has {len(tokens)} values instead of {count}")
    if not all(pattern.fullmatch(token) for token in tokens):
        raise _refuse(f"{what} holds something other than numbers")
    return tokens


def _ints(value: bytes, count: int | None, what: str) -> np.ndarray:
    return np.array([int(t) for t in _tokens(value, _INT, count, what)], dtype=np.int64)


def _floats(value: bytes, count: int, what: str) -> np.ndarray:
    return np.array([float(t) for t in _tokens(value, _FLOAT, count, what)], dtype=np.float64)


def _int(value: bytes | None, what: str) -> int:
    if value is None or not _INT.fullmatch(value):
        raise _refuse(f"{what} is missing or not an integer")
    return int(value)


def _is_utf8(data: bytes | bytearray) -> bool:
    # Decoded a piece at a time: decoding all of it at once would hold a second copy (as a str).
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with memoryview(data) as view:
            for start in range(0, len(view), _CHUNK):
                decoder.decode(view[start : start + _CHUNK])
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _check_text_model(data: bytes | bytearray) -> _Header:
    # 1. UTF-8 text with bare LF line ends and no NUL: LightGBM's C parser and this one then
    #    see the same lines.
    if len(data) == 0:
        raise ModelRefused(f"the file is empty or not a LightGBM text model; {_SAVE_HINT}")
    if not data.startswith((b"tree\n", b"tree\r\n")):
        raise ModelRefused(f"the file is not a LightGBM text model; {_SAVE_HINT}")
    if b"\x00" in data or b"\r" in data:
        raise _refuse("it holds NUL bytes or CR line ends")
    if not _is_utf8(data):
        raise _refuse("it is not UTF-8 text")
    # 2. The header, up to the first "Tree=" line, states the shape of the model.
    fields: dict[bytes, bytes] = {}
    pos = 0
    while not data.startswith(b"Tree=", pos):
        end = data.find(b"\n", pos)
        if end < 0:
            raise _refuse("it holds no trees")
        key, _, value = bytes(data[pos:end]).partition(b"=")
        fields[key] = value
        pos = end + 1
    header = _check_header(fields)
    # 3. Each tree starts exactly where tree_sizes puts it and its fields end inside it.
    if b"tree_sizes" not in fields:
        raise _refuse("the header has no tree_sizes (saved by LightGBM older than 3.0?)")
    sizes = [int(t) for t in _tokens(fields[b"tree_sizes"], _SIZE, None, "tree_sizes")]
    if not sizes:
        raise _refuse("it holds no trees")
    if pos + sum(sizes) > len(data):
        raise _refuse("tree_sizes points past the end of the file (is it truncated?)")
    for index, size in enumerate(sizes):
        _check_tree(bytes(data[pos : pos + size]), index, header.num_feature)
        pos += size
    return header


def _check_header(fields: Mapping[bytes, bytes]) -> _Header:
    num_class = _int(fields.get(b"num_class"), "num_class")
    per_iteration = _int(
        fields.get(b"num_tree_per_iteration", fields.get(b"num_class")), "num_tree_per_iteration"
    )
    # The predictor writes num_tree_per_iteration values into a row of num_class outputs.
    if num_class < 1 or per_iteration != num_class:
        raise _refuse("num_class and num_tree_per_iteration disagree")
    num_feature = check_feature_count(
        _int(fields.get(b"max_feature_idx"), "max_feature_idx") + 1, "the LightGBM model"
    )
    words = fields.get(b"objective", b"").split(b" ")
    objective = words[0].decode("utf-8", "replace")[:64]
    if objective in _MULTICLASS:
        # The objective converts its own num_class outputs per row; more would overrun it.
        stated = [w.partition(b":")[2] for w in words[1:] if w.startswith(b"num_class:")]
        if len(stated) != 1 or _int(stated[0], "the objective's num_class") != num_class:
            raise _refuse("the objective's num_class disagrees with the header")
    return _Header(num_class=num_class, num_feature=num_feature, objective=objective)


def _check_tree(block: bytes, index: int, num_feature: int) -> None:
    where = f"tree {index}"
    first = block.find(b"\n")
    if not block.startswith(b"Tree=") or first < 0:
        raise _refuse(f"{where} is not where tree_sizes says it is")
    # LightGBM reads "key=value" lines up to a blank line, scanning for '=' and '\n' without
    # looking for the end of the buffer: both must occur inside this tree's block.
    fields: dict[bytes, bytes] = {}
    pos = first + 1
    while True:
        end = block.find(b"\n", pos)
        if end < 0:
            raise _refuse(f"{where} does not end with a blank line")
        if end == pos:
            break
        key, sep, value = block[pos:end].partition(b"=")
        if not sep or len(fields) == _MAX_TREE_KEYS:
            raise _refuse(f"{where} has a line that is not key=value, or too many lines")
        fields[key] = value
        pos = end + 1
    leaves = _int(fields.get(b"num_leaves"), f"{where} num_leaves")
    categories = _int(fields.get(b"num_cat"), f"{where} num_cat")
    linear = _int(fields.get(b"is_linear", b"0"), f"{where} is_linear")
    if not 1 <= leaves <= _MAX_LEAVES or categories < 0 or linear not in (0, 1):
        raise _refuse(f"{where} has num_leaves, num_cat or is_linear out of range")
    if b"leaf_value" not in fields:
        raise _refuse(f"{where} has no leaf_value")
    for key in (b"leaf_value", b"leaf_weight", b"leaf_count"):
        if key in fields:
            _floats(fields[key], leaves, f"{where} {key.decode()}")
    if leaves == 1 and not linear:
        return  # LightGBM reads nothing else of a one-leaf tree
    _check_splits(fields, where, leaves, categories, num_feature)
    if linear:
        _check_linear(fields, where, leaves, num_feature)


def _check_splits(
    fields: Mapping[bytes, bytes], where: str, leaves: int, categories: int, num_feature: int
) -> None:
    splits = leaves - 1
    for key in (b"left_child", b"right_child", b"split_feature", b"threshold"):
        if key not in fields:
            raise _refuse(f"{where} has no {key.decode()}")
    for key in (b"split_gain", b"internal_value", b"internal_weight", b"internal_count"):
        if key in fields:
            _floats(fields[key], splits, f"{where} {key.decode()}")
    left = _ints(fields[b"left_child"], splits, f"{where} left_child")
    right = _ints(fields[b"right_child"], splits, f"{where} right_child")
    feature = _ints(fields[b"split_feature"], splits, f"{where} split_feature")
    threshold = _floats(fields[b"threshold"], splits, f"{where} threshold")
    decision = _ints(fields.get(b"decision_type", b"0 " * splits), splits, f"{where} decision_type")
    # A child >= 0 is a split node (never the root), ~child a leaf. All 2*(leaves-1) children
    # distinct means every node but the root has exactly one parent: the nodes reachable
    # from the root form a finite tree, so every walk ends at a leaf.
    children = np.concatenate([left, right])
    nodes, leaf_refs = children[children >= 0], ~children[children < 0]
    if (nodes.size and (nodes.min() < 1 or nodes.max() >= splits)) or (
        leaf_refs.size and leaf_refs.max() >= leaves
    ):
        raise _refuse(f"{where} points at a node that does not exist")
    if np.unique(children).size != children.size:
        raise _refuse(f"{where} is not a tree (a node has two parents)")
    if feature.size and (feature.min() < 0 or feature.max() >= num_feature):
        raise _refuse(f"{where} splits on a feature the model does not have")
    if decision.size and (decision.min() < 0 or decision.max() > 127):
        raise _refuse(f"{where} has a decision type out of range")
    # A categorical split's threshold is an index into cat_boundaries.
    cat_index = threshold[(decision & 1) == 1]
    if cat_index.size and not (
        np.all(cat_index == np.floor(cat_index))
        and cat_index.min() >= 0
        and cat_index.max() < categories
    ):
        raise _refuse(f"{where} has a categorical split without its category set")
    if categories > 0:
        bounds = _ints(
            fields.get(b"cat_boundaries", b""), categories + 1, f"{where} cat_boundaries"
        )
        if bounds[0] != 0 or np.any(np.diff(bounds) < 0):
            raise _refuse(f"{where} cat_boundaries is not increasing from 0")
        bitsets = _ints(
            fields.get(b"cat_threshold", b""), int(bounds[-1]), f"{where} cat_threshold"
        )
        if bitsets.size and (bitsets.min() < 0 or bitsets.max() >= 1 << 32):
            raise _refuse(f"{where} cat_threshold holds values out of range")


def _check_linear(fields: Mapping[bytes, bytes], where: str, leaves: int, num_feature: int) -> None:
    if b"leaf_const" in fields:
        _floats(fields[b"leaf_const"], leaves, f"{where} leaf_const")
    if b"num_features" not in fields:
        return
    counts = _ints(fields[b"num_features"], leaves, f"{where} num_features")
    if counts.size and counts.min() < 0:
        raise _refuse(f"{where} num_features is negative")
    total = int(counts.sum())
    if total == 0:
        return
    # The predictor walks leaf_features and leaf_coeff together: both must be complete.
    used = _ints(fields.get(b"leaf_features", b""), total, f"{where} leaf_features")
    _floats(fields.get(b"leaf_coeff", b""), total, f"{where} leaf_coeff")
    if used.min() < 0 or used.max() >= num_feature:
        raise _refuse(f"{where} a linear leaf uses a feature the model does not have")
