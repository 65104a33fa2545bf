"""A symbolic pickle machine: runs the opcodes of one stream without importing or calling anything.

Opcodes come from ``pickletools.genops``; the machine keeps the stack, the mark stack and the
memo exactly as ``pickle.Unpickler`` would, but with symbolic values (``_pickle_values``). So a
name assembled on the stack, stored in the memo under one index and fetched back under another
(the "memo games" that hide ``os.system`` from scanners reading opcodes one at a time) is
resolved to the name the loader would import. Every import is judged against the allowlist
(``_pickle_policy``), every call (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST) against its target and
arguments, every BUILD against the object it changes.

Two loaders put more than opcodes in a stream, and the machine follows them: joblib writes the
bytes of each NumPy array right after the BUILD of its ``NumpyArrayWrapper`` (skipped here, or
analysed as the nested pickle it is for object arrays), and PyTorch checkpoints name their
storages by persistent id (recorded for the caller to check against the archive).
"""

from __future__ import annotations

import _compat_pickle
import math
import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from modelkeep.scanning._context import Scan
from modelkeep.scanning._pickle_libraries import LIBRARIES, library_call_problem, library_of
from modelkeep.scanning._pickle_policy import ALLOWED, TORCH_STORAGE_SIZES, danger
from modelkeep.scanning._pickle_stack import Broken, StackMachine
from modelkeep.scanning._pickle_values import (
    Call,
    Global,
    Persistent,
    SymDict,
    Unknown,
    describe,
)

__all__ = ["StorageRef", "StreamResult", "run_stream"]

_CONVERT = "convert the model to ONNX, safetensors or skops"


@dataclass(frozen=True)
class StorageRef:
    """A PyTorch storage a checkpoint names: its key, storage class and element count."""

    key: str
    storage: str
    numel: int


@dataclass
class StreamResult:
    """What one pickle stream held. ``end`` is the byte after its STOP (or where it broke)."""

    end: int
    complete: bool
    value: object = None
    protocol: int = 0
    joblib: bool = False
    storages: list[StorageRef] = field(default_factory=list)
    #: Well-known ML libraries whose constructors the stream uses (``_pickle_libraries``).
    libraries: set[str] = field(default_factory=set)


def run_stream(
    scan: Scan,
    reader: IO[bytes],
    location: str,
    depth: int,
    *,
    torch: bool = False,
) -> StreamResult:
    """Analyse the pickle stream starting at ``reader``'s position; findings go to ``scan``.

    Never raises for bad input: a broken stream is a finding and a result with
    ``complete=False``. ``torch`` accepts PyTorch's persistent ids (storages).
    """
    return _Machine(scan, reader, location, depth, torch).run()


class _Machine(StackMachine):
    def __init__(
        self, scan: Scan, reader: IO[bytes], location: str, depth: int, torch: bool
    ) -> None:
        super().__init__()
        self.scan = scan
        self.reader = reader
        self.location = location
        self.depth = depth
        self.torch = torch
        self.limit = scan.limits.max_tensor_elements
        self.result = StreamResult(end=reader.tell(), complete=False)
        self.where = location
        self._ops: dict[str, Callable[[Any], None]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_op_")
        }

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> StreamResult:
        index = 0
        try:
            for index, (opcode, arg, pos) in enumerate(pickletools.genops(self.reader)):
                self.where = f"{self.location} @ opcode {index} (byte {pos})"
                name = opcode.name
                if name == "STOP":
                    self.result.value = self._pop()
                    self.result.complete = True
                    break
                handler = self._ops.get(name)
                if handler is None:
                    raise Broken(f"opcode {name} is not supported")
                handler(arg)
                # If genops fails on the next opcode, this is where that opcode starts.
                self.where = f"{self.location} @ opcode {index + 1} (byte {self.reader.tell()})"
        except Broken as exc:
            self._broken(str(exc))
        except (ValueError, struct.error, OverflowError, IndexError, KeyError) as exc:
            # genops reports truncated or unknown opcodes as ValueError; the machine's own
            # IndexError is a stack underflow, exactly where a loader would fail too.
            self._broken(_reason(exc))
        except RecursionError:
            self._broken("values are nested too deeply to analyse")
        self.result.end = self.reader.tell()
        self.result.protocol = self.proto
        if self.result.libraries:
            names = ", ".join(LIBRARIES[top] for top in sorted(self.result.libraries))
            self.scan.info(
                self.location,
                f"builds objects with constructors of {names}, which the scanner shows harmless "
                "to construct; the file is refused as pickle all the same",
            )
        return self.result

    def _broken(self, reason: str) -> None:
        self.scan.high(
            self.where,
            f"the pickle stream is broken here ({reason}); a loader fails at this point after "
            "running everything before it, and nothing after it was analysed",
        )

    # -- findings ---------------------------------------------------------------------------

    def _import(self, module: str, name: str) -> Global:
        if self.proto < 3:
            # What Unpickler.find_class does with fix_imports: Python 2 names map to Python 3.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        found = Global(module, name)
        if (module, name) in ALLOWED:
            return found
        library = library_of(found)
        if library is not None:
            self.result.libraries.add(library)
        else:
            reason = danger(module, name)
            shown = describe(found, 100)
            if reason is not None:
                self.scan.critical(
                    self.where,
                    f"imports {shown}, a known code-execution target ({reason}): loading this "
                    f"file runs code. Do not load it; if you made it, {_CONVERT}",
                )
            else:
                self.scan.critical(
                    self.where,
                    f"imports {shown}, which is not on the allowlist of harmless constructors: "
                    "loading this file imports that module and can run its code. Do not load "
                    f"it unless you trust who made it; {_CONVERT}",
                )
        return found

    def _call(self, target: object, args: object, op: str) -> Call:
        harmless = False
        if not isinstance(args, tuple):
            self.scan.critical(
                self.where, f"{op} calls {describe(target)} with {describe(args)} as arguments"
            )
        elif isinstance(target, Global):
            harmless = self._judge_call(target, args, op)
        elif isinstance(target, Call) and not target.harmless:
            pass  # the target was reported where it was made
        else:
            self.scan.critical(
                self.where,
                f"{op} calls {describe(target)}, a value computed earlier in the pickle, not a "
                "name on the allowlist: the scanner cannot prove the call harmless (a known "
                "trick to reach os.system through getattr or a method)",
            )
        return Call(target, args, op, harmless)

    def _judge_call(self, target: Global, args: tuple[Any, ...], op: str) -> bool:
        rule = ALLOWED.get((target.module, target.name))
        shown = describe(target, 100)
        if rule is None and library_of(target) is not None:
            problem = library_call_problem(target, args, self.limit)
            if problem is not None:
                self.scan.critical(
                    self.where,
                    f"{op} calls {shown}{_args_text(args)}, a name of a well-known ML library, "
                    f"but it {problem}: the scanner cannot show this harmless. Do not load "
                    f"this file; {_CONVERT}",
                )
            return problem is None
        if rule is None or not rule.callable:
            self.scan.critical(
                self.where,
                f"{op} calls {shown}{_args_text(args)}: the loader runs it while loading. "
                f"Do not load this file; {_CONVERT}",
            )
            return False
        if rule.transparent:
            return self._judge_transparent(target, args, op)
        problem = rule.check(args, self.limit) if rule.check is not None else None
        if problem is not None:
            self.scan.critical(
                self.where,
                f"{op} calls {shown}, which is allowlisted, but it {problem}; "
                "an honest file never does this",
            )
            return False
        return True

    def _judge_transparent(self, target: Global, args: tuple[Any, ...], op: str) -> bool:
        # copyreg._reconstructor(cls, base, state) makes base.__new__(cls[, state]) and may run
        # base.__init__(obj, state); copyreg.__newobj__(cls, *args) runs cls.__new__(cls, *args).
        cls = args[0] if args else None
        if not isinstance(cls, Global):
            self.scan.critical(
                self.where, f"{op} calls {describe(target)} on {describe(cls)}, not a class name"
            )
            return False
        if target.name != "_reconstructor":
            return self._judge_call(cls, args[1:], op)
        if len(args) != 3:
            self.scan.critical(self.where, f"{op} calls {describe(target)} with bad arguments")
            return False
        base = args[1]
        if base != Global("builtins", "object") and (
            not isinstance(base, Global) or not self._judge_call(base, (args[2],), op)
        ):
            return False
        return self._judge_call(cls, (), op)

    def _method(self, target: object, op: str) -> None:
        # APPEND(S), SETITEM(S) and ADDITEMS on something other than the matching container
        # make the loader call a method of it: harmless on objects the allowlist built.
        if isinstance(target, Call):
            if target.harmless:
                target.items += 1
            return
        self.scan.critical(
            self.where,
            f"{op} calls a method of {describe(target)}: only lists, dicts and sets may be "
            "filled this way, anything else can run code",
        )

    # -- hooks from the stack machine -------------------------------------------------------

    def _embedded(self, value: bytes | str) -> None:
        try:
            data = value if isinstance(value, bytes) else value.encode("latin-1")
        except UnicodeEncodeError:
            return
        self.scan.nested(data, f"{self.where} > embedded pickle", self.depth + 1)

    def _out_of_band(self) -> None:
        self.scan.high(
            self.where,
            "the pickle takes out-of-band buffers (protocol 5) that are not in the file; it "
            "cannot be analysed or loaded on its own",
        )

    # -- opcodes: imports and calls ---------------------------------------------------------

    def _op_GLOBAL(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        if " " in name:
            self.scan.critical(self.where, f"GLOBAL names an ambiguous module/name {arg!r:.80}")
        self.stack.append(self._import(module, name))

    def _op_STACK_GLOBAL(self, arg: Any) -> None:
        name = self._pop()
        module = self._pop()
        if not isinstance(module, str) or not isinstance(name, str):
            self.scan.critical(
                self.where,
                f"STACK_GLOBAL imports a name built from {describe(module)} and "
                f"{describe(name)}, which the scanner cannot resolve to text",
            )
            self.stack.append(Unknown())
            return
        self.stack.append(self._import(module, name))

    def _ext(self, arg: Any) -> None:
        self.scan.critical(
            self.where,
            f"imports through the copyreg extension registry (code {arg}): the name depends on "
            "the loading process and cannot be proven harmless; honest pickles never do this",
        )
        self.stack.append(Unknown())

    _op_EXT1 = _op_EXT2 = _op_EXT4 = _ext

    def _op_REDUCE(self, arg: Any) -> None:
        args = self._pop()
        target = self._pop()
        self.stack.append(self._call(target, args, "REDUCE"))

    def _op_NEWOBJ(self, arg: Any) -> None:
        args = self._pop()
        target = self._pop()
        self.stack.append(self._call(target, args, "NEWOBJ"))

    def _op_NEWOBJ_EX(self, arg: Any) -> None:
        kwargs = self._pop()
        args = self._pop()
        target = self._pop()
        if not (isinstance(kwargs, SymDict) and not kwargs.pairs):
            self.scan.critical(
                self.where, f"NEWOBJ_EX passes keyword arguments to {describe(target)}"
            )
            self.stack.append(Call(target, args, "NEWOBJ_EX", False))
            return
        self.stack.append(self._call(target, args, "NEWOBJ_EX"))

    def _op_OBJ(self, arg: Any) -> None:
        items = self._pop_mark()
        if not items:
            raise Broken("OBJ without a class")
        self.stack.append(self._call(items[0], tuple(items[1:]), "OBJ"))

    def _op_INST(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        items = self._pop_mark()
        target = self._import(module, name)
        self.stack.append(self._call(target, tuple(items), "INST"))

    def _op_BUILD(self, arg: Any) -> None:
        state = self._pop()
        inst = self._top()
        if isinstance(inst, Call):
            if not inst.harmless:
                return  # reported where it was made
            inst.state = state
            if inst.target == _WRAPPER:
                self.stack[-1] = self._joblib_array(state)
            elif inst.target in _RECONSTRUCT:
                self._check_array_state(state)
            return
        self.scan.critical(
            self.where,
            f"BUILD sets the state of {describe(inst)}, which no allowlisted constructor made: "
            "this overwrites attributes of a class or module (monkey-patching) when loaded",
        )

    def _op_PERSID(self, arg: Any) -> None:
        self._persistent(arg)

    def _op_BINPERSID(self, arg: Any) -> None:
        self._persistent(self._pop())

    def _persistent(self, pid: Any) -> None:
        if not self.torch:
            self.scan.high(
                self.where,
                "the pickle refers to persistent objects only a custom loader can provide; "
                "what they are cannot be analysed",
            )
        elif (ref := _storage_ref(pid)) is not None:
            self.result.storages.append(ref)
        else:
            self.scan.high(
                self.where,
                f"unexpected persistent id {describe(pid)}: PyTorch checkpoints only name "
                "storages as ('storage', class, key, location, size)",
            )
        self.stack.append(Persistent(pid))

    # -- arrays -----------------------------------------------------------------------------

    def _check_array_state(self, state: Any) -> None:
        # ndarray.__setstate__((version, shape, dtype, fortran, data)) allocates shape first.
        if isinstance(state, tuple) and len(state) in (4, 5):
            shape = state[1] if len(state) == 5 else state[0]
            count = _product(shape)
            if count is None or count > self.limit:
                self.scan.critical(
                    self.where,
                    f"an array declares shape {describe(shape)}, over the limit of "
                    f"{self.limit} elements (an allocation bomb)",
                )

    def _joblib_array(self, state: Any) -> Call:
        self.result.joblib = True
        fields = _str_dict(state)
        shape = fields.get("shape")
        count = _product(shape)
        if count is None or count > self.limit:
            raise Broken(f"joblib array with shape {describe(shape)}")
        dtype = fields.get("dtype")
        if _dtype_has_objects(dtype):
            # joblib pickles object arrays as a separate stream right here.
            inner = _Machine(
                self.scan, self.reader, f"{self.where} > object array", self.depth, self.torch
            ).run()
            if not inner.complete:
                raise Broken("the object array's pickle is broken")
        else:
            itemsize = _dtype_itemsize(dtype)
            if itemsize is None:
                raise Broken(f"joblib array with an unknown dtype {describe(dtype)}")
            if isinstance(fields.get("numpy_array_alignment_bytes"), int):
                padding = self.reader.read(1)
                if len(padding) != 1 or padding[0] > 64:
                    raise Broken("bad alignment padding before a joblib array")
                self._skip(padding[0])
            self._skip(count * itemsize)
        return Call(Global("numpy", "ndarray"), (), "joblib-array", True)

    def _skip(self, count: int) -> None:
        start = self.reader.tell()
        end = self.reader.seek(0, 2)
        if start + count > end:
            self.reader.seek(end)
            raise Broken("the array data runs past the end of the file")
        self.reader.seek(start + count)


_WRAPPER = Global("joblib.numpy_pickle", "NumpyArrayWrapper")
_RECONSTRUCT = (
    Global("numpy.core.multiarray", "_reconstruct"),
    Global("numpy._core.multiarray", "_reconstruct"),
)


def _str_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, SymDict):
        return {}
    return {k: v for k, v in value.pairs if isinstance(k, str)}


def _product(values: Any) -> int | None:
    if not isinstance(values, tuple | list) or not all(type(v) is int and v >= 0 for v in values):
        return None
    return math.prod(values)


def _dtype_name(dtype: Any) -> str | None:
    if isinstance(dtype, Call) and dtype.args and isinstance(dtype.args, tuple):
        name = dtype.args[0]
        return name if isinstance(name, str) else None
    return dtype if isinstance(dtype, str) else None


def _dtype_has_objects(dtype: Any) -> bool:
    name = _dtype_name(dtype)
    if name is not None and name.startswith("O"):
        return True
    state = dtype.state if isinstance(dtype, Call) else None
    # The dtype's pickled state ends with its flags; bit 0 means "holds object references".
    return (
        isinstance(state, tuple)
        and len(state) >= 8
        and type(state[7]) is int
        and bool(state[7] & 1)
    )


def _dtype_itemsize(dtype: Any) -> int | None:
    name = _dtype_name(dtype)
    state = dtype.state if isinstance(dtype, Call) else None
    if (
        name is not None
        and name.startswith("V")
        and isinstance(state, tuple)
        and len(state) >= 6
        and type(state[5]) is int
    ):
        return state[5] if state[5] > 0 else None
    if name is None or len(name) > 16:
        return None
    import numpy as np

    try:
        # Parsing a short dtype string is plain data handling: nothing is imported or run.
        return int(np.dtype(name).itemsize)
    except (TypeError, ValueError, SyntaxError):
        return None


def _storage_ref(pid: Any) -> StorageRef | None:
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
        return None
    storage, key, _location, numel = pid[1:5]
    if not (
        isinstance(storage, Global)
        and storage.module in ("torch", "torch.storage")
        and storage.name in TORCH_STORAGE_SIZES
        and isinstance(key, str)
        and type(numel) is int
        and numel >= 0
    ):
        return None
    return StorageRef(key, storage.name, numel)


def _args_text(args: tuple[Any, ...]) -> str:
    return describe(args, 80) if args else "()"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__
