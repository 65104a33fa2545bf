"""Constructors of well-known ML libraries: what an honest scikit-learn, NumPy, SciPy or pandas
pickle imports beyond the allowlist, and the rules that show them harmless at load time.

An estimator pickle imports dozens of classes (``sklearn.pipeline.Pipeline``,
``sklearn.tree._tree.Tree``...) and a few reconstructor functions, and loading it builds each
object the way pickle does: ``cls.__new__`` then ``__setstate__`` (NEWOBJ, ``copyreg``), or a
class called with plain data (REDUCE). For the classes of these libraries that is data
restoration, not code execution, so such a file is refused *by format* (unsafe-format, exit 2),
not called malicious. The rules, in the order they are applied:

1. The name lives in one of :data:`LIBRARIES`' packages and outside its denied parts: modules
   and classes that read or write files, reach the network, load native code or other pickles,
   compile, or are test helpers (:data:`_DENIED_MODULES`, :data:`_DENIED_NAMES`).
2. A name that is *called* is a class (a CamelCase identifier, no dots, no dunders) or one of
   the library's reconstructor functions (:data:`_RECONSTRUCTORS`), whose arguments are checked.
3. A class called with arguments (its ``__init__`` runs) gets plain data only: constants,
   containers, and objects the allowlist or these rules built; never a function, whose call
   inside ``__init__`` could be chained into a gadget, nor a value the scanner cannot know.
4. Any other name of these libraries (``numpy.log1p`` as a transformer's function) may be
   referenced, never called.

Anything these rules do not cover stays malicious: a name the scanner cannot show harmless is
treated as one that is not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from modelkeep.scanning._pickle_values import ByteArray, Call, Global, SymDict, SymSet

__all__ = ["LIBRARIES", "is_plain", "library_call_problem", "library_of"]

#: Top-level packages whose classes are harmless to construct as pickle does, with the names
#: reports use for them.
LIBRARIES: dict[str, str] = {
    "sklearn": "scikit-learn",
    "numpy": "NumPy",
    "scipy": "SciPy",
    "pandas": "pandas",
    "xgboost": "XGBoost",
    "lightgbm": "LightGBM",
    "torch": "PyTorch",
}
# Packages of which only some parts qualify: PyTorch's module classes (a whole pickled
# nn.Module), nothing of its compilers, code loaders, native ops or distributed runtime.
_ONLY_UNDER = {
    "torch": ("torch.nn.modules",),
    # The boosting libraries' scikit-learn wrappers and their boosters; the rest of them wraps
    # native handles and files.
    "xgboost": ("xgboost.sklearn", "xgboost.core"),
    "lightgbm": ("lightgbm.sklearn", "lightgbm.basic"),
}

# Parts of those packages that touch files, the network, native code or other pickles.
_DENIED_MODULES = (
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "numpy.lib.npyio",
    "numpy.lib._npyio_impl", "numpy.lib._datasource", "numpy.lib.format", "numpy.lib.utils",
    "numpy._pytesttester", "numpy.core._internal", "numpy._core._internal",
    "scipy.io", "scipy.weave", "scipy._lib._testutils", "scipy._lib._ccallback",
    "scipy.datasets", "scipy.misc",
    "sklearn.datasets", "sklearn.utils._testing", "sklearn.externals", "sklearn.utils.fixes",
    "sklearn._build_utils", "sklearn.utils._show_versions",
    "pandas.io", "pandas.testing", "pandas.util", "pandas._testing", "pandas.plotting",
    "pandas.core.computation", "pandas.api",
    "xgboost.data", "xgboost.callback", "xgboost.tracker", "xgboost.collective",
    "xgboost.dask", "xgboost.spark", "xgboost.testing", "xgboost.federated",
    "lightgbm.callback", "lightgbm.dask", "lightgbm.plotting",
)  # fmt: skip
# Boosters are pickled as __new__ plus state (the model's bytes); called, they open files.
_STATE_ONLY = frozenset({"Booster"})
_DENIED_NAMES = frozenset(
    {
        "memmap", "DataSource", "NpzFile", "LowLevelCallable", "FortranFile", "HDFStore",
        "ExcelFile", "ExcelWriter", "DMatrix", "QuantileDMatrix", "DeviceQuantileDMatrix",
        "Dataset", "TextFileReader", "_InnerPredictor",
    }
)  # fmt: skip


def _cls_in_library(args: tuple[Any, ...], top: str) -> str | None:
    cls = args[0] if args else None
    if not isinstance(cls, Global) or not _is_class_name(cls.name) or library_of(cls) != top:
        return f"is called with {_kind(cls)}, not a class of the same library"
    return None


def _pyx_unpickle(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    # Cython's __pyx_unpickle_<Class>(cls, checksum, state): cls.__new__(cls), then the state.
    if len(args) != 3 or type(args[1]) is not int:
        return "is called with unexpected arguments"
    return _cls_in_library(args, top) or _plain_problem(args[2])


def _new_object(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    # sklearn's newObj(cls) returns cls.__new__(cls).
    if len(args) != 1:
        return "is called with unexpected arguments"
    return _cls_in_library(args, top)


def _new_index(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    # pandas' _new_Index(cls, d) builds cls(**d) or cls._simple_new(**d).
    if len(args) != 2:
        return "is called with unexpected arguments"
    return _cls_in_library(args, top) or _plain_problem(args[1])


def _random_ctor(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    # numpy.random's __bit_generator_ctor(name), __generator_ctor(name, ctor) and
    # __randomstate_ctor(name, ctor): a bit generator named by text or by its numpy.random class.
    if len(args) > 2:
        return "is called with unexpected arguments"
    for value in args:
        made = value.target if isinstance(value, Call) and value.harmless else value
        named = isinstance(made, str) and made.isidentifier()
        numpy_random = isinstance(made, Global) and made.module.startswith("numpy.random")
        if not (named or numpy_random):
            return f"is called with {_kind(value)}, not a bit generator of numpy.random"
    return None


def _masked_array(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    # numpy.ma's _mareconstruct(subtype, baseclass, baseshape, basetype) allocates baseshape.
    if len(args) != 4 or args[1] != Global("numpy", "ndarray"):
        return "is called with unexpected arguments"
    shape = args[2]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        return "is called with a shape that is not a tuple of non-negative integers"
    if math.prod(shape) > limit:
        return f"declares an array of {math.prod(shape)} elements, over the limit of {limit}"
    return _cls_in_library(args, top) or _plain_problem(args[3])


def _plain_args(args: tuple[Any, ...], top: str, limit: int) -> str | None:
    return _plain_problem(args)


_Check = Callable[[tuple[Any, ...], str, int], str | None]

#: Functions (not classes) that honest files of these libraries call while loading.
_RECONSTRUCTORS: dict[tuple[str, str], _Check] = {
    ("numpy.random._pickle", "__bit_generator_ctor"): _random_ctor,
    ("numpy.random._pickle", "__generator_ctor"): _random_ctor,
    ("numpy.random._pickle", "__randomstate_ctor"): _random_ctor,
    ("numpy.ma.core", "_mareconstruct"): _masked_array,
    ("sklearn.neighbors._kd_tree", "newObj"): _new_object,
    ("sklearn.neighbors._ball_tree", "newObj"): _new_object,
    ("sklearn.metrics._dist_metrics", "newObj"): _new_object,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas._libs.internals", "_unpickle_block"): _plain_args,
    ("pandas.core.internals.blocks", "new_block"): _plain_args,
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"): _plain_args,
    ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"): _plain_args,
    ("pandas._libs.tslibs.nattype", "__nat_unpickle"): _plain_args,
    ("pandas.core.arrays.categorical", "_new_Categorical"): _plain_args,
}
_PYX_UNPICKLE = re.compile(r"__pyx_unpickle_[A-Za-z][A-Za-z0-9_]*")
# Classes are CamelCase, except SciPy's sparse matrices and arrays (csr_matrix, coo_array...).
_CLASS = re.compile(r"_*[A-Z][A-Za-z0-9_]*|(?:bsr|coo|csc|csr|dia|dok|lil)_(?:matrix|array)")


def _is_class_name(name: str) -> bool:
    return _CLASS.fullmatch(name) is not None and "__" not in name


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def library_of(target: Global) -> str | None:
    """The package (a key of :data:`LIBRARIES`) whose harmless name ``target`` is, or None."""
    top = _top(target.module)
    if top not in LIBRARIES:
        return None
    module = target.module
    if any(module == denied or module.startswith(denied + ".") for denied in _DENIED_MODULES):
        return None
    if top in _ONLY_UNDER and not any(
        module == part or module.startswith(part + ".") for part in _ONLY_UNDER[top]
    ):
        return None
    if target.name.split(".", 1)[0] in _DENIED_NAMES:
        return None
    if (module, target.name) in _RECONSTRUCTORS or _PYX_UNPICKLE.fullmatch(target.name):
        return top
    if "__" in target.name or target.name.startswith(("load", "save", "read_", "to_", "from")):
        return None
    return top


def library_call_problem(target: Global, args: tuple[Any, ...], limit: int) -> str | None:
    """Why calling ``target`` (a name :func:`library_of` accepted) with ``args`` is not shown
    harmless, or None when it is; ``limit`` is the most elements an array it makes may have.
    Without arguments a class is only made (``__new__``, as NEWOBJ and ``copyreg`` do, or an
    ``__init__`` that has nothing to act on)."""
    top = _top(target.module)
    check = _RECONSTRUCTORS.get((target.module, target.name))
    if check is None and _PYX_UNPICKLE.fullmatch(target.name):
        check = _pyx_unpickle
    if check is not None:
        return check(args, top, limit)
    if not _is_class_name(target.name):
        return "is a function, not a class: only its reconstructors may be called"
    if not args:
        return None
    if target.name.split(".", 1)[0] in _STATE_ONLY:
        return "reads a model file when called with arguments; pickle only restores its state"
    return _plain_problem(args)


def is_plain(value: object) -> bool:
    """Plain data: constants, containers of plain data, and objects built by harmless calls."""
    return _plain_problem(value) is None


def _plain_problem(value: object, depth: int = 0) -> str | None:
    if depth > 8:
        return "is called with data nested too deeply to check"
    if value is None or isinstance(value, bool | int | float | complex | str | bytes | ByteArray):
        return None
    if isinstance(value, Call):
        return None if value.harmless else f"is called with {_kind(value)}"
    if isinstance(value, Global):
        return None if _is_class_name(value.name) else f"is passed the function {value.qualname}"
    if isinstance(value, tuple | list):
        items: list[object] = list(value)
    elif isinstance(value, SymSet):
        items = value.items
    elif isinstance(value, SymDict):
        items = [item for pair in value.pairs for item in pair]
    else:
        return f"is called with {_kind(value)}"
    for item in items:
        problem = _plain_problem(item, depth + 1)
        if problem is not None:
            return problem
    return None


def _kind(value: object) -> str:
    from modelkeep.scanning._pickle_values import describe

    return describe(value, 60)
