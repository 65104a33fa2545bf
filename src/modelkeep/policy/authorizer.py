"""May this principal do this action on this resource? Cedar policies, default deny.

Entity model handed to Cedar (no schema; the shapes are fixed here)::

    principal  Modelkeep::Key::"<key id>"       role: String, all_models: Bool,
                                                models: Set<Modelkeep::Model>
    resource   Modelkeep::Model::"<name>"       for model actions
               Modelkeep::Server::"modelkeep"   for server actions
    action     Modelkeep::Action::"<Action value>"

The built-in roles are the ``roles/*.cedar`` files shipped in this package; an admin may add
Cedar text of their own (``extra_policies``). Anything no policy permits is denied, and so is
anything whose evaluation went wrong.
"""

from __future__ import annotations

import importlib.resources
import logging
from enum import StrEnum
from typing import Any, Final

import cedarpy

from modelkeep.auth.principal import ROLES, Principal
from modelkeep.errors import ConfigError, Forbidden, InternalError

log = logging.getLogger(__name__)

_KEY_TYPE: Final = "Modelkeep::Key"
_MODEL_TYPE: Final = "Modelkeep::Model"
_SERVER_TYPE: Final = "Modelkeep::Server"
_ACTION_TYPE: Final = "Modelkeep::Action"
_SERVER_ID: Final = "modelkeep"
_DEFAULT_CACHE_SIZE: Final = 100_000


class Action(StrEnum):
    """Everything a principal can ask to do. Values are the Cedar action ids."""

    SERVER_READ = "server.read"
    MODEL_READ = "model.read"
    MODEL_INFER = "model.infer"
    MODEL_PUSH = "model.push"
    LABEL_SET = "label.set"
    LABEL_DELETE = "label.delete"
    # Create a model, change its settings (signature requirement) and trusted publishers.
    MODEL_CONFIGURE = "model.configure"
    # Read a model's guard policy and the keys its detectors restricted.
    POLICY_READ = "policy.read"
    # Read and verify the audit log.
    AUDIT_READ = "audit.read"
    KEY_CREATE = "key.create"
    KEY_LIST = "key.list"
    KEY_REVOKE = "key.revoke"
    # See and rotate the key-encryption key (re-wrap every version's data key).
    KEK_ROTATE = "kek.rotate"
    # Crypto-shred a version, or a whole model with its captures (admin only).
    VERSION_DELETE = "version.delete"
    MODEL_DELETE = "model.delete"
    # Set a model's retention rules (admin only); reading them is model.read.
    RETENTION_SET = "retention.set"
    # Read a model's drift scores (auditors, publishers, admins); configure them (admin).
    DRIFT_READ = "drift.read"
    DRIFT_CONFIGURE = "drift.configure"
    # Lifecycle (docs/lifecycle.md): set a model's evaluation set and gates; protect a label;
    # approve or reject another key's change request; move a protected label at once in a
    # declared emergency (rollback only).
    EVAL_CONFIGURE = "eval.configure"
    LABEL_PROTECT = "label.protect"
    CHANGE_APPROVE = "change.approve"
    LABEL_EMERGENCY = "label.emergency"


#: Actions whose resource is a model; every other action's resource is the server.
MODEL_ACTIONS: Final[frozenset[Action]] = frozenset(
    {
        Action.MODEL_READ,
        Action.MODEL_INFER,
        Action.MODEL_PUSH,
        Action.LABEL_SET,
        Action.LABEL_DELETE,
        Action.MODEL_CONFIGURE,
        Action.POLICY_READ,
        Action.VERSION_DELETE,
        Action.MODEL_DELETE,
        Action.RETENTION_SET,
        Action.DRIFT_READ,
        Action.DRIFT_CONFIGURE,
        Action.EVAL_CONFIGURE,
        Action.LABEL_PROTECT,
        Action.CHANGE_APPROVE,
        Action.LABEL_EMERGENCY,
    }
)

_CacheKey = tuple[str, str, frozenset[str] | None, Action, str | None]


def builtin_policies() -> str:
    """The Cedar text of every built-in role, as shipped in ``modelkeep/policy/roles/``."""
    roles_dir = importlib.resources.files("modelkeep.policy").joinpath("roles")
    texts = []
    for role in ROLES:
        try:
            texts.append(roles_dir.joinpath(f"{role}.cedar").read_text(encoding="utf-8"))
        except OSError as exc:
            # A broken install must not start with a role silently missing.
            raise ConfigError(f"built-in policy for role {role!r} is missing") from exc
    return "\n".join(texts)


class Authorizer:
    """Decides requests against the built-in role policies plus optional admin policies.

    Decisions are a pure function of the principal's ``(key_id, role, models)``, the action, the
    model and this instance's (immutable) policies, so they are cached on exactly that key. A
    key whose role or scope changes therefore gets a new cache key rather than a stale answer;
    ``clear_cache`` is still called on key and policy changes to drop entries nobody will use.

    Thread safety: the cache is a plain dict whose single ``get`` and ``__setitem__`` calls are
    atomic under the GIL. Two threads may both miss and both evaluate the same request; they
    store the same answer, so the race costs time, never correctness. Wholesale clearing (when
    full, or on ``clear_cache``) can at worst make a concurrent reader re-evaluate.
    """

    def __init__(self, extra_policies: str = "", *, cache_size: int = _DEFAULT_CACHE_SIZE) -> None:
        """Parse the policies once; unparsable Cedar raises ``ConfigError`` (fail closed)."""
        if cache_size < 1:
            raise ConfigError("policy decision cache size must be at least 1")
        try:
            policies = cedarpy.PolicySet.from_str(builtin_policies())
        except ValueError as exc:
            raise ConfigError("built-in role policies could not be parsed") from exc
        if extra_policies.strip():
            try:
                policies = policies.with_added_str(extra_policies)
            except ValueError as exc:
                # Cedar's parse message points at the offending text; it holds no path or secret.
                raise ConfigError(f"extra policies could not be parsed: {exc}") from exc
        self._policies = policies
        self._cache_size = cache_size
        self._cache: dict[_CacheKey, bool] = {}

    def is_allowed(self, principal: Principal, action: Action, model: str | None = None) -> bool:
        """True only if some policy permits the request, none forbids it and nothing erred.

        ``model`` names the resource of a model action and must be ``None`` for a server action;
        a mismatch is a caller bug and raises ``InternalError``.
        """
        if (action in MODEL_ACTIONS) != (model is not None):
            raise InternalError(
                f"action {action} needs {'a model' if action in MODEL_ACTIONS else 'no model'}"
            )
        key: _CacheKey = (principal.key_id, principal.role, principal.models, action, model)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self._evaluate(principal, action, model)
        if decision is None:
            return False  # an engine failure is denied but not remembered
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def check(self, principal: Principal, action: Action, model: str | None = None) -> None:
        """Return if allowed, else raise ``Forbidden``.

        The message is the same whether or not the model exists, so a refusal reveals nothing
        about which models the server holds.
        """
        if not self.is_allowed(principal, action, model):
            where = "this model" if model is not None else "this server"
            raise Forbidden(f"not allowed to {action} on {where}")

    def clear_cache(self) -> None:
        """Forget every cached decision. Call on any key or policy change."""
        self._cache.clear()

    def _evaluate(self, principal: Principal, action: Action, model: str | None) -> bool | None:
        """One Cedar evaluation: the decision, or ``None`` if the engine itself failed."""
        # The dict form of entity uids lets ids hold any character (quotes, "::") with no
        # escaping, so a model or key name cannot be used to inject Cedar syntax.
        principal_uid = {"type": _KEY_TYPE, "id": principal.key_id}
        if model is None:
            resource_uid = {"type": _SERVER_TYPE, "id": _SERVER_ID}
        else:
            resource_uid = {"type": _MODEL_TYPE, "id": model}
        request: dict[str, Any] = {
            "principal": principal_uid,
            "action": {"type": _ACTION_TYPE, "id": str(action)},
            "resource": resource_uid,
            "context": {},
        }
        scope = sorted(principal.models) if principal.models is not None else []
        entities = [
            {
                "uid": principal_uid,
                "attrs": {
                    "role": principal.role,
                    "all_models": principal.models is None,
                    "models": [{"__entity": {"type": _MODEL_TYPE, "id": m}} for m in scope],
                },
                "parents": [],
            }
        ]
        try:
            result = cedarpy.is_authorized(request, self._policies, entities)
        except Exception:
            # Fail closed on anything the engine raises; the details go to the log only.
            log.exception(
                "policy engine failed for key %s action %s; denying", principal.key_id, action
            )
            return None
        errors = result.diagnostics.errors
        if errors:
            # Cedar skips a policy whose evaluation errs; a skipped forbid could turn into an
            # allow, so any evaluation error denies the whole request.
            log.warning(
                "policy evaluation error for key %s action %s; denying: %s",
                principal.key_id,
                action,
                "; ".join(str(e) for e in errors),
            )
            return False
        return bool(result.allowed)
