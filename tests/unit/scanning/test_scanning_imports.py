"""The scanning package's modules import each other without a cycle, all at module level.

``_zip`` used to import ``_skops`` and ``_keras`` inside functions because both imported
``OpenZip`` back from it; the shared piece now lives in ``_zip_archive``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modelkeep.scanning

PACKAGE = Path(modelkeep.scanning.__file__).parent
PREFIX = "modelkeep.scanning."


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX):
            found.add(node.module.removeprefix(PREFIX))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        # Module-level imports only: a function-level one is how a cycle gets hidden.
        top = ast.Module(
            body=[n for n in tree.body if isinstance(n, ast.ImportFrom)], type_ignores=[]
        )
        graph[path.stem] = _imports(top)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle_between_scanning_modules() -> None:
    assert _cycle(_graph()) is None


def test_the_zip_family_imports_no_modelkeep_module_inside_functions() -> None:
    # Heavy third-party libraries (h5py, skops) are still imported when first needed.
    for name in ("_zip", "_zip_archive", "_skops", "_keras"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        nested = [
            node.lineno
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelkeep")
        ]
        assert nested == [], f"{name}.py imports inside a function at lines {nested}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
