"""The data half of the symbolic pickle machine: stack, marks, memo, constants, containers.

These opcodes move values around exactly as ``pickle.Unpickler`` does (``_pop_mark`` swaps the
stack like ``Unpickler.pop_mark``; ``MEMOIZE`` stores under the memo's length), with symbolic
values from ``_pickle_values``. Nothing here judges anything: the subclass in ``_pickle_vm``
decides what imports, calls and builds mean, and is told through three hooks when a container
operation reaches a method of something else, when a constant holds a pickle, and when a
buffer comes from outside the stream.
"""

from __future__ import annotations

from typing import Any

from modelkeep.scanning._pickle_values import ByteArray, OutOfBand, SymDict, SymSet

__all__ = ["Broken", "StackMachine"]

# Containers stop keeping their items past this many in one stream (memory stays bounded by
# a constant times the file size anyway; this keeps that constant small for huge pickles).
_RETAIN = 2_000_000
_MARK_ERROR = "a MARK is missing"
_PICKLE_HEADS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class Broken(Exception):
    """The stream cannot be loaded: a loader raises here, after running what came before."""


class StackMachine:
    """Stack, mark stack and memo of one pickle stream, and the opcodes that only move data."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.retained = 0

    # -- hooks ------------------------------------------------------------------------------

    def _method(self, target: object, op: str) -> None:
        """A container opcode (APPEND, SETITEM, ADDITEMS) on something that is not one."""
        raise NotImplementedError

    def _embedded(self, value: bytes | str) -> None:
        """A bytes or text constant that is itself a pickle."""
        raise NotImplementedError

    def _out_of_band(self) -> None:
        """A protocol 5 buffer taken from outside the stream."""
        raise NotImplementedError

    # -- stack helpers ----------------------------------------------------------------------

    def _pop(self) -> Any:
        if not self.stack:
            raise Broken("the stack is empty")
        return self.stack.pop()

    def _top(self) -> Any:
        if not self.stack:
            raise Broken("the stack is empty")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise Broken(_MARK_ERROR)
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _keep(self, count: int) -> bool:
        self.retained += count
        return self.retained <= _RETAIN

    def _push_constant(self, value: Any) -> None:
        if isinstance(value, bytes | str) and len(value) >= 16 and value[-1:] in (b".", "."):
            head = value[:2] if isinstance(value, bytes) else value[:2].encode("latin-1", "replace")
            if head in _PICKLE_HEADS:
                self._embedded(value)
        self.stack.append(value)

    # -- opcodes: structure -----------------------------------------------------------------

    def _op_PROTO(self, arg: Any) -> None:
        if not 0 <= arg <= 5:
            raise Broken(f"unsupported pickle protocol {arg}")
        self.proto = arg

    def _op_FRAME(self, arg: Any) -> None:
        pass

    def _op_MARK(self, arg: Any) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def _op_POP(self, arg: Any) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def _op_POP_MARK(self, arg: Any) -> None:
        self._pop_mark()

    def _op_DUP(self, arg: Any) -> None:
        self.stack.append(self._top())

    # -- opcodes: constants -----------------------------------------------------------------

    def _constant(self, arg: Any) -> None:
        self._push_constant(arg)

    _op_INT = _op_BININT = _op_BININT1 = _op_BININT2 = _constant
    _op_LONG = _op_LONG1 = _op_LONG4 = _op_FLOAT = _op_BINFLOAT = _constant
    _op_STRING = _op_BINSTRING = _op_SHORT_BINSTRING = _constant
    _op_BINBYTES = _op_SHORT_BINBYTES = _op_BINBYTES8 = _constant
    _op_UNICODE = _op_BINUNICODE = _op_SHORT_BINUNICODE = _op_BINUNICODE8 = _constant

    def _op_NONE(self, arg: Any) -> None:
        self.stack.append(None)

    def _op_NEWTRUE(self, arg: Any) -> None:
        self.stack.append(True)

    def _op_NEWFALSE(self, arg: Any) -> None:
        self.stack.append(False)

    def _op_BYTEARRAY8(self, arg: Any) -> None:
        self.stack.append(ByteArray(arg))

    def _op_NEXT_BUFFER(self, arg: Any) -> None:
        self._out_of_band()
        self.stack.append(OutOfBand())

    def _op_READONLY_BUFFER(self, arg: Any) -> None:
        self._top()

    # -- opcodes: containers ----------------------------------------------------------------

    def _op_EMPTY_LIST(self, arg: Any) -> None:
        self.stack.append([])

    def _op_EMPTY_TUPLE(self, arg: Any) -> None:
        self.stack.append(())

    def _op_EMPTY_DICT(self, arg: Any) -> None:
        self.stack.append(SymDict())

    def _op_EMPTY_SET(self, arg: Any) -> None:
        self.stack.append(SymSet())

    def _op_LIST(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(items if self._keep(len(items)) else [])

    def _op_TUPLE(self, arg: Any) -> None:
        # _pop_mark swaps self.stack: take the items before choosing where to push.
        items = tuple(self._pop_mark())
        self.stack.append(items)

    def _op_TUPLE1(self, arg: Any) -> None:
        self.stack.append((self._pop(),))

    def _op_TUPLE2(self, arg: Any) -> None:
        second = self._pop()
        self.stack.append((self._pop(), second))

    def _op_TUPLE3(self, arg: Any) -> None:
        third = self._pop()
        second = self._pop()
        self.stack.append((self._pop(), second, third))

    def _op_DICT(self, arg: Any) -> None:
        items = self._pop_mark()
        result = SymDict()
        if self._keep(len(items) // 2):
            result.pairs = list(zip(items[::2], items[1::2], strict=False))
        self.stack.append(result)

    def _op_FROZENSET(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(SymSet(items if self._keep(len(items)) else [], frozen=True))

    def _op_APPEND(self, arg: Any) -> None:
        value = self._pop()
        self._extend(self._top(), [value], "APPEND")

    def _op_APPENDS(self, arg: Any) -> None:
        items = self._pop_mark()
        self._extend(self._top(), items, "APPENDS")

    def _extend(self, target: Any, items: list[Any], op: str) -> None:
        if isinstance(target, list):
            if self._keep(len(items)):
                target.extend(items)
        else:
            self._method(target, op)

    def _op_SETITEM(self, arg: Any) -> None:
        value = self._pop()
        key = self._pop()
        self._set_items(self._top(), [key, value], "SETITEM")

    def _op_SETITEMS(self, arg: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise Broken("SETITEMS has an odd number of items")
        self._set_items(self._top(), items, "SETITEMS")

    def _set_items(self, target: Any, items: list[Any], op: str) -> None:
        if isinstance(target, SymDict):
            if self._keep(len(items) // 2):
                target.pairs.extend(zip(items[::2], items[1::2], strict=False))
        else:
            self._method(target, op)

    def _op_ADDITEMS(self, arg: Any) -> None:
        items = self._pop_mark()
        target = self._top()
        if isinstance(target, SymSet) and not target.frozen:
            if self._keep(len(items)):
                target.items.extend(items)
        else:
            self._method(target, "ADDITEMS")

    # -- opcodes: memo ----------------------------------------------------------------------

    def _op_GET(self, arg: Any) -> None:
        if arg not in self.memo:
            raise Broken(f"memo entry {arg} was never stored")
        self.stack.append(self.memo[arg])

    _op_BINGET = _op_LONG_BINGET = _op_GET

    def _op_PUT(self, arg: Any) -> None:
        if arg < 0:
            raise Broken("negative memo index")
        self.memo[arg] = self._top()

    _op_BINPUT = _op_LONG_BINPUT = _op_PUT

    def _op_MEMOIZE(self, arg: Any) -> None:
        self.memo[len(self.memo)] = self._top()
