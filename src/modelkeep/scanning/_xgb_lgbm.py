"""XGBoost (JSON and UBJSON) and LightGBM (text) models: parsed and checked for consistency.

These formats hold numbers and tree structure only; their loaders build trees in C++ and run
no Python. What can go wrong is structure that the loader trusts: a child index outside the
tree, array lengths that disagree with the node count, a split on a feature that does not
exist. Such files are ``error`` (refused); consistent ones are ``safe``.
"""

from __future__ import annotations

import array
import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from modelkeep.runtime._ubjson import UbjsonError, load_ubjson
from modelkeep.scanning._context import Buffer, Scan

__all__ = ["scan_lightgbm", "scan_xgboost"]

_TREE_ARRAYS = (
    "left_children",
    "right_children",
    "parents",
    "split_indices",
    "split_conditions",
    "default_left",
)

_TREE_INDICES = frozenset({"left_children", "right_children", "split_indices"})
# The per-node arrays of XGBoost's trees that no check reads.
_UNREAD_TREE_ARRAYS = (
    "base_weights",
    "loss_changes",
    "sum_hessian",
    "split_type",
    "categories",
    "categories_nodes",
    "categories_segments",
    "categories_sizes",
)


class _Inconsistent(Exception):
    pass


def scan_xgboost(scan: Scan, data: Buffer, location: str, depth: int, kind: str) -> str:
    """Parse an XGBoost model (``kind`` is ``xgboost-json`` or ``xgboost-ubj``) and check it."""
    view = memoryview(data)
    try:
        if kind == "xgboost-json":
            model = _load_json(view)
        else:
            model, used = load_ubjson(view)
            if used != len(view):
                raise _Inconsistent(f"{len(view) - used} bytes after the model")
        trees = _check_xgboost(model)
    except (ValueError, UbjsonError, RecursionError) as exc:
        scan.high(location, f"the XGBoost model does not parse ({_short(exc)})")
        return kind
    except (_Inconsistent, KeyError, TypeError, IndexError) as exc:
        scan.high(
            location, f"the XGBoost model is inconsistent ({_short(exc)}); re-save it with XGBoost"
        )
        return kind
    scan.info(location, f"XGBoost model, {trees} trees, structure consistent")
    return kind


def _load_json(view: memoryview) -> Any:
    # As json.loads(bytes) decodes and parses, without the bytes copy of the model, and with
    # each object slimmed as soon as it is parsed (:func:`_slim`): the model's numbers as
    # Python objects took 7 times its size; now one tree's at a time does.
    text = str(view, json.detect_encoding(view[:4].tobytes()), "surrogatepass")
    return json.JSONDecoder(object_hook=_slim).decode(text)


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    # Only _check_tree reads a tree's arrays, and of them only the lengths, and the values of
    # the three below; each is kept as something that answers len() and int() the same.
    for key in _TREE_ARRAYS:
        value = obj.get(key)
        if not isinstance(value, list):
            continue
        if key in _TREE_INDICES:
            with contextlib.suppress(TypeError, OverflowError):  # other values: kept as they are
                obj[key] = array.array("q", value)
        else:
            obj[key] = range(len(value))
    for key in _UNREAD_TREE_ARRAYS:
        obj.pop(key, None)
    return obj


def _check_xgboost(model: Any) -> int:
    if not isinstance(model, dict) or not isinstance(model.get("learner"), dict):
        raise _Inconsistent("no learner")
    version = model.get("version")
    if version is None or not _ints(version) or len(version) != 3:
        raise _Inconsistent("no version")
    learner = model["learner"]
    num_feature = int(learner["learner_model_param"]["num_feature"])
    booster = learner["gradient_booster"]
    name = booster.get("name")
    if name == "gblinear":
        weights = booster["model"]["weights"]
        if len(weights) == 0:
            raise _Inconsistent("a linear booster without weights")
        return 0
    if name == "dart":
        booster = booster["gbtree"]
    elif name != "gbtree":
        raise _Inconsistent(f"unknown booster {str(name)[:40]!r}")
    trees = booster["model"]["trees"]
    for index, tree in enumerate(trees):
        _check_tree(tree, index, num_feature)
    return len(trees)


def _check_tree(tree: dict[str, Any], index: int, num_feature: int) -> None:
    nodes = int(tree["tree_param"]["num_nodes"])
    if nodes < 1:
        raise _Inconsistent(f"tree {index} has no nodes")
    for key in _TREE_ARRAYS:
        if len(tree[key]) != nodes:
            raise _Inconsistent(
                f"tree {index}: {key} has {len(tree[key])} entries for {nodes} nodes"
            )
    left, right, features = tree["left_children"], tree["right_children"], tree["split_indices"]
    # Each node but the root is the child of exactly one node: prediction walks a tree.
    parents = [0] * nodes
    for node in range(nodes):
        a, b = int(left[node]), int(right[node])
        if (a == -1) != (b == -1):
            raise _Inconsistent(f"tree {index} node {node} has one child")
        if a == -1:
            continue
        for child in (a, b):
            if not 0 < child < nodes or child == node:
                raise _Inconsistent(f"tree {index} node {node} points outside the tree")
            parents[child] += 1
            if parents[child] > 1:
                raise _Inconsistent(f"tree {index} node {child} has two parents")
        if num_feature and not 0 <= int(features[node]) < num_feature:
            raise _Inconsistent(f"tree {index} node {node} splits on a missing feature")


def _ints(value: Any) -> bool:
    if isinstance(value, list):
        return all(type(v) is int for v in value)
    return hasattr(value, "dtype") and value.dtype.kind in "iu"


# -- LightGBM ---------------------------------------------------------------------------------


def scan_lightgbm(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Parse a LightGBM text model and check each tree's structure."""
    try:
        text = str(data, "utf-8")  # decoded from the buffer itself: no copy of it as bytes
        trees = _check_lightgbm(text)
    except UnicodeDecodeError:
        scan.high(location, "the LightGBM model is not UTF-8 text")
        return "lightgbm-text"
    except (_Inconsistent, ValueError, KeyError, IndexError) as exc:
        scan.high(
            location,
            f"the LightGBM model is inconsistent ({_short(exc)}); re-save it with LightGBM",
        )
        return "lightgbm-text"
    scan.info(location, f"LightGBM model, {trees} trees, structure consistent")
    return "lightgbm-text"


def _check_lightgbm(text: str) -> int:
    blocks = _blocks(text.replace("\r\n", "\n"))
    header = _fields(next(blocks), first="tree")
    max_feature = int(header["max_feature_idx"])
    sizes = [int(v) for v in header.get("tree_sizes", "").split()]
    trees = 0
    ended = False
    for block in blocks:
        stripped = block.strip("\n")
        if stripped.startswith("Tree="):
            if ended:
                raise _Inconsistent("a tree after 'end of trees'")
            _check_lightgbm_tree(_fields(stripped, first=None), trees, max_feature)
            trees += 1
        elif stripped.startswith("end of trees"):
            ended = True
    if not ended:
        raise _Inconsistent("no 'end of trees' line")
    if sizes and len(sizes) != trees:
        raise _Inconsistent(f"tree_sizes lists {len(sizes)} trees but {trees} follow")
    return trees


def _blocks(text: str) -> Iterator[str]:
    # What text.split("\n\n") returns, one block at a time: the blocks of a model are together
    # as large as the model, and a list of them would hold it once more while it is checked.
    start = 0
    while (end := text.find("\n\n", start)) >= 0:
        yield text[start:end]
        start = end + 2
    yield text[start:]


def _fields(block: str, first: str | None) -> dict[str, str]:
    lines = block.strip("\n").split("\n")
    if first is not None:
        if lines[0].strip() != first:
            raise _Inconsistent(f"expected {first!r} first")
        lines = lines[1:]
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise _Inconsistent(f"a line without '=': {line[:40]!r}")
        if key in fields:
            raise _Inconsistent(f"{key[:40]!r} appears twice")
        fields[key] = value
    return fields


def _check_lightgbm_tree(fields: dict[str, str], index: int, max_feature: int) -> None:
    leaves = int(fields["num_leaves"])
    if leaves < 1:
        raise _Inconsistent(f"tree {index} has no leaves")
    if len(_numbers(fields["leaf_value"])) != leaves:
        raise _Inconsistent(f"tree {index}: leaf_value does not have {leaves} entries")
    if leaves == 1:
        return
    internal = leaves - 1
    arrays = {
        key: _numbers(fields[key])
        for key in ("split_feature", "threshold", "decision_type", "left_child", "right_child")
    }
    for key, values in arrays.items():
        if len(values) != internal:
            raise _Inconsistent(f"tree {index}: {key} does not have {internal} entries")
    seen: set[int] = set()
    for node in range(internal):
        if not 0 <= int(arrays["split_feature"][node]) <= max_feature:
            raise _Inconsistent(f"tree {index} node {node} splits on a missing feature")
        for child in (int(arrays["left_child"][node]), int(arrays["right_child"][node])):
            # Internal nodes are 0..leaves-2, leaves are ~0..~(leaves-1); each is used once.
            if (child >= 0 and not 0 < child < internal) or (child < 0 and ~child >= leaves):
                raise _Inconsistent(f"tree {index} node {node} points outside the tree")
            if child in seen:
                raise _Inconsistent(f"tree {index}: a node is reached twice")
            seen.add(child)


def _numbers(text: str) -> Sequence[float]:
    return [float(value) for value in text.split()]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] if text else type(exc).__name__
