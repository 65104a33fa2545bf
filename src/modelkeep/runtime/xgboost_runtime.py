"""XGBoost boosters saved in XGBoost's own JSON or UBJSON model format (never pickle).

Loading either format builds plain data; it cannot run code. It can still hand the predictor a
tree that is not a tree: a child index outside the node array, a cycle, a feature index past
the row, a class group past the output. XGBoost trusts those fields while predicting, and such
a model crashes the whole process (segmentation fault) or reads memory it should not. So the
loaded model is written back as UBJSON and every tree is checked here (:func:`_check_trees`)
before the first prediction.

The served signature: ``input`` FP32 ``[-1, num_features]``; ``predictions`` FP32 ``[-1]``
(``[-1, num_class]`` for ``multi:softprob``, ``[-1, num_target]`` for multi-target models);
for classification objectives also ``label`` INT64: the arg-max of the class probabilities,
the class index of ``multi:softmax``, or ``1`` where a binary score is above 0.5 (above 0 for
``binary:logitraw``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xgboost as xgb

from modelkeep.errors import InvalidInput, ModelRefused
from modelkeep.runtime._ubjson import load_ubjson
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

__all__ = ["XGBoostModel"]

_SAVE_HINT = "save the booster with booster.save_model('model.json') or 'model.ubj'"
_UBJ_KEY_MARKERS = frozenset(b"iUIlL")  # UBJSON integer types that prefix an object key
_INT = re.compile(r"-?[0-9]{1,18}")
# float32 inputs represent integers exactly only below 2**24, so a larger category never matches.
_MAX_CATEGORY = 1 << 24
_THRESHOLD_ONE = frozenset({"binary:logistic", "binary:hinge"})


@dataclass(frozen=True, slots=True)
class _Meta:
    objective: str
    num_feature: int
    num_class: int
    num_target: int


class XGBoostModel:
    """A checked XGBoost booster; :meth:`run` is thread safe without a lock.

    ``Booster.inplace_predict`` is documented as safe and lock free when called from several
    threads, provided nothing else (training, ``set_param``, saving) touches the booster at
    the same time; after :meth:`load` nothing else ever does.
    """

    __slots__ = ("_booster", "_label", "_meta", "_width", "signature")

    def __init__(self, booster: xgb.Booster, meta: _Meta) -> None:
        self._booster = booster
        self._meta = meta
        if meta.objective == "multi:softprob":
            self._width = meta.num_class
        elif meta.objective == "multi:softmax":
            self._width = 1
        else:
            self._width = meta.num_target
        shape: tuple[int, ...] = (-1,) if self._width == 1 else (-1, self._width)
        outputs = [TensorSpec(name="predictions", datatype="FP32", shape=shape)]
        self._label = meta.objective.startswith("multi:soft") or meta.objective in (
            _THRESHOLD_ONE | {"binary:logitraw"}
        )
        if self._label:
            label_shape = (-1,) if meta.objective.startswith("multi:") else shape
            outputs.append(TensorSpec(name="label", datatype="INT64", shape=label_shape))
        self.signature: ModelSignature = matrix_signature(meta.num_feature, outputs)

    @classmethod
    def load(
        cls, data: ModelSource, *, fmt: Literal["json", "ubj"], threads: int = 1
    ) -> XGBoostModel:
        """Load an XGBoost JSON (``fmt="json"``) or UBJSON (``fmt="ubj"``) model from its bytes
        or a seekable file of them.

        Raises ``ModelRefused`` when the bytes are not that format (pickles and the legacy
        binary format included), when XGBoost cannot load them, when a tree is malformed, or
        when the booster is ``gblinear`` or uses vector leaves (not served).
        """
        threads = check_threads(threads, "XGBoost")
        # 1. The bytes are the declared serialisation: XGBoost would otherwise guess.
        buffer = _model_buffer(data)
        _check_declared_format(buffer, fmt)
        # 2. XGBoost parses them into a booster (plain data; nothing is executed). Its own
        #    JSON parser builds a document of the whole file first (about 13 times a JSON
        #    model's size at its peak, 3.6 times a UBJSON one's: bench/README.md).
        booster = xgb.Booster()
        try:
            booster.load_model(buffer)
            del buffer  # the booster holds the model now; a buffer read here is freed
            # What XGBoost loaded, written back as UBJSON: its typed arrays are read as NumPy
            # views of that buffer, so the check costs little beyond it (+12 MiB for 136 MiB);
            # the JSON form read as Python objects cost about 8 times the model (bench/README.md).
            document, _ = load_ubjson(booster.save_raw("ubj"))
        except Exception as exc:  # XGBoostError carries build paths; never shown
            raise ModelRefused(
                f"the file is not a valid XGBoost {fmt.upper()} model or is truncated; "
                + _SAVE_HINT
            ) from exc
        # 3. Every tree is a tree over the declared features and output groups.
        meta = _check_document(document)
        if booster.num_features() != meta.num_feature:
            raise ModelRefused("the XGBoost model disagrees with itself on its feature count")
        booster.set_param({"nthread": threads})
        return cls(booster, meta)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Predict; returns the outputs asked for (default all) in signature order.

        Raises ``InvalidInput`` for an unknown output name or an input XGBoost rejects; its own
        message is never passed on.
        """
        names = select_outputs(self.signature, output_names)
        matrix = feature_matrix(inputs, self._meta.num_feature)
        rows = matrix.shape[0]
        if rows == 0:
            return empty_outputs(self.signature, names)
        try:
            raw = self._booster.inplace_predict(matrix)
        except Exception as exc:
            raise InvalidInput(RUN_FAILED) from exc
        predictions = np.asarray(raw, dtype=np.float32)
        expected = (rows,) if self._width == 1 else (rows, self._width)
        if predictions.size != rows * self._width:
            raise InvalidInput(RUN_FAILED)
        predictions = predictions.reshape(expected)
        result = {"predictions": predictions}
        if "label" in names:
            result["label"] = self._labels(predictions)
        return {name: result[name] for name in names}

    def _labels(self, predictions: np.ndarray) -> np.ndarray:
        objective = self._meta.objective
        if objective == "multi:softprob":
            return np.asarray(np.argmax(predictions, axis=1), dtype=np.int64)
        if objective == "multi:softmax":
            return np.asarray(np.rint(predictions), dtype=np.int64)
        threshold = 0.0 if objective == "binary:logitraw" else 0.5
        return (predictions > threshold).astype(np.int64)


def _model_buffer(data: ModelSource) -> bytearray:
    # XGBoost loads from memory only out of a bytearray (it takes a ctypes view of a writable
    # buffer); a file is read straight into one, bytes are copied into one.
    if isinstance(data, memoryview):
        data = data.tobytes()
    whole = read_whole(data)
    return whole if isinstance(whole, bytearray) else bytearray(whole)


def _check_declared_format(data: bytearray, fmt: str) -> None:
    if len(data) < 2:
        raise ModelRefused(f"the file is empty or not an XGBoost model; {_SAVE_HINT}")
    if data[:1] == b"\x80":
        raise ModelRefused(f"pickled XGBoost models are never loaded; {_SAVE_HINT}")
    if fmt == "json":
        if not data.startswith(b'{"'):
            raise ModelRefused(f"the file is not an XGBoost JSON model; {_SAVE_HINT}")
    elif fmt == "ubj":
        if data[:1] != b"{" or data[1] not in _UBJ_KEY_MARKERS:
            raise ModelRefused(f"the file is not an XGBoost UBJSON model; {_SAVE_HINT}")
    else:
        raise ModelRefused(f"unknown XGBoost model format {fmt[:20]!r}")


def _refuse(detail: str) -> ModelRefused:
    return ModelRefused(f"the XGBoost model is malformed: {detail}; re-save it with XGBoost")


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _refuse(f"{what} is missing")
    return value


def _int_text(value: Any, what: str) -> int:
    # XGBoost writes its parameters as decimal strings ("3"); accept exactly that.
    if type(value) is int:
        return value
    if not isinstance(value, str) or not _INT.fullmatch(value):
        raise _refuse(f"{what} is not an integer")
    return int(value)


def _is_array(value: Any) -> bool:
    # UBJSON's typed arrays arrive as NumPy arrays, its other arrays (and JSON's) as lists.
    return isinstance(value, list) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _ints(value: Any, length: int | None, what: str) -> np.ndarray:
    if not _is_array(value) or (length is not None and len(value) != length):
        raise _refuse(f"{what} has the wrong length")
    if len(value) == 0:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(value)
    # Floats, bools, mixed values and integers past int64 (a list of them is uint64 or objects).
    if array.dtype.kind not in "iu" or not np.can_cast(array.dtype, np.int64) or array.ndim != 1:
        raise _refuse(f"{what} holds something other than integers")
    return array.astype(np.int64)


def _check_document(document: Any) -> _Meta:
    learner = _obj(_obj(document, "the model").get("learner"), "learner")
    params = _obj(learner.get("learner_model_param"), "learner_model_param")
    objective = _obj(learner.get("objective"), "objective").get("name")
    if not isinstance(objective, str) or not objective:
        raise _refuse("the objective has no name")
    meta = _Meta(
        objective=objective[:64],
        num_feature=check_feature_count(
            _int_text(params.get("num_feature"), "num_feature"), "the XGBoost model"
        ),
        num_class=_int_text(params.get("num_class", "0"), "num_class"),
        num_target=_int_text(params.get("num_target", "1"), "num_target"),
    )
    if meta.num_class < 0 or meta.num_target < 1:
        raise _refuse("num_class or num_target is out of range")
    if meta.objective.startswith("multi:soft") and meta.num_class < 2:
        raise _refuse(f"{meta.objective} needs num_class >= 2")
    booster = _obj(learner.get("gradient_booster"), "gradient_booster")
    name = booster.get("name")
    if name == "gbtree":
        model = _obj(booster.get("model"), "the tree model")
    elif name == "dart":
        model = _obj(_obj(booster.get("gbtree"), "the dart trees").get("model"), "the model")
        trees = model.get("trees")
        if not isinstance(trees, list) or _number_count(booster.get("weight_drop")) != len(trees):
            raise _refuse("the dart weights do not match the trees")
    elif name == "gblinear":
        raise ModelRefused(
            "gblinear boosters are not served (XGBoost cannot predict them in place); "
            "train with booster='gbtree' or export the model to ONNX"
        )
    else:
        raise _refuse("the booster type is unknown")
    _check_trees(model, meta)
    return meta


def _number_count(value: Any) -> int:
    if isinstance(value, np.ndarray):
        numbers = value.ndim == 1 and value.dtype.kind in "iuf"
    else:
        numbers = isinstance(value, list) and all(type(v) in (int, float) for v in value)
    if not numbers:
        raise _refuse("a weight list holds something other than numbers")
    return len(value)


def _check_trees(model: Mapping[str, Any], meta: _Meta) -> None:
    trees = model.get("trees")
    if not isinstance(trees, list):
        raise _refuse("the tree list is missing")
    count = len(trees)
    param = _obj(model.get("gbtree_model_param"), "gbtree_model_param")
    if _int_text(param.get("num_trees"), "num_trees") != count:
        raise _refuse("num_trees does not match the trees")
    # Each tree adds to one output group; a group past the output would be written past it.
    groups = _ints(model.get("tree_info"), count, "tree_info")
    if groups.size and (
        groups.min() < 0 or groups.max() >= max(meta.num_class, meta.num_target, 1)
    ):
        raise _refuse("a tree adds to an output that does not exist")
    if "iteration_indptr" in model:
        indptr = _ints(model["iteration_indptr"], None, "iteration_indptr")
        if indptr.size == 0 or indptr[0] != 0 or indptr[-1] != count or np.any(np.diff(indptr) < 0):
            raise _refuse("iteration_indptr does not partition the trees")
    for index, tree in enumerate(trees):
        _check_tree(_obj(tree, f"tree {index}"), index, meta.num_feature)


def _check_tree(tree: Mapping[str, Any], index: int, num_feature: int) -> None:
    where = f"tree {index}"
    param = _obj(tree.get("tree_param"), f"{where} tree_param")
    nodes = _int_text(param.get("num_nodes"), f"{where} num_nodes")
    if nodes < 1:
        raise _refuse(f"{where} has no nodes")
    if _int_text(param.get("size_leaf_vector", "1"), f"{where} size_leaf_vector") > 1:
        raise ModelRefused(
            "vector-leaf (multi_strategy='multi_output_tree') XGBoost models are not served; "
            "train with multi_strategy='one_output_per_tree' or export the model to ONNX"
        )
    left = _ints(tree.get("left_children"), nodes, f"{where} left_children")
    right = _ints(tree.get("right_children"), nodes, f"{where} right_children")
    feature = _ints(tree.get("split_indices"), nodes, f"{where} split_indices")
    split_type = _ints(tree.get("split_type", [0] * nodes), nodes, f"{where} split_type")
    for key in ("split_conditions", "base_weights", "default_left"):
        if not _is_array(tree.get(key)) or len(tree[key]) != nodes:
            raise _refuse(f"{where} {key} has the wrong length")
    # A node is a leaf iff its left child is -1 (XGBoost's own test). Every child of a split
    # must be an existing non-root node, and no node may have two parents: then the nodes
    # reachable from the root form a finite tree, so every walk ends at a leaf.
    split = left != -1
    children = np.concatenate([left[split], right[split]])
    if children.size and (children.min() < 1 or children.max() >= nodes):
        raise _refuse(f"{where} points at a node that does not exist")
    if np.unique(children).size != children.size:
        raise _refuse(f"{where} is not a tree (a node has two parents)")
    used = feature[split]
    if used.size and (used.min() < 0 or used.max() >= num_feature):
        raise _refuse(f"{where} splits on a feature the model does not have")
    if split_type.size and (split_type.min() < 0 or split_type.max() > 1):
        raise _refuse(f"{where} has an unknown split type")
    _check_categories(tree, where, np.flatnonzero(split & (split_type == 1)))


def _check_categories(tree: Mapping[str, Any], where: str, categorical: np.ndarray) -> None:
    # The nodes listed must be exactly the categorical splits (so they exist), and each one's
    # slice of the category list must lie inside it.
    owners = _ints(tree.get("categories_nodes", []), None, f"{where} categories_nodes")
    starts = _ints(tree.get("categories_segments", []), owners.size, f"{where} segments")
    sizes = _ints(tree.get("categories_sizes", []), owners.size, f"{where} categories_sizes")
    values = _ints(tree.get("categories", []), None, f"{where} categories")
    if not np.array_equal(np.sort(owners), categorical):
        raise _refuse(f"{where} lists categories for nodes that are not categorical splits")
    if owners.size and (
        starts.min() < 0 or sizes.min() < 0 or (starts + sizes).max() > values.size
    ):
        raise _refuse(f"{where} category segments run past the category list")
    if values.size and (values.min() < 0 or values.max() >= _MAX_CATEGORY):
        raise _refuse(f"{where} has a category code outside [0, 2**24)")
