"""Imports flow one way (DESIGN §3, docs/architecture.md "Layers"):
``api/``, ``cli/`` → ``service/`` → domain packages → ``store/``, ``crypto/``, ``errors.py``,
``settings.py``.

Read from the source with ``ast`` (every import, also those inside functions and under
``TYPE_CHECKING``), so a lower layer reaching up fails here before it becomes an import cycle
or a protocol detail deciding something in the core.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelkeep

ROOT = Path(modelkeep.__file__).parent

# Each top-level module or package of modelkeep, by layer; higher numbers sit above lower ones.
# A module may import its own layer and those below it, never one above.
BOTTOM, DOMAIN, SERVICE, EDGE = 0, 1, 2, 3
LAYERS = {
    "__init__": BOTTOM,
    "errors": BOTTOM,
    "settings": BOTTOM,
    "crypto": BOTTOM,
    "_positioned": BOTTOM,  # the seeking shared by crypto's and scanning's readers
    "store": BOTTOM,
    "registry": DOMAIN,
    "scanning": DOMAIN,
    "runtime": DOMAIN,
    "auth": DOMAIN,
    "policy": DOMAIN,
    "guard": DOMAIN,
    "audit": DOMAIN,
    "lifecycle": DOMAIN,
    "bootstrap": DOMAIN,  # `modelkeep init`: a data directory over audit, auth, crypto, store
    "service": SERVICE,
    "api": EDGE,
    "cli": EDGE,
    "testing": EDGE,  # test helpers build a whole service
    "testing_keyservers": EDGE,
    "testing_seaweedfs": EDGE,
    "testing_files": EDGE,
}

# The one documented exception (docs/architecture.md): the store builds the immutable records
# the domain hands around, so it imports their modules, and only those. They are plain data,
# and the test below holds them to importing nothing above the store but each other.
RECORD_TYPES = frozenset(
    {
        "modelkeep.registry.records",
        "modelkeep.auth.apikeys",
        "modelkeep.auth.principal",
        "modelkeep.runtime.signature",
    }
)


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name
    line: int


def module_name(path: Path) -> str:
    parts = ["modelkeep", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterator[Import]:
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                yield Import(importer, resolved(module, alias.name), node.lineno)


def resolved(module: str, name: str) -> str:
    """``from module import name``: the submodule if ``name`` is one, else ``module``."""
    candidate = f"{module}.{name}"
    path = ROOT.joinpath(*candidate.split(".")[1:])
    return candidate if path.with_suffix(".py").is_file() or path.is_dir() else module


def all_imports() -> list[Import]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        found.extend(i for i in imports_of(path) if i.imported.startswith("modelkeep."))
    return found


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    return LAYERS[top(name)]


def is_record_type(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in RECORD_TYPES)


def test_every_top_level_module_has_a_layer() -> None:
    found = {
        path.stem if path.is_file() else path.name
        for path in ROOT.iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").exists())
    }
    assert set() == found - set(LAYERS), "add new top-level modules to LAYERS"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in all_imports()
        if layer(i.imported) > layer(i.importer)
        and not (top(i.importer) == "store" and is_record_type(i.imported))
    ]
    assert upward == []


def test_the_record_types_the_store_builds_import_nothing_above_the_store() -> None:
    # Importing a module also runs its packages' __init__, so those count too.
    modules = set(RECORD_TYPES) | {r.rpartition(".")[0] for r in RECORD_TYPES}
    reached = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in all_imports()
        if i.importer in modules and layer(i.imported) > BOTTOM and not is_record_type(i.imported)
    ]
    assert reached == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from modelkeep.api.codec import X\n", ["modelkeep.api.codec"]),
        ("import modelkeep.api\n", ["modelkeep.api"]),
        ("def f():\n    from ..api import codec\n", ["modelkeep.api.codec"]),
        ("from . import schema\n", ["modelkeep.store.schema"]),
        ("from modelkeep import __version__\n", ["modelkeep"]),
    ],
)
def test_the_scan_sees_absolute_relative_and_nested_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: list[str]
) -> None:
    module = tmp_path / "store" / "metadata.py"
    for path in (module, tmp_path / "store" / "schema.py", tmp_path / "api" / "codec.py"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(source if path == module else "")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert expected == [i.imported for i in imports_of(module)]
