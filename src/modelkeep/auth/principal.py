"""Who is calling: the principal every authorization decision is made about.

A ``Principal`` is what authentication hands to authorization. It is built in memory from a
credential that has already been verified (API key today; JWT and mTLS map to the same shape), so
holding one means "this caller proved who they are", nothing more: what they may do is decided by
``modelkeep.policy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

#: Built-in roles, each backed by a Cedar policy file in ``modelkeep/policy/roles/``.
ROLES: tuple[str, ...] = ("admin", "publisher", "approver", "consumer", "auditor")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``models`` is the key's scope: ``None`` means every model, otherwise only the named models.
    Admin keys are always unscoped. ``expires_at`` is timezone-aware UTC when set.
    """

    key_id: str
    role: str
    models: frozenset[str] | None
    description: str = ""
    expires_at: datetime | None = None

    def may_touch(self, model: str) -> bool:
        """True when ``model`` is inside this principal's scope (says nothing about the action)."""
        return self.models is None or model in self.models
