"""What people give the ``modelkeep policy`` commands, checked and turned into requests.

Values typed on the command line are checked and translated before any request, so a typo is a
usage error (exit 2): rates take short units (``50/s``, ``1000/min``, ``10/5s``, ``2/h``,
``100/d``), translated to the ``limits`` syntax the server reads (``50/second``...). The server
stays the authority on ranges and refuses, with its own message, what it cannot apply.

``merged_policy`` builds the full policy that ``policy set`` sends: the API replaces a policy
whole, so everything not being changed goes back exactly as the server showed it.

``read_rows`` reads the benign rows of ``policy calibrate`` from a ``.npy``, ``.csv`` or
``.json`` file. A ``.npy`` file is read with ``allow_pickle=False`` after its header has been
checked: an array of Python objects is a pickle, and loading one could run code, so it is
refused without being unpickled.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from modelkeep.cli import _output as out
from modelkeep.cli._client import JSONObject
from modelkeep.errors import InternalError, InvalidInput

__all__ = [
    "ALARM_ACTIONS",
    "MAX_CALIBRATION_ROWS",
    "NONE",
    "OUTPUT_FORMS",
    "PolicyChanges",
    "merged_policy",
    "parse_count",
    "parse_detect",
    "parse_output",
    "parse_output_for",
    "parse_rate",
    "read_rows",
]

#: The most rows one calibration may send (the server's own limit).
MAX_CALIBRATION_ROWS = 100_000
ALARM_ACTIONS = ("log", "alert", "throttle", "block")
DETECTORS = ("prada", "ood", "nearcopy")
#: The word that removes a limit (``--budget none``) or turns detection off (``--detect none``).
NONE = "none"
#: ``--output-for ROLE=default``: the role gets the model's ``--output`` again.
DEFAULT = "default"
OUTPUT_FORMS = (
    "full, top_k=K, round=N, confidence=N, label_only, reverse_sigmoid or "
    "reverse_sigmoid=BETA:GAMMA"
)

_RATE = re.compile(r"([0-9]+)\s*(?:/|\s+per\s+)\s*([0-9]+)?\s*([A-Za-z]+)", re.ASCII)
_SHORT_UNITS = {
    "s": "second",
    "sec": "second",
    "min": "minute",
    "h": "hour",
    "hr": "hour",
    "d": "day",
}
_RATE_UNITS = ("second", "minute", "hour", "day")
_BUDGET_UNITS = ("day", "month")
_COUNT = re.compile(r"[0-9]{1,13}", re.ASCII)
_MAX_COUNT = 10**12
_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_OUTPUT = re.compile(
    rf"full|label_only|top_k=[0-9]+|round=[0-9]+|reverse_sigmoid(?:={_NUMBER}:{_NUMBER})?",
    re.ASCII,
)
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,62}", re.ASCII)


# -- what people type -------------------------------------------------------------------------


def parse_rate(text: str, *, budget: bool = False) -> str:
    """``text`` in the ``limits`` syntax the server reads; ``ValueError`` says what is expected.

    Short units are translated (``50/s`` -> ``50/second``, ``10/5s`` -> ``10/5second``, ``2/h``,
    ``1000/min``, ``100/d``); full words (``second``, ``minutes``, ``day``...) are kept as typed.
    A rate's unit is a second, minute, hour or day; a budget is per calendar day or month.
    """
    example = "10000/day or 200000/month" if budget else "50/s, 1000/min or 10/5s"
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text.strip()[:40]!r} is not a {_kind(budget)}; write e.g. {example}")
    amount, multiple, unit = match.group(1), match.group(2), match.group(3).lower()
    if unit == "m":
        raise ValueError("'m' is ambiguous: write min for minutes or month for months")
    word = _SHORT_UNITS.get(unit) or _singular(unit)
    allowed = _BUDGET_UNITS if budget else _RATE_UNITS
    if word not in allowed:
        shorts = "" if budget else " (or s, min, h, d)"
        raise ValueError(
            f"a {_kind(budget)} is counted per {', '.join(allowed)}{shorts}; write e.g. {example}"
        )
    if not 1 <= int(amount) <= _MAX_COUNT:
        raise ValueError(f"a {_kind(budget)} must allow between 1 and 10^12")
    if multiple is not None and int(multiple) < 1:
        raise ValueError(f"a {_kind(budget)} cannot have a window of zero")
    if budget and multiple is not None:
        raise ValueError("a budget is per calendar day or month: write 10000/day, not 10000/2day")
    if unit in _SHORT_UNITS:
        return f"{amount}/{multiple or ''}{word}"
    return text.strip()


def _kind(budget: bool) -> str:
    return "budget" if budget else "rate"


def _singular(unit: str) -> str:
    return unit[:-1] if unit.endswith("s") else unit


def parse_count(text: str) -> int:
    """A whole number from 1 to 10^12, for ``--concurrency`` and ``--max-rows``."""
    if not _COUNT.fullmatch(text.strip()) or not 1 <= int(text) <= _MAX_COUNT:
        raise ValueError(f"{text.strip()[:20]!r} is not a whole number of at least 1 (or none)")
    return int(text)


def parse_output(text: str) -> str:
    """An output policy's text, checked for its form; the server checks the ranges."""
    value = text.strip()
    if not _OUTPUT.fullmatch(value):
        raise ValueError(f"an output policy is one of: {OUTPUT_FORMS}")
    return value


def parse_output_for(values: list[str]) -> dict[str, str | None]:
    """``ROLE=POLICY`` pairs as role -> policy; ``ROLE=default`` maps to ``None`` (no override)."""
    overrides: dict[str, str | None] = {}
    for value in values:
        role, equals, policy = value.partition("=")
        role = role.strip()
        if not equals or not _ROLE.fullmatch(role):
            raise ValueError(f"write ROLE=POLICY, e.g. consumer=top_k=3, not {value[:40]!r}")
        if role in overrides:
            raise ValueError(f"role {role} is given twice")
        overrides[role] = None if policy.strip() == DEFAULT else parse_output(policy)
    return overrides


def parse_detect(text: str) -> list[str]:
    """``prada``, ``ood``, ``nearcopy`` comma-separated, or ``none``; sorted, no repeats."""
    if text.strip() == NONE:
        return []
    names = [name.strip() for name in text.split(",")]
    if not all(name in DETECTORS for name in names):
        raise ValueError("give some of prada, ood, nearcopy (comma-separated) or none")
    return sorted(set(names))


# -- the merge --------------------------------------------------------------------------------


@dataclass
class PolicyChanges:
    """What ``policy set`` was told to change; ``None`` in a map means "remove it"."""

    limits: dict[str, str | int | None] = field(default_factory=dict)
    clear_limits: bool = False
    output: str | None = None
    output_for: dict[str, str | None] = field(default_factory=dict)
    detect: list[str] | None = None
    on_alarm: str | None = None
    prada_threshold: float | None = None

    def is_empty(self) -> bool:
        return self == PolicyChanges()


def merged_policy(current: Mapping[str, Any], changes: PolicyChanges) -> JSONObject:
    """The policy to ``PUT``: ``current`` (as ``GET`` returned it) with ``changes`` applied.

    Everything not changed goes back as it came, so the full replacement changes nothing else:
    fields this client does not know are kept, and ``ood_reference`` stays as shown. Only
    ``model`` and ``restrictions``, which describe the answer and are not policy, are left out.
    """
    policy = {k: v for k, v in current.items() if k not in ("model", "restrictions")}
    if changes.clear_limits or changes.limits:
        limits = {} if changes.clear_limits else dict(_mapping(current, "limits"))
        for name, value in changes.limits.items():
            if value is None:
                limits.pop(name, None)
            else:
                limits[name] = value
        policy["limits"] = limits
    if changes.output is not None:
        policy["output"] = changes.output
    if changes.output_for:
        overrides = dict(_mapping(current, "output_for"))
        for role, output in changes.output_for.items():
            if output is None:
                overrides.pop(role, None)
            else:
                overrides[role] = output
        policy["output_for"] = dict(sorted(overrides.items()))
    if changes.detect is not None:
        policy["detect"] = changes.detect
    if changes.on_alarm is not None:
        policy["on_alarm"] = changes.on_alarm
    if changes.prada_threshold is not None:
        policy["prada_threshold"] = changes.prada_threshold
    return policy


def _mapping(policy: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = policy.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        # Merging into something unreadable could silently drop what the server holds.
        raise InternalError(f"the server's policy has no readable {name}")
    return value


# -- benign rows for calibration --------------------------------------------------------------


def read_rows(path: Path) -> list[list[float]]:
    """The rows of a ``.npy``, ``.csv`` or ``.json`` file, as floats; ``InvalidInput`` if the file
    is not a non-empty, rectangular table of at most ``MAX_CALIBRATION_ROWS`` finite numbers.

    A ``.npy`` file is never unpickled: its header is checked first, an array of Python objects is
    refused, and the array is loaded with ``allow_pickle=False``.
    """
    name = out.clean(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        rows = _npy_rows(path, name)
    elif suffix == ".csv":
        rows = _csv_rows(path, name)
    elif suffix == ".json":
        rows = _json_rows(path, name)
    else:
        raise InvalidInput(f"{name}: give benign rows as a .npy, .csv or .json file")
    _check_table(rows, name)
    return rows


@contextmanager
def _opened(path: Path, name: str, **how: Any) -> Iterator[IO[Any]]:
    try:
        handle = path.open(**how)
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {name}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{name} is a directory, not a file of rows") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {name}: {exc.strerror or 'I/O error'}") from None
    with handle:
        yield handle


def _npy_rows(path: Path, name: str) -> list[list[float]]:
    import numpy as np  # here, so that `modelkeep --help` does not load numpy

    fmt = np.lib.format
    with _opened(path, name, mode="rb") as handle:
        try:
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(handle)
            else:
                raise InvalidInput(f"{name} is a .npy file of a version this client does not read")
        except (ValueError, EOFError, OSError) as exc:
            raise InvalidInput(f"{name} is not a valid .npy file") from exc
        # 1. No Python objects: such an array is a pickle, and unpickling can run code.
        if dtype.hasobject:
            raise InvalidInput(
                f"{name} holds Python objects (a pickle) and is refused without being loaded; "
                "save the rows as a numeric array"
            )
        # 2. Numbers only: booleans, integers or floats.
        if dtype.kind not in "biuf":
            raise InvalidInput(
                f"{name} holds non-numeric values (numpy dtype {dtype.str}); save the rows as "
                "a numeric array"
            )
        # 3. A table, checked before the data is read.
        if len(shape) != 2:
            raise InvalidInput(
                f"{name} has {len(shape)} dimensions; give a 2-D array, one row per query"
            )
        _check_row_count(shape[0], name)
        handle.seek(0)
        try:
            array = np.load(handle, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise InvalidInput(f"{name} is not a valid .npy file (truncated?)") from exc
    rows: list[list[float]] = array.astype(np.float64).tolist()
    return rows


def _csv_rows(path: Path, name: str) -> list[list[float]]:
    rows: list[list[float]] = []
    with _opened(path, name, mode="r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        first = True
        try:
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                values = _floats(record)
                if values is None and not first:
                    raise InvalidInput(
                        f"{name} line {reader.line_num}: a value is not a number "
                        "(only the first row may be a header)"
                    )
                first = False
                if values is not None:  # else: the header row
                    rows.append(values)
                    _check_row_count(len(rows), name)
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{name} is not a UTF-8 text file") from exc
        except csv.Error as exc:
            raise InvalidInput(f"{name} is not valid CSV") from exc
    return rows


def _floats(record: list[str]) -> list[float] | None:
    try:
        return [float(cell) for cell in record]
    except ValueError:
        return None


def _json_rows(path: Path, name: str) -> list[list[float]]:
    with _opened(path, name, mode="rb") as handle:
        try:
            data = json.load(handle)
        except (ValueError, RecursionError) as exc:
            raise InvalidInput(f"{name} is not valid JSON") from exc
    shape = "a JSON list of rows of numbers, e.g. [[0.5, 1.0], [0.2, 3.5]]"
    if not isinstance(data, list):
        raise InvalidInput(f"{name} must hold {shape}")
    _check_row_count(len(data), name)
    for row in data:
        if not isinstance(row, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in row
        ):
            raise InvalidInput(f"{name} must hold {shape}")
    try:
        return [[float(v) for v in row] for row in data]
    except OverflowError as exc:
        raise InvalidInput(f"{name} holds a number too large for a float") from exc


def _check_row_count(count: int, name: str) -> None:
    if count > MAX_CALIBRATION_ROWS:
        raise InvalidInput(
            f"{name} has more than {MAX_CALIBRATION_ROWS} rows, the most one calibration takes; "
            "send a sample"
        )


def _check_table(rows: list[list[float]], name: str) -> None:
    if not rows:
        raise InvalidInput(f"{name} holds no rows")
    width = len(rows[0])
    if width == 0:
        raise InvalidInput(f"{name}: rows must hold at least one value")
    for number, row in enumerate(rows, 1):
        if len(row) != width:
            raise InvalidInput(
                f"{name}: row {number} has {len(row)} values, the first row has {width}"
            )
        if not all(math.isfinite(value) for value in row):
            raise InvalidInput(f"{name}: row {number} holds a NaN or infinite value")


def read_assessment(members: Path, non_members: Path) -> bytes:
    """The two .npz files (each with ``X`` and ``y``) as one .npz for ``policy assess``.

    Read without unpickling; a missing file, a pickled or malformed array is InvalidInput.
    """
    arrays: dict[str, np.ndarray] = {}
    for side, path in (("members", members), ("non_members", non_members)):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InvalidInput(f"{path.name[:64]}: not a readable .npz file of arrays") from exc
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InvalidInput(f"{path.name[:64]}: give an .npz file with arrays X and y")
        with loaded:
            if set(loaded.files) != {"X", "y"}:
                raise InvalidInput(f"{path.name[:64]}: the .npz must hold exactly X and y")
            try:
                arrays[f"{side}_X"], arrays[f"{side}_y"] = loaded["X"], loaded["y"]
            except (OSError, ValueError, EOFError) as exc:
                raise InvalidInput(f"{path.name[:64]}: X or y cannot be read") from exc
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()
