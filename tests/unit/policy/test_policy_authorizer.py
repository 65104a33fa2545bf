"""Authorizer mechanics: decision cache, admin policies, and failing closed."""

from __future__ import annotations

import logging
from typing import Any

import cedarpy
import pytest

from modelkeep.auth import Principal
from modelkeep.errors import ConfigError
from modelkeep.policy import Action, Authorizer, builtin_policies

CONSUMER = Principal(key_id="c1", role="consumer", models=frozenset({"iris"}))
ADMIN = Principal(key_id="a1", role="admin", models=None)


class CountingCedar:
    """Wraps cedarpy.is_authorized and counts the calls that reach the engine."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = cedarpy.is_authorized

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._real(*args, **kwargs)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingCedar:
    counter = CountingCedar()
    monkeypatch.setattr(cedarpy, "is_authorized", counter)
    return counter


# --- built-in policies ----------------------------------------------------------------------


def test_builtin_policies_hold_one_section_per_role() -> None:
    text = builtin_policies()
    for role in ("admin", "publisher", "approver", "consumer", "auditor"):
        assert f'principal.role == "{role}"' in text


# --- cache ----------------------------------------------------------------------------------


def test_repeated_decision_is_served_from_the_cache(counting: CountingCedar) -> None:
    authorizer = Authorizer()
    decisions = [authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris") for _ in range(5)]
    assert decisions == [True] * 5
    assert counting.calls == 1


def test_denials_are_cached_too(counting: CountingCedar) -> None:
    authorizer = Authorizer()
    decisions = [authorizer.is_allowed(CONSUMER, Action.MODEL_PUSH, "iris") for _ in range(3)]
    assert decisions == [False] * 3
    assert counting.calls == 1


def test_cache_distinguishes_action_model_and_principal(counting: CountingCedar) -> None:
    authorizer = Authorizer()
    authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris")
    authorizer.is_allowed(CONSUMER, Action.MODEL_READ, "iris")
    authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "mnist")
    authorizer.is_allowed(ADMIN, Action.MODEL_INFER, "iris")
    assert counting.calls == 4


def test_changed_role_or_scope_is_not_answered_from_the_cache(counting: CountingCedar) -> None:
    authorizer = Authorizer()
    assert False is authorizer.is_allowed(CONSUMER, Action.MODEL_PUSH, "iris")
    promoted = Principal(key_id="c1", role="publisher", models=frozenset({"iris"}))
    assert True is authorizer.is_allowed(promoted, Action.MODEL_PUSH, "iris")
    narrowed = Principal(key_id="c1", role="publisher", models=frozenset({"mnist"}))
    assert False is authorizer.is_allowed(narrowed, Action.MODEL_PUSH, "iris")
    assert counting.calls == 3


def test_clear_cache_forces_fresh_evaluation(counting: CountingCedar) -> None:
    authorizer = Authorizer()
    authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris")
    authorizer.clear_cache()
    authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris")
    assert counting.calls == 2


def test_full_cache_is_emptied_and_keeps_answering_correctly(counting: CountingCedar) -> None:
    authorizer = Authorizer(cache_size=2)
    authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris")  # miss, cached (1 entry)
    authorizer.is_allowed(CONSUMER, Action.MODEL_READ, "iris")  # miss, cached (2 entries)
    authorizer.is_allowed(CONSUMER, Action.SERVER_READ)  # miss, full: cleared, cached (1)
    assert True is authorizer.is_allowed(CONSUMER, Action.MODEL_INFER, "iris")  # miss again
    assert True is authorizer.is_allowed(CONSUMER, Action.SERVER_READ)  # still cached
    assert counting.calls == 4


def test_cache_size_below_one_is_refused() -> None:
    with pytest.raises(ConfigError):
        Authorizer(cache_size=0)


# --- admin-supplied policies ----------------------------------------------------------------


def test_extra_policy_can_add_a_permit() -> None:
    extra = """
    permit (
      principal,
      action == Modelkeep::Action::"model.push",
      resource == Modelkeep::Model::"sandbox"
    ) when { principal.role == "consumer" };
    """
    consumer = Principal(key_id="c1", role="consumer", models=None)
    before = Authorizer().is_allowed(consumer, Action.MODEL_PUSH, "sandbox")
    authorizer = Authorizer(extra)
    after = [
        authorizer.is_allowed(consumer, Action.MODEL_PUSH, "sandbox"),
        authorizer.is_allowed(consumer, Action.MODEL_PUSH, "iris"),
    ]
    assert (before, after) == (False, [True, False])


def test_extra_policy_can_forbid_what_a_role_permits() -> None:
    extra = """
    forbid (principal == Modelkeep::Key::"a1", action == Modelkeep::Action::"key.create", resource);
    """
    authorizer = Authorizer(extra)
    other_admin = Principal(key_id="a2", role="admin", models=None)
    assert [
        authorizer.is_allowed(ADMIN, Action.KEY_CREATE),
        authorizer.is_allowed(other_admin, Action.KEY_CREATE),
    ] == [False, True]


@pytest.mark.parametrize(
    "extra",
    [
        "permit(principal, action",
        "allow(principal, action, resource);",
        'permit(principal, action, resource) when { principal.role == "admin" ',
        "permit(principal, action, resource) unless;",
    ],
)
def test_unparsable_extra_policy_fails_at_construction(extra: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Authorizer(extra)
    assert caught.value.message.startswith("extra policies could not be parsed")


def test_blank_extra_policy_changes_nothing() -> None:
    assert True is Authorizer("  \n").is_allowed(CONSUMER, Action.MODEL_INFER, "iris")


# --- failing closed -------------------------------------------------------------------------


def test_evaluation_error_denies_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The forbid errs on any resource without an `owner` attribute. Cedar would skip it and let
    # the admin permit through; modelkeep denies instead.
    extra = """
    forbid (principal, action == Modelkeep::Action::"model.push", resource)
    when { resource.owner == "someone" };
    """
    authorizer = Authorizer(extra)
    with caplog.at_level(logging.WARNING, logger="modelkeep.policy.authorizer"):
        decisions = [
            authorizer.is_allowed(ADMIN, Action.MODEL_PUSH, "iris"),
            authorizer.is_allowed(ADMIN, Action.MODEL_READ, "iris"),
        ]
    assert decisions == [False, True]
    assert sum("evaluation error" in r.getMessage() for r in caplog.records) == 1


def test_engine_exception_denies_and_is_not_cached(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    authorizer = Authorizer()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(cedarpy, "is_authorized", broken)
    with caplog.at_level(logging.ERROR, logger="modelkeep.policy.authorizer"):
        denied = authorizer.is_allowed(ADMIN, Action.SERVER_READ)
    monkeypatch.undo()
    assert (denied, authorizer.is_allowed(ADMIN, Action.SERVER_READ)) == (False, True)
    assert any("policy engine failed" in r.getMessage() for r in caplog.records)
