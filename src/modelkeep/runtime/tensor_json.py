"""Output tensors as JSON, in Open Inference Protocol (KServe V2) terms, for any protocol.

The protocols write outputs with these (``api/v2`` and the row protocols reach them through
``api/v2/_json.py``), and payload capture keeps every response in this form whatever protocol
the caller spoke, so the service layer needs no protocol package to write one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from modelkeep.errors import InternalError, InvalidInput
from modelkeep.runtime.signature import v2_datatype

__all__ = ["json_data", "json_outputs", "shown"]


def shown(name: str) -> str:
    """A tensor name safe to put in a message: quoted and cut short."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


def json_data(name: str, array: np.ndarray, datatype: str) -> Any:
    """The flat ``data`` value for an output: an array orjson writes natively, or a list.

    Non-finite floats come out as ``null`` (JSON has no NaN); binary outputs keep them exact.
    """
    if datatype == "BYTES":
        try:
            return [
                value if type(value) is str else bytes(value).decode("utf-8")
                for value in array.ravel().tolist()
            ]
        except (UnicodeDecodeError, TypeError):
            raise InvalidInput(
                f"output {shown(name)} holds bytes that are not UTF-8 text; "
                "request it as binary data"
            ) from None
    # ravel() gives a C-contiguous array (a copy when it must), which orjson writes natively.
    flat = array.ravel()
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    if flat.dtype.kind not in "biuf":
        raise InternalError(f"output {shown(name)} has a dtype JSON cannot carry")
    return flat


def json_outputs(outputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every output as a V2 JSON output entry (name, datatype, shape, data), in order.

    The entries are what a V2 response lists when every output is asked for as JSON; write them
    with ``orjson.OPT_SERIALIZE_NUMPY``.
    """
    entries: list[dict[str, Any]] = []
    for name, value in outputs.items():
        array = value if type(value) is np.ndarray else np.asarray(value)
        try:
            datatype = v2_datatype(array.dtype)
        except InvalidInput as exc:
            raise InternalError(f"output {shown(name)} has no V2 datatype") from exc
        entries.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": json_data(name, array, datatype),
            }
        )
    return entries
