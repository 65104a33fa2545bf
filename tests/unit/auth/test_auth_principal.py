"""Principal: scope checks and immutability."""

from __future__ import annotations

import dataclasses

import pytest

from modelkeep.auth import Principal


def test_unscoped_principal_may_touch_any_model() -> None:
    principal = Principal(key_id="k", role="consumer", models=None)
    assert [principal.may_touch("iris"), principal.may_touch("anything")] == [True, True]


def test_scoped_principal_may_touch_only_its_models() -> None:
    principal = Principal(key_id="k", role="consumer", models=frozenset({"iris"}))
    assert [principal.may_touch("iris"), principal.may_touch("mnist")] == [True, False]


def test_principal_with_empty_scope_may_touch_nothing() -> None:
    principal = Principal(key_id="k", role="consumer", models=frozenset())
    assert False is principal.may_touch("iris")


def test_principal_is_immutable() -> None:
    principal = Principal(key_id="k", role="consumer", models=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        principal.role = "admin"  # type: ignore[misc]
