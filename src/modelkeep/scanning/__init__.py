"""Malicious-model scanning: identify a model file by its content and check it, never load it.

``scan_bytes``, ``scan_path`` and ``scan_reader`` (a seekable file, read only as far as
its analyser needs) return a :class:`ScanReport` whose verdict is a contract
(``safe`` 0, ``malicious`` 1, ``unsafe-format`` 2, ``error`` 3, see :data:`EXIT_CODES`). No
model is ever loaded with a loader that could run code: pickles are analysed opcode by opcode,
archives are opened with limits, ONNX, safetensors, GGUF, skops, Keras, XGBoost and LightGBM
headers and structures are parsed and checked. ``docs/scanning.md`` lists every rule.
"""

from modelkeep.scanning._context import FileSlice
from modelkeep.scanning._scanner import scan_bytes, scan_path, scan_reader
from modelkeep.scanning.detect import detect_format
from modelkeep.scanning.report import (
    EXIT_CODES,
    Finding,
    ScanLimits,
    ScanReport,
    Severity,
    Verdict,
)

__all__ = [
    "EXIT_CODES",
    "FileSlice",
    "Finding",
    "ScanLimits",
    "ScanReport",
    "Severity",
    "Verdict",
    "detect_format",
    "scan_bytes",
    "scan_path",
    "scan_reader",
]
