"""The key-encryption key: which KEK wraps how many versions and captured payloads, rotation and
re-wrapping (admin).

Rotation is two calls so that the command line can show progress and resume: ``kek_rotate``
makes a new KEK current in the key service (Transit ``rotate``), then ``kek_rewrap`` is called
pass after pass until no version or capture is left under an older KEK. Both are audited before the
answer; an interrupted rotation is finished by calling ``kek_rewrap`` again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelkeep.auth import Principal
from modelkeep.policy import Action
from modelkeep.registry.rotation import KeyRotation, RewrapPass
from modelkeep.service.core import Core


class KekAdmin:
    """Admin calls over the key service."""

    def __init__(
        self,
        core: Core,
        *,
        rewrap_evalsets: Callable[[], tuple[list[str], list[str]]] | None = None,
    ) -> None:
        # The last pass also re-wraps the evaluation sets' data keys (docs/lifecycle.md): the
        # models moved and those refused.
        self._rewrap_evalsets = rewrap_evalsets
        self.settings = core.settings
        self.store = core.store
        self.registry = core.registry
        self.authorizer = core.authorizer
        self.refresh = core.refresh
        self._audited = core.audited

    def kek_status(self, principal: Principal) -> dict[str, Any]:
        """The key service, its current key id, and how many versions and captured payloads
        each KEK wraps."""
        self.authorizer.check(principal, Action.KEK_ROTATE)
        keys = self.registry.keys
        current = keys.rotate(new_key=False)
        rotation = KeyRotation(self.store, keys)
        counts, captures = rotation.counts(), rotation.capture_counts()
        return {
            "key_service": self.settings.key_service.split("+", 1)[0].split(":", 1)[0],
            "key_id": current,
            "versions_by_key": counts,
            "versions_to_rewrap": sum(n for key_id, n in counts.items() if key_id != current),
            "captures_by_key": captures,
            "captures_to_rewrap": sum(n for key_id, n in captures.items() if key_id != current),
        }

    def kek_rotate(self, principal: Principal, *, new_key: bool = True) -> str:
        """Make a new KEK current in the key service (or only look it up); its key id. Audited."""
        details: dict[str, Any] = {"new_key": new_key}
        with self._audited(principal, "kek.rotate", "server", details):
            self.authorizer.check(principal, Action.KEK_ROTATE)
            details["key_id"] = self.registry.keys.rotate(new_key=new_key)
        return str(details["key_id"])

    def kek_rewrap(
        self,
        principal: Principal,
        *,
        limit: int = 100,
        after: int | None = 0,
        capture_after: str | None = "",
    ) -> RewrapPass:
        """One re-wrap pass (see ``KeyRotation.rewrap``); audited with the rows it moved."""
        details: dict[str, Any] = {"limit": limit, "after": after, "capture_after": capture_after}
        with self._audited(principal, "kek.rewrap", "server", details):
            self.authorizer.check(principal, Action.KEK_ROTATE)
            done = KeyRotation(self.store, self.registry.keys).rewrap(
                limit=limit, after=after, capture_after=capture_after
            )
            details.update(
                key_id=done.key_id,
                rewrapped=[f"{model}:{version}" for model, version in done.rewrapped],
                rewrapped_captures=done.rewrapped_captures,
                refused=[
                    f"{r.model}:{r.version}" + ("" if r.capture is None else f":{r.capture}")
                    for r in done.refused
                ],
                remaining=done.remaining,
                remaining_captures=done.remaining_captures,
            )
            if (
                self._rewrap_evalsets is not None
                and done.after is None
                and done.capture_after is None
            ):
                moved, refused = self._rewrap_evalsets()
                details.update(evalsets=moved, evalsets_refused=refused)
        self.refresh()
        return done
