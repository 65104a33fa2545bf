"""The symbolic values the pickle analyser pushes instead of real objects.

Nothing here is ever called or imported: a ``Global`` is only the name a loader would import,
a ``Call`` only records what a loader would call with which arguments. Constants (numbers,
strings, bytes) stay themselves, lists are lists and tuples are tuples of symbolic values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ByteArray",
    "Call",
    "Global",
    "OutOfBand",
    "Persistent",
    "SymDict",
    "SymSet",
    "Unknown",
    "describe",
    "is_bytes_like",
]


@dataclass(frozen=True, slots=True)
class Global:
    """A name the loader would import (GLOBAL, STACK_GLOBAL, INST)."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Call:
    """What calling ``target`` with ``args`` would return. ``harmless`` means the target is
    allowlisted and its arguments passed its check; ``items`` counts entries set on it later
    (an OrderedDict filled by SETITEMS); ``state`` is what BUILD gave it."""

    target: object
    args: object
    op: str
    harmless: bool
    items: int = 0
    state: object = None


@dataclass(eq=False, slots=True)
class SymDict:
    pairs: list[tuple[object, object]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class SymSet:
    items: list[object] = field(default_factory=list)
    frozen: bool = False


@dataclass(eq=False, slots=True)
class Persistent:
    """An object only the loader's ``persistent_load`` can produce (PyTorch storages)."""

    pid: object


@dataclass(eq=False, slots=True)
class ByteArray:
    data: bytes


class OutOfBand:
    """A protocol 5 buffer passed outside the pickle (NEXT_BUFFER)."""


class Unknown:
    """A value the analyser cannot know (the result of an extension-registry import)."""


def is_bytes_like(value: object) -> bool:
    """Bytes, text, or bytes as pickle protocols 0-2 encode them (``_codecs.encode``)."""
    if isinstance(value, bytes | str | ByteArray):
        return True
    return (
        isinstance(value, Call) and value.harmless and value.target == Global("_codecs", "encode")
    )


def describe(value: object, limit: int = 60) -> str:
    """A short, printable rendering of a symbolic value for a finding's message."""
    text = _render(value, 2)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render(value: object, depth: int) -> str:
    if isinstance(value, Global):
        return value.qualname
    if isinstance(value, Call):
        target = _render(value.target, depth - 1) if depth > 0 else "..."
        args = _render(value.args, depth - 1) if depth > 0 else "(...)"
        return f"{target}{args if args.startswith('(') else '(' + args + ')'}"
    if isinstance(value, tuple):
        if depth <= 0:
            return "(...)"
        inner = ", ".join(_render(item, depth - 1) for item in value[:4])
        more = ", ..." if len(value) > 4 else ""
        comma = "," if len(value) == 1 else ""
        return f"({inner}{comma}{more})"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, SymDict):
        return f"{{{len(value.pairs)} items}}"
    if isinstance(value, SymSet):
        return f"{{set of {len(value.items)}}}"
    if isinstance(value, Persistent):
        return "<persistent object>"
    if isinstance(value, ByteArray):
        return f"bytearray({len(value.data)} bytes)"
    if isinstance(value, OutOfBand | Unknown):
        return "<unknown>"
    if isinstance(value, str | bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, int) and value.bit_length() > 64:
        # repr of a huge integer is slow, and refused past 4300 digits.
        return f"<{value.bit_length()}-bit integer>"
    return repr(value)[:40]
