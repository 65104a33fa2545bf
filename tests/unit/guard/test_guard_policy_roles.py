"""A guard policy names roles from the one list of built-in roles (modelkeep.auth.principal)."""

from __future__ import annotations

import pytest

from modelkeep.auth.principal import ROLES
from modelkeep.errors import InvalidInput
from modelkeep.guard.policy import ModelPolicy


def test_output_for_accepts_every_built_in_role() -> None:
    policy = ModelPolicy.from_json({"output_for": dict.fromkeys(ROLES, "label_only")})

    assert set(ROLES) == set(policy.output_for)


def test_output_for_refuses_a_role_that_is_not_built_in_and_names_the_built_in_ones() -> None:
    with pytest.raises(InvalidInput) as caught:
        ModelPolicy.from_json({"output_for": {"superuser": "full"}})

    assert all(role in caught.value.message for role in ROLES)
