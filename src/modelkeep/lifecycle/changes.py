"""The two-person rule: who may approve a change request, and where a rollback goes.

A protected label moves only when enough keys other than the requester's and the pusher's have
approved. "Other" is judged by key lineage too: a key counts as the same person as the key
that created it (and that one's creator, up to the keys ``modelkeep init`` made), so an admin
who mints a fresh approver key cannot approve their own request with it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping

__all__ = [
    "CHANGE_ID",
    "MAX_APPROVALS",
    "lineage",
    "new_change_id",
    "refusal_to_approve",
    "rollback_target",
]

CHANGE_ID = re.compile(r"[0-9a-f]{32}")
#: Approvals a protected label may require at most.
MAX_APPROVALS = 5
# Creator chains are short; this bounds a walk over a corrupted (cyclic) table.
_MAX_DEPTH = 64


def new_change_id() -> str:
    return secrets.token_hex(16)


def lineage(key_id: str, creators: Mapping[str, str]) -> set[str]:
    """``key_id`` and every key above it in the created-by chain."""
    found = {key_id}
    current = key_id
    for _ in range(_MAX_DEPTH):
        parent = creators.get(current)
        if parent is None or parent in found:
            break
        found.add(parent)
        current = parent
    return found


def refusal_to_approve(
    approver: str, requester: str, pusher: str | None, creators: Mapping[str, str]
) -> str | None:
    """Why ``approver`` may not approve a request by ``requester`` of a version ``pusher``
    pushed, or None when the approval counts."""
    if approver == requester:
        return "a change request cannot be approved by the key that made it"
    if pusher is not None and approver == pusher:
        return "a change request cannot be approved by the key that pushed the version"
    mine = lineage(approver, creators)
    for role, other in (("requester", requester), ("pusher", pusher)):
        if other is None:
            continue
        if other in mine or approver in lineage(other, creators):
            return (
                f"this key and the {role}'s key were created one from the other: "
                "an approval must come from someone else"
            )
    return None


def rollback_target(moves: Iterable[tuple[str, int | None, int | None]]) -> int | None:
    """Where a rollback of a label goes, from its history ``(kind, version, previous)``.

    History is a stack: each move pushes the version the label left, each rollback pops one,
    and a deletion clears it. Rolling back twice therefore goes two moves back, not back and
    forth. None when there is nothing earlier to return to.
    """
    stack: list[int] = []
    for kind, version, previous in moves:
        if version is None:
            stack.clear()
        elif kind in ("rollback", "emergency"):
            if stack:
                stack.pop()
        elif previous is not None and previous != version:
            stack.append(previous)
    return stack[-1] if stack else None
