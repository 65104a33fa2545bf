"""Which names a pickle may import and call: an allowlist, with a denylist only for wording.

The allowlist decides. A name on it is a harmless constructor (``collections.OrderedDict``,
NumPy's array rebuilders, PyTorch's tensor rebuilders...), and even those are checked against
their arguments where the arguments could make them dangerous (``bytearray(10**12)`` allocates a
terabyte; ``_codecs.encode`` is only allowed as pickle uses it for bytes). Anything else a
pickle imports is malicious evidence: importing a module runs its code, and published bypasses
defeat every denylist. The denylist below only lets the report say *why* a name is notorious.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelkeep.scanning._pickle_libraries import is_plain
from modelkeep.scanning._pickle_values import (
    Call,
    Global,
    Persistent,
    SymDict,
    describe,
    is_bytes_like,
)

__all__ = ["ALLOWED", "TORCH_STORAGE_SIZES", "Rule", "danger"]

Check = Callable[[tuple[Any, ...], int], str | None]


@dataclass(frozen=True)
class Rule:
    """What a pickle may do with an allowlisted name.

    ``callable``: REDUCE/NEWOBJ/OBJ/INST may call it (else it may only be referenced, e.g. a
    class passed to a rebuilder). ``check`` inspects the symbolic arguments and returns a
    problem or None; its second argument is the element limit. ``transparent``: a helper that
    calls its first argument (``copyreg._reconstructor``), so that argument is what is judged.
    """

    callable: bool = False
    check: Check | None = None
    transparent: bool = False


def _product(values: object) -> int | None:
    if not isinstance(values, tuple | list) or not all(type(v) is int for v in values):
        return None
    if any(v < 0 for v in values):
        return None
    return math.prod(values)


def _shape_problem(shape: object, limit: int, what: str) -> str | None:
    count = _product(shape)
    if count is None:
        return f"gives {what} a shape that is not a tuple of non-negative integers"
    if count > limit:
        return (
            f"declares {what} of {count} elements, over the limit of {limit} (an allocation bomb)"
        )
    return None


def _any(args: tuple[Any, ...], limit: int) -> str | None:
    return None


def _no_ints(args: tuple[Any, ...], limit: int) -> str | None:
    # bytes(n) and bytearray(n) allocate n zero bytes: a one-line allocation bomb.
    if len(args) > 3:
        return "takes too many arguments"
    if args and not (is_bytes_like(args[0]) or isinstance(args[0], list)):
        return f"is called with {describe(args[0])}, not bytes or text"
    return None


def _numbers(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) > 3 or not all(v is None or type(v) in (int, float, str, bool) for v in args):
        return "is called with arguments that are not plain numbers"
    return None


def _plain(args: tuple[Any, ...], limit: int) -> str | None:
    # Containers and value types built from constants and objects already shown harmless.
    if len(args) > 4 or not is_plain(args):
        return "is called with something other than plain data"
    return None


def _default_factory(args: tuple[Any, ...], limit: int) -> str | None:
    # defaultdict(factory) calls factory for a missing key later, never while loading; only
    # a plain type is accepted all the same.
    if len(args) > 2 or (args and args[0] is not None and args[0] not in _FACTORIES):
        return "is given a default factory other than a plain container or number type"
    return _plain(args[1:], limit)


def _range(args: tuple[Any, ...], limit: int) -> str | None:
    # A range is lazy, but list(range(10**12)) or set(...) of it is an allocation bomb.
    if not 1 <= len(args) <= 3 or not all(type(v) is int for v in args) or 0 in args[2:]:
        return "is called with arguments that are not integers"
    if len(range(*args)) > limit:
        return f"spans more than {limit} numbers (an allocation bomb once filled in)"
    return None


def _codecs_encode(args: tuple[Any, ...], limit: int) -> str | None:
    # Pickle protocols 0-2 store bytes as _codecs.encode(text, "latin1"); nothing else is allowed.
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return None
    return "is called other than as pickle encodes bytes (text, 'latin1')"


def _np_reconstruct(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) != 3 or args[0] not in _NDARRAY_CLASSES:
        return "is called with a class other than numpy.ndarray"
    return _shape_problem(args[1], limit, "an array")


def _np_dtype(args: tuple[Any, ...], limit: int) -> str | None:
    # A dtype name ("f8"), or a NumPy scalar type (numpy.record for record arrays).
    first = args[0] if args else None
    named = isinstance(first, str) and len(first) <= 64
    typed = isinstance(first, Global) and first.module == "numpy"
    if not (named or typed) or len(args) > 3:
        return "is called with something other than a short dtype name or a NumPy type"
    return None


def _np_scalar(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) not in (1, 2) or not _is_dtype(args[0]):
        return "is called without a dtype"
    return None


def _np_frombuffer(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) != 4 or not _is_dtype(args[1]):
        return "is called with unexpected arguments"
    return _shape_problem(args[2], limit, "an array")


def _torch_rebuild_tensor(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) < 4 or not isinstance(args[0], Persistent):
        return "is called without a storage loaded by the checkpoint's own loader"
    problem = _shape_problem(args[2], limit, "a tensor")
    if problem is not None:
        return problem
    if len(args) >= 6 and not _empty_hooks(args[5]):
        return "installs backward hooks, callables that run during training"
    return None


def _torch_rebuild_parameter(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) < 3 or not isinstance(args[0], Call):
        return "is called without a tensor"
    if not _empty_hooks(args[2]):
        return "installs backward hooks, callables that run during training"
    return None


def _torch_small(args: tuple[Any, ...], limit: int) -> str | None:
    if len(args) > 2 or not all(type(v) in (int, str) or _product(v) is not None for v in args):
        return "is called with unexpected arguments"
    return None


def _wrapper(args: tuple[Any, ...], limit: int) -> str | None:
    # joblib's array placeholder; its state is checked where it is built.
    if len(args) > 6:
        return "is called with unexpected arguments"
    return None


def _empty_hooks(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, SymDict):
        return not value.pairs
    return (
        isinstance(value, Call)
        and value.target == Global("collections", "OrderedDict")
        and value.args == ()
        and value.items == 0
    )


def _is_dtype(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, Call) and value.target == Global("numpy", "dtype")
    )


# ndarray and the subclasses NumPy itself pickles through _reconstruct.
_NDARRAY_CLASSES = (
    Global("numpy", "ndarray"),
    Global("numpy", "matrix"),
    Global("numpy", "recarray"),
    Global("numpy.rec", "recarray"),
    Global("numpy.ma.core", "MaskedArray"),
    Global("numpy.char", "chararray"),
)

#: Element size in bytes of each PyTorch storage class a checkpoint may name.
TORCH_STORAGE_SIZES: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QUInt8Storage": 1,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}
_TORCH_DTYPES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "float8_e4m3fn",
    "float8_e5m2", "qint8", "quint8", "qint32",
)  # fmt: skip

_CALL_ANY = Rule(callable=True, check=_any)
_CALL_PLAIN = Rule(callable=True, check=_plain)
_CALL_NUMBERS = Rule(callable=True, check=_numbers)
ALLOWED: dict[tuple[str, str], Rule] = {
    ("collections", "OrderedDict"): _CALL_ANY,
    ("collections", "defaultdict"): Rule(callable=True, check=_default_factory),
    ("collections", "Counter"): _CALL_PLAIN,
    ("collections", "deque"): _CALL_PLAIN,
    ("builtins", "list"): _CALL_PLAIN,
    ("builtins", "dict"): _CALL_PLAIN,
    ("builtins", "tuple"): _CALL_PLAIN,
    ("builtins", "int"): _CALL_NUMBERS,
    ("builtins", "float"): _CALL_NUMBERS,
    ("builtins", "str"): _CALL_NUMBERS,
    ("builtins", "bool"): _CALL_NUMBERS,
    ("datetime", "date"): _CALL_PLAIN,
    ("datetime", "datetime"): _CALL_PLAIN,
    ("datetime", "time"): _CALL_PLAIN,
    ("datetime", "timedelta"): _CALL_PLAIN,
    ("datetime", "timezone"): _CALL_PLAIN,
    ("decimal", "Decimal"): _CALL_NUMBERS,
    ("fractions", "Fraction"): _CALL_NUMBERS,
    ("uuid", "UUID"): _CALL_PLAIN,
    ("builtins", "set"): _CALL_ANY,
    ("builtins", "frozenset"): _CALL_ANY,
    ("builtins", "complex"): Rule(callable=True, check=_numbers),
    ("builtins", "slice"): Rule(callable=True, check=_numbers),
    ("builtins", "range"): Rule(callable=True, check=_range),
    ("builtins", "bytearray"): Rule(callable=True, check=_no_ints),
    ("builtins", "bytes"): Rule(callable=True, check=_no_ints),
    ("builtins", "object"): Rule(),
    ("_codecs", "encode"): Rule(callable=True, check=_codecs_encode),
    ("copyreg", "_reconstructor"): Rule(callable=True, transparent=True),
    ("copyreg", "__newobj__"): Rule(callable=True, transparent=True),
    ("numpy", "ndarray"): Rule(),
    ("numpy", "dtype"): Rule(callable=True, check=_np_dtype),
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): Rule(callable=True, check=_wrapper),
    ("torch._utils", "_rebuild_tensor"): Rule(callable=True, check=_torch_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): Rule(callable=True, check=_torch_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): Rule(callable=True, check=_torch_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): Rule(callable=True, check=_torch_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): Rule(
        callable=True, check=_torch_rebuild_parameter
    ),
    ("torch", "Size"): Rule(callable=True, check=_torch_small),
    ("torch", "device"): Rule(callable=True, check=_torch_small),
}
_FACTORIES = (
    *(Global("builtins", name) for name in ("list", "dict", "set", "int", "float", "str", "tuple")),
    Global("collections", "OrderedDict"),
)
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED[(_core, "_reconstruct")] = Rule(callable=True, check=_np_reconstruct)
    ALLOWED[(_core, "scalar")] = Rule(callable=True, check=_np_scalar)
for _numeric in ("numpy.core.numeric", "numpy._core.numeric"):
    ALLOWED[(_numeric, "_frombuffer")] = Rule(callable=True, check=_np_frombuffer)
for _storage in TORCH_STORAGE_SIZES:
    ALLOWED[("torch", _storage)] = Rule()
ALLOWED[("torch.storage", "UntypedStorage")] = Rule()
for _dtype in _TORCH_DTYPES:
    ALLOWED[("torch", _dtype)] = Rule()

# Modules whose every name can run code, read or write files, or reach the network.
_DANGEROUS_MODULES = {
    "os": "operating system calls",
    "posix": "operating system calls",
    "nt": "operating system calls",
    "subprocess": "runs programs",
    "_posixsubprocess": "runs programs",
    "pty": "runs programs",
    "commands": "runs programs",
    "popen2": "runs programs",
    "platform": "runs programs",
    "sys": "interpreter internals",
    "runpy": "runs Python code",
    "code": "runs Python code",
    "codeop": "compiles Python code",
    "importlib": "imports modules",
    "pkgutil": "imports modules",
    "pydoc": "imports arbitrary names",
    "zipimport": "imports modules",
    "imp": "imports modules",
    "marshal": "loads code objects",
    "types": "builds functions from code objects",
    "ctypes": "calls native code",
    "_ctypes": "calls native code",
    "pickle": "loads another pickle",
    "_pickle": "loads another pickle",
    "cPickle": "loads another pickle",
    "dill": "loads another pickle",
    "cloudpickle": "loads another pickle",
    "joblib": "loads another pickle",
    "shelve": "loads pickles",
    "socket": "network access",
    "socketserver": "network access",
    "http": "network access",
    "urllib": "network access",
    "urllib2": "network access",
    "requests": "network access",
    "httpx": "network access",
    "ftplib": "network access",
    "smtplib": "network access",
    "telnetlib": "network access",
    "xmlrpc": "network access",
    "webbrowser": "opens programs",
    "shutil": "file system access",
    "tempfile": "file system access",
    "pathlib": "file system access",
    "glob": "file system access",
    "io": "file system access",
    "_io": "file system access",
    "codecs": "file system access",
    "sqlite3": "file system access",
    "asyncio": "runs programs and network access",
    "multiprocessing": "runs processes",
    "threading": "runs threads",
    "_thread": "runs threads",
    "signal": "process control",
    "gc": "interpreter internals",
    "inspect": "interpreter internals",
    "operator": "calls methods by name (attrgetter, methodcaller)",
    "_operator": "calls methods by name (attrgetter, methodcaller)",
    "functools": "calls arbitrary functions (partial, reduce)",
    "pdb": "runs Python code",
    "bdb": "runs Python code",
    "timeit": "runs Python code",
    "trace": "runs Python code",
    "profile": "runs Python code",
    "cProfile": "runs Python code",
    "logging": "logging.config.listen runs code",
    "site": "interpreter start-up code",
    "ensurepip": "installs packages",
    "pip": "installs packages",
    "setuptools": "runs build code",
    "distutils": "runs build code",
    "yaml": "unsafe YAML loading",
    "jinja2": "template code",
    "torch.hub": "downloads and runs code",
    "torch.jit": "loads TorchScript code",
    "torch.serialization": "loads another pickle",
    "torch.package": "loads packaged code",
    "torch.utils.cpp_extension": "compiles native code",
    "torch._dynamo": "compiles code",
    "torch._inductor": "compiles code",
    "numpy.testing": "runs Python code (runstring)",
    "numpy.f2py": "compiles native code",
    "numpy.distutils": "runs build code",
    "numpy.ctypeslib": "calls native code",
}
_DANGEROUS_NAMES = {
    ("builtins", "eval"): "evaluates Python code",
    ("builtins", "exec"): "executes Python code",
    ("builtins", "compile"): "compiles Python code",
    ("builtins", "__import__"): "imports modules",
    ("builtins", "getattr"): "reaches any attribute, e.g. os.system",
    ("builtins", "setattr"): "overwrites attributes",
    ("builtins", "delattr"): "deletes attributes",
    ("builtins", "open"): "opens files",
    ("builtins", "input"): "reads the terminal",
    ("builtins", "breakpoint"): "starts a debugger",
    ("builtins", "globals"): "interpreter internals",
    ("builtins", "locals"): "interpreter internals",
    ("builtins", "vars"): "interpreter internals",
    ("builtins", "help"): "starts a pager",
    ("builtins", "exit"): "exits the process",
    ("builtins", "quit"): "exits the process",
    ("builtins", "memoryview"): "raw memory access",
    ("builtins", "type"): "builds classes",
    ("builtins", "super"): "interpreter internals",
    ("builtins", "classmethod"): "interpreter internals",
    ("builtins", "staticmethod"): "interpreter internals",
    ("builtins", "property"): "interpreter internals",
    ("numpy", "load"): "loads pickles (allow_pickle)",
    ("numpy", "loads"): "loads pickles",
    ("numpy", "fromfile"): "reads files",
    ("numpy", "memmap"): "maps files",
    ("torch", "load"): "loads another pickle",
    ("torch", "save"): "writes files",
    ("torch", "from_file"): "reads files",
}


def danger(module: str, name: str) -> str | None:
    """Why ``module.name`` is a known code-execution target, or None if it is not listed."""
    reason = _DANGEROUS_NAMES.get((module, name))
    if reason is not None:
        return reason
    if module in ("builtins", "__builtin__", "__builtins__") and name.startswith("__"):
        return "interpreter internals"
    if "__" in name:
        return "reaches interpreter internals through a dunder attribute"
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        reason = _DANGEROUS_MODULES.get(".".join(parts[:end]))
        if reason is not None:
            return reason
    return None
