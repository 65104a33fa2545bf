"""``text/csv`` bodies as SageMaker's built-in containers take them: one row per instance.

Header-less rows of numbers, comma-separated, for a model with one numeric input of rank 2
(``[rows, columns]``) or rank 1 (one column). The table's size is known from its line count and
the first line's columns before any number is parsed: it is refused past the column cap or the
element limit. Then every line is matched whole by a strict number pattern (no quotes, no
``1_000``, nothing Python's ``float`` would let through that a CSV writer never writes), and the
V2 JSON conversion builds the tensor with its range rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, numpy_dtype

from .._rows import RowRequest, checked_shape, csv_lines, list_tensor, only_input, shown

__all__ = ["CSV_CONTENT_TYPE", "MAX_CSV_COLUMNS", "read_csv", "write_csv"]

CSV_CONTENT_TYPE = "text/csv"
# Columns in one row: no tabular model has more features; a row longer than this is refused
# before it is split.
MAX_CSV_COLUMNS = 65_536

_INT = r"[+-]?\d{1,20}"
# Unambiguous alternatives (no two ways to match one digit), so matching stays linear.
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)"
_INT_LINE = re.compile(rf" *{_INT} *(?:, *{_INT} *)*")
_FLOAT_LINE = re.compile(rf" *(?:{_FLOAT}) *(?:, *(?:{_FLOAT}) *)*", re.IGNORECASE)


def read_csv(body: bytes, signature: ModelSignature, max_elements: int) -> RowRequest:
    """The one input of ``signature`` from CSV rows; InvalidInput or TooLarge otherwise."""
    spec = only_input(signature, CSV_CONTENT_TYPE)
    dtype = numpy_dtype(spec.datatype)
    if dtype.kind not in "iuf":
        raise InvalidInput(f"input {shown(spec.name)} is {spec.datatype}; CSV carries numbers")
    if len(spec.shape) not in (1, 2):
        raise InvalidInput(
            f"input {shown(spec.name)} has rank {len(spec.shape)}; CSV carries a table: "
            "send JSON or application/x-npy"
        )
    # 1. Text, split in lines; a final newline is allowed, blank lines elsewhere are not.
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidInput("the CSV body must be ASCII numbers") from None
    # 2. Its size from the line count and the first line, before anything is split or parsed.
    first_end = text.find("\n")
    first = text if first_end < 0 else text[:first_end]
    rows_count = text.count("\n") + (0 if text.endswith("\n") else 1)
    columns = first.count(",") + 1
    if not text.strip("\r\n"):
        raise InvalidInput("the CSV body has no rows")
    if columns > MAX_CSV_COLUMNS:
        raise InvalidInput(f"the CSV rows have more than {MAX_CSV_COLUMNS} columns")
    if rows_count * columns > max_elements:
        raise TooLarge(
            f"the CSV table holds {rows_count * columns} values; the limit is {max_elements}"
        )
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    rank2 = len(spec.shape) == 2
    shape = [len(lines), columns] if rank2 else [len(lines) * columns]
    if not rank2 and columns != 1:
        raise InvalidInput(f"input {shown(spec.name)} takes one value per row; rows have more")
    declared, count = checked_shape(spec, shape, max_elements)
    # 3. Every line: the same number of columns (counted before it is split), then whole
    # against the number pattern.
    pattern, number = (_INT_LINE, int) if dtype.kind in "iu" else (_FLOAT_LINE, float)
    values: list[Any] = []
    for index, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        found = line.count(",") + 1
        if found != columns:
            raise InvalidInput(f"CSV row {index} has {found} columns; row 1 has {columns}")
        if pattern.fullmatch(line) is None:
            kind = "integers" if number is int else "numbers"
            raise InvalidInput(f"CSV row {index} is not a row of {kind} separated by commas")
        values.extend(map(number, line.split(",")))
    # 4. The tensor. Integers by the V2 JSON conversion (exact range checks); floats straight
    # from float64, where overflow to inf is the IEEE answer, as for JSON.
    if number is int:
        array = list_tensor(spec, values, (count,), count).reshape(declared)
    else:
        array = _floats(values, dtype).reshape(declared)
    return RowRequest(inputs={spec.name: array}, form="csv")


def _floats(values: list[float], dtype: np.dtype[Any]) -> np.ndarray:
    exact = np.array(values, dtype=np.float64)
    if dtype == exact.dtype:
        return exact
    # NaN makes the peak NaN, which compares False: such tables take the guarded cast.
    if exact.size == 0 or np.abs(exact).max() <= np.finfo(dtype).max:
        return exact.astype(dtype)
    with np.errstate(over="ignore"):
        return exact.astype(dtype)


def write_csv(outputs: Mapping[str, np.ndarray]) -> bytes:
    """One CSV line per row: every output's values for that row, in output order."""
    lines = csv_lines(outputs)
    return b"\n".join(lines) + b"\n" if lines else b""
