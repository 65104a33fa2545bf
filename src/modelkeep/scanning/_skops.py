"""skops files: which types loading them would construct, never loaded with ``trusted=True``.

skops itself lists the types it does not trust by default (``get_untrusted_types``, which reads
the schema without building anything). The schema is also walked here, so that a name skops
would build as a function or type (``builtins.eval``, ``os.system``) is called out as the
attack it is. Types are then sorted three ways:

- a known code-execution target (the pickle denylist): ``malicious``;
- a small set of scikit-learn internals that skops leaves untrusted by default but that only
  carry fitted data (tree structures, neighbour trees, optimiser state): approved; the report
  lists them in ``trusted_types`` so the skops runtime trusts exactly those;
- anything else: ``unsafe-format``, with the list, for a person to review.
"""

from __future__ import annotations

from typing import Any

from modelkeep.scanning._archive import scan_members
from modelkeep.scanning._context import Scan, join
from modelkeep.scanning._pickle_policy import danger
from modelkeep.scanning._zip_archive import OpenZip, read_json

__all__ = ["APPROVED_SKLEARN_TYPES", "scan_skops"]

#: scikit-learn types skops does not trust by default, approved because they only hold the
#: arrays of a fitted model: building them calls no user-supplied code.
APPROVED_SKLEARN_TYPES = frozenset(
    {
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "sklearn.metrics._dist_metrics.ManhattanDistance64",
        "sklearn.metrics._dist_metrics.ChebyshevDistance64",
        "sklearn.metrics._dist_metrics.MinkowskiDistance64",
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    }
)


def scan_skops(scan: Scan, data: bytes, archive: OpenZip, depth: int) -> None:
    """Judge every type a skops file would construct; add approved types to the report."""
    location = archive.location
    # 1. The schema parses, and every module/class it names is checked against the denylist.
    schema = read_json(scan, archive, "schema.json")
    if not isinstance(schema, dict):
        if schema is not None:
            scan.high(join(location, "schema.json"), "the skops schema is not a JSON object")
        return
    named = _named_types(schema)
    dangerous = sorted(name for name in named if _danger(name) is not None)
    for name in dangerous:
        scan.critical(
            join(location, "schema.json"),
            f"names {name[:120]}, a known code-execution target ({_danger(name)}): do not "
            "load this file",
        )
    # 2. skops' own view of what it would not trust, from the same bytes.
    try:
        import skops.io as sio

        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # skops raises KeyError, TypeError, ValueError on bad schemas
        scan.high(location, f"skops cannot read this file's schema ({type(exc).__name__})")
        return
    # 3. Sort what skops does not trust into malicious, approved and to-review.
    review: list[str] = []
    approved: list[str] = []
    for name in untrusted:
        if name in APPROVED_SKLEARN_TYPES:
            approved.append(name)
        elif _danger(name) is not None:
            if name not in dangerous:
                scan.critical(
                    location,
                    f"constructs {name[:120]}, a known code-execution target ({_danger(name)})",
                )
        else:
            review.append(name)
    if review:
        shown = ", ".join(name[:120] for name in review[:20])
        more = f" and {len(review) - 20} more" if len(review) > 20 else ""
        scan.medium(
            location,
            f"loading this file would construct types skops does not trust by default: "
            f"{shown}{more}. Each can run its own code while being built; rebuild the model "
            "from scikit-learn estimators skops trusts, or review these types yourself",
        )
    if approved:
        scan.approve_types(approved)
        scan.info(
            location,
            "approved scikit-learn types (passed to skops as trusted): " + ", ".join(approved),
        )
    if not review and not dangerous:
        others = "every other type" if approved else "every type"
        scan.info(location, f"{others} in the file is one skops trusts by default")
    # 4. The arrays skops stores next to the schema are .npy files: scanned like any member.
    scan_members(scan, archive.members(), location, depth, skip=lambda m: m.name == "schema.json")


def _named_types(schema: dict[str, Any]) -> set[str]:
    # Every node carries __module__/__class__; function nodes name their target in content.
    names: set[str] = set()
    stack: list[Any] = [schema]
    seen = 0
    while stack and seen < 1_000_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            module, cls = node.get("__module__"), node.get("__class__")
            if isinstance(module, str) and isinstance(cls, str):
                names.add(f"{module}.{cls}")
            content = node.get("content")
            if isinstance(content, dict):
                module, function = content.get("module_path"), content.get("function")
                if isinstance(module, str) and isinstance(function, str):
                    names.add(f"{module}.{function}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


def _danger(qualified: str) -> str | None:
    module, _, name = qualified.rpartition(".")
    return danger(module, name) if module else None
