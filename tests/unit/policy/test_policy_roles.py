"""Built-in roles: the full role x action x resource matrix, written out, plus key scoping."""

from __future__ import annotations

import pytest

from modelkeep.auth import ROLES, Principal
from modelkeep.errors import Forbidden, InternalError
from modelkeep.policy import MODEL_ACTIONS, Action, Authorizer

OWN = "own-model"
OTHER = "other-model"

# Expected decisions for a key scoped to OWN. Columns: (OWN model, OTHER model, server).
# Y = allow, n = deny, - = not a valid request (a model action needs a model, a server action
# must not name one) and raises InternalError.
EXPECTED: dict[str, dict[Action, tuple[str, str, str]]] = {
    "admin": {
        Action.SERVER_READ: ("-", "-", "Y"),
        Action.MODEL_READ: ("Y", "Y", "-"),
        Action.MODEL_INFER: ("Y", "Y", "-"),
        Action.MODEL_PUSH: ("Y", "Y", "-"),
        Action.LABEL_SET: ("Y", "Y", "-"),
        Action.LABEL_DELETE: ("Y", "Y", "-"),
        Action.MODEL_CONFIGURE: ("Y", "Y", "-"),
        Action.POLICY_READ: ("Y", "Y", "-"),
        Action.AUDIT_READ: ("-", "-", "Y"),
        Action.KEY_CREATE: ("-", "-", "Y"),
        Action.KEY_LIST: ("-", "-", "Y"),
        Action.KEY_REVOKE: ("-", "-", "Y"),
        Action.KEK_ROTATE: ("-", "-", "Y"),
        Action.VERSION_DELETE: ("Y", "Y", "-"),
        Action.MODEL_DELETE: ("Y", "Y", "-"),
        Action.RETENTION_SET: ("Y", "Y", "-"),
        Action.DRIFT_READ: ("Y", "Y", "-"),
        Action.DRIFT_CONFIGURE: ("Y", "Y", "-"),
        Action.EVAL_CONFIGURE: ("Y", "Y", "-"),
        Action.LABEL_PROTECT: ("Y", "Y", "-"),
        Action.CHANGE_APPROVE: ("Y", "Y", "-"),
        Action.LABEL_EMERGENCY: ("Y", "Y", "-"),
    },
    "publisher": {
        Action.SERVER_READ: ("-", "-", "Y"),
        Action.MODEL_READ: ("Y", "n", "-"),
        Action.MODEL_INFER: ("n", "n", "-"),
        Action.MODEL_PUSH: ("Y", "n", "-"),
        Action.LABEL_SET: ("Y", "n", "-"),
        Action.LABEL_DELETE: ("Y", "n", "-"),
        Action.MODEL_CONFIGURE: ("n", "n", "-"),
        Action.POLICY_READ: ("n", "n", "-"),
        Action.AUDIT_READ: ("-", "-", "n"),
        Action.KEY_CREATE: ("-", "-", "n"),
        Action.KEY_LIST: ("-", "-", "n"),
        Action.KEY_REVOKE: ("-", "-", "n"),
        Action.KEK_ROTATE: ("-", "-", "n"),
        Action.VERSION_DELETE: ("n", "n", "-"),
        Action.MODEL_DELETE: ("n", "n", "-"),
        Action.RETENTION_SET: ("n", "n", "-"),
        Action.DRIFT_READ: ("Y", "n", "-"),
        Action.DRIFT_CONFIGURE: ("n", "n", "-"),
        Action.EVAL_CONFIGURE: ("n", "n", "-"),
        Action.LABEL_PROTECT: ("n", "n", "-"),
        Action.CHANGE_APPROVE: ("n", "n", "-"),
        Action.LABEL_EMERGENCY: ("n", "n", "-"),
    },
    "approver": {
        Action.SERVER_READ: ("-", "-", "Y"),
        Action.MODEL_READ: ("Y", "n", "-"),
        Action.MODEL_INFER: ("n", "n", "-"),
        Action.MODEL_PUSH: ("n", "n", "-"),
        Action.LABEL_SET: ("n", "n", "-"),
        Action.LABEL_DELETE: ("n", "n", "-"),
        Action.MODEL_CONFIGURE: ("n", "n", "-"),
        Action.POLICY_READ: ("n", "n", "-"),
        Action.AUDIT_READ: ("-", "-", "n"),
        Action.KEY_CREATE: ("-", "-", "n"),
        Action.KEY_LIST: ("-", "-", "n"),
        Action.KEY_REVOKE: ("-", "-", "n"),
        Action.KEK_ROTATE: ("-", "-", "n"),
        Action.EVAL_CONFIGURE: ("n", "n", "-"),
        Action.LABEL_PROTECT: ("n", "n", "-"),
        Action.CHANGE_APPROVE: ("Y", "n", "-"),
        Action.LABEL_EMERGENCY: ("n", "n", "-"),
        Action.VERSION_DELETE: ("n", "n", "-"),
        Action.MODEL_DELETE: ("n", "n", "-"),
        Action.RETENTION_SET: ("n", "n", "-"),
        Action.DRIFT_READ: ("n", "n", "-"),
        Action.DRIFT_CONFIGURE: ("n", "n", "-"),
    },
    "consumer": {
        Action.SERVER_READ: ("-", "-", "Y"),
        Action.MODEL_READ: ("Y", "n", "-"),
        Action.MODEL_INFER: ("Y", "n", "-"),
        Action.MODEL_PUSH: ("n", "n", "-"),
        Action.LABEL_SET: ("n", "n", "-"),
        Action.LABEL_DELETE: ("n", "n", "-"),
        Action.MODEL_CONFIGURE: ("n", "n", "-"),
        Action.POLICY_READ: ("n", "n", "-"),
        Action.AUDIT_READ: ("-", "-", "n"),
        Action.KEY_CREATE: ("-", "-", "n"),
        Action.KEY_LIST: ("-", "-", "n"),
        Action.KEY_REVOKE: ("-", "-", "n"),
        Action.KEK_ROTATE: ("-", "-", "n"),
        Action.VERSION_DELETE: ("n", "n", "-"),
        Action.MODEL_DELETE: ("n", "n", "-"),
        Action.RETENTION_SET: ("n", "n", "-"),
        Action.DRIFT_READ: ("n", "n", "-"),
        Action.DRIFT_CONFIGURE: ("n", "n", "-"),
        Action.EVAL_CONFIGURE: ("n", "n", "-"),
        Action.LABEL_PROTECT: ("n", "n", "-"),
        Action.CHANGE_APPROVE: ("n", "n", "-"),
        Action.LABEL_EMERGENCY: ("n", "n", "-"),
    },
    "auditor": {
        Action.SERVER_READ: ("-", "-", "Y"),
        Action.MODEL_READ: ("Y", "n", "-"),
        Action.MODEL_INFER: ("n", "n", "-"),
        Action.MODEL_PUSH: ("n", "n", "-"),
        Action.LABEL_SET: ("n", "n", "-"),
        Action.LABEL_DELETE: ("n", "n", "-"),
        Action.MODEL_CONFIGURE: ("n", "n", "-"),
        Action.POLICY_READ: ("Y", "n", "-"),
        Action.AUDIT_READ: ("-", "-", "Y"),
        Action.KEY_CREATE: ("-", "-", "n"),
        Action.KEY_LIST: ("-", "-", "Y"),
        Action.KEY_REVOKE: ("-", "-", "n"),
        Action.KEK_ROTATE: ("-", "-", "n"),
        Action.VERSION_DELETE: ("n", "n", "-"),
        Action.MODEL_DELETE: ("n", "n", "-"),
        Action.RETENTION_SET: ("n", "n", "-"),
        Action.DRIFT_READ: ("Y", "n", "-"),
        Action.DRIFT_CONFIGURE: ("n", "n", "-"),
        Action.EVAL_CONFIGURE: ("n", "n", "-"),
        Action.LABEL_PROTECT: ("n", "n", "-"),
        Action.CHANGE_APPROVE: ("n", "n", "-"),
        Action.LABEL_EMERGENCY: ("n", "n", "-"),
    },
}

CASES = [
    pytest.param(role, action, column, target, id=f"{role}-{action}-{column}")
    for role in EXPECTED
    for action in Action
    for column, target in enumerate([OWN, OTHER, None])
]


@pytest.fixture(scope="module")
def authorizer() -> Authorizer:
    return Authorizer()


def test_matrix_covers_every_role_and_every_action() -> None:
    assert set(ROLES) == set(EXPECTED)
    assert all(set(Action) == set(row) for row in EXPECTED.values())


@pytest.mark.parametrize(("role", "action", "column", "target"), CASES)
def test_role_matrix(
    authorizer: Authorizer, role: str, action: Action, column: int, target: str | None
) -> None:
    principal = Principal(key_id=f"key-{role}", role=role, models=frozenset({OWN}))
    expected = EXPECTED[role][action][column]
    if expected == "-":
        with pytest.raises(InternalError):
            authorizer.is_allowed(principal, action, target)
    else:
        assert (expected == "Y") == authorizer.is_allowed(principal, action, target)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", sorted(MODEL_ACTIONS))
def test_unscoped_key_gets_on_any_model_what_a_scoped_key_gets_on_its_own(
    authorizer: Authorizer, role: str, action: Action
) -> None:
    unscoped = Principal(key_id=f"all-{role}", role=role, models=None)
    expected = EXPECTED[role][action][0] == "Y"
    assert [expected, expected] == [
        authorizer.is_allowed(unscoped, action, OTHER),
        authorizer.is_allowed(unscoped, action, "never-heard-of-it"),
    ]


@pytest.mark.parametrize("role", ["publisher", "approver", "consumer", "auditor"])
def test_key_with_empty_scope_may_read_no_model(authorizer: Authorizer, role: str) -> None:
    principal = Principal(key_id="empty", role=role, models=frozenset())
    assert [
        authorizer.is_allowed(principal, Action.MODEL_READ, OWN),
        authorizer.is_allowed(principal, Action.SERVER_READ),
    ] == [False, True]


def test_key_scoped_to_several_models_reaches_each_of_them(authorizer: Authorizer) -> None:
    principal = Principal(key_id="k", role="consumer", models=frozenset({"a", "b", "c"}))
    decisions = [authorizer.is_allowed(principal, Action.MODEL_INFER, m) for m in "abcd"]
    assert decisions == [True, True, True, False]


@pytest.mark.parametrize(
    "name", ['a"b', 'x" || true || "', 'Modelkeep::Model::"other"', "модель", "a b\n", ""]
)
def test_model_names_with_cedar_syntax_are_plain_ids(authorizer: Authorizer, name: str) -> None:
    principal = Principal(key_id='k"1', role="consumer", models=frozenset({name}))
    assert [
        authorizer.is_allowed(principal, Action.MODEL_INFER, name),
        authorizer.is_allowed(principal, Action.MODEL_INFER, "other"),
    ] == [True, False]


def test_unknown_role_is_denied_everything(authorizer: Authorizer) -> None:
    principal = Principal(key_id="k", role="superuser", models=None)
    decisions = [
        authorizer.is_allowed(principal, a, OWN if a in MODEL_ACTIONS else None) for a in Action
    ]
    assert [False] * len(Action) == decisions


def test_check_passes_silently_when_allowed(authorizer: Authorizer) -> None:
    principal = Principal(key_id="k", role="consumer", models=None)
    authorizer.check(principal, Action.MODEL_INFER, OWN)  # raises Forbidden if refused


def test_check_refusal_on_a_model_does_not_say_whether_it_exists(authorizer: Authorizer) -> None:
    principal = Principal(key_id="k", role="consumer", models=frozenset({OWN}))
    messages = []
    for model in (OTHER, "does-not-exist"):
        with pytest.raises(Forbidden) as caught:
            authorizer.check(principal, Action.MODEL_PUSH, model)
        messages.append(caught.value.message)
    assert messages == ["not allowed to model.push on this model"] * 2


def test_check_refusal_on_the_server_names_the_action(authorizer: Authorizer) -> None:
    principal = Principal(key_id="k", role="consumer", models=None)
    with pytest.raises(Forbidden) as caught:
        authorizer.check(principal, Action.KEY_CREATE)
    assert caught.value.message == "not allowed to key.create on this server"
