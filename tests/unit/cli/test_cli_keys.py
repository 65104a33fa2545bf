"""keys create / ls / revoke, whoami, and parsing of --expires."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from conftest import ADMIN_ID, ADMIN_TOKEN, FakeServer, Invoke
from modelkeep.cli._params import parse_expires

NOW = datetime(2026, 11, 25, 18, 0, 0, tzinfo=UTC)


# -- keys create ------------------------------------------------------------------------------


def test_keys_create_sends_the_documented_body(invoke: Invoke, server: FakeServer) -> None:
    result = invoke(
        "keys",
        "create",
        "--role",
        "consumer",
        "--model",
        "iris",
        "--model",
        "mnist",
        "--expires",
        "2027-01-01T00:00:00Z",
        "--description",
        "ci pipeline",
        "--json",
    )

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/api/v1/keys")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    expected_body = {
        "role": "consumer",
        "models": ["iris", "mnist"],
        "expires_at": "2027-01-01T00:00:00Z",
        "description": "ci pipeline",
    }
    assert expected_body == request.json()


def test_keys_create_defaults_to_every_model_never_expiring(
    invoke: Invoke, server: FakeServer
) -> None:
    invoke("keys", "create", "--role", "auditor", "--json")

    expected_body = {"role": "auditor", "models": None, "expires_at": None, "description": ""}
    assert expected_body == server.requests[0].json()


def test_keys_create_json_has_id_and_key(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("keys", "create", "--role", "consumer", "--json")

    printed = json.loads(result.stdout)
    assert printed["id"] in server.keys
    assert server.tokens[printed["key"]] == printed["id"]
    assert result.stderr == ""


def test_keys_create_prints_the_key_once_with_a_warning(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("keys", "create", "--role", "consumer", "--model", "iris")

    assert result.exit_code == 0, result.output
    (secret,) = [token for token in server.tokens if token != ADMIN_TOKEN]
    assert result.stdout.count(secret) == 1
    assert f"    {secret}" in result.stdout.splitlines()
    assert "models:      iris" in result.stdout
    assert "shown only once" in result.stderr


def test_keys_create_with_a_duration_expires_that_long_from_now(
    invoke: Invoke, server: FakeServer
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    result = invoke("keys", "create", "--role", "consumer", "--expires", "30d", "--json")
    after = datetime.now(UTC)

    assert result.exit_code == 0, result.output
    sent = server.requests[0].json()["expires_at"]
    assert sent.endswith("Z")
    expires = datetime.fromisoformat(sent)
    assert before + timedelta(days=30) <= expires <= after + timedelta(days=30)


@pytest.mark.parametrize("bad", ["soon", "30s", "0d", "2001-01-01T00:00:00Z"])
def test_keys_create_with_bad_expires_is_a_usage_error(
    invoke: Invoke, server: FakeServer, bad: str
) -> None:
    result = invoke("keys", "create", "--role", "consumer", "--expires", bad)

    assert result.exit_code == 2
    assert "--expires" in result.stderr
    assert server.requests == []


def test_keys_create_with_invalid_model_name_is_a_usage_error(
    invoke: Invoke, server: FakeServer
) -> None:
    result = invoke("keys", "create", "--role", "consumer", "--model", "Iris!")

    assert result.exit_code == 2
    assert server.requests == []


def test_keys_create_requires_a_role(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("keys", "create")

    assert result.exit_code == 2
    assert "--role" in result.stderr


# -- parse_expires ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", NOW + timedelta(days=30)),
        ("12h", NOW + timedelta(hours=12)),
        ("90m", NOW + timedelta(minutes=90)),
        ("2027-01-01T00:00:00Z", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T01:00:00+01:00", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T00:00:00", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_expires_accepts_durations_and_iso_datetimes(text: str, expected: datetime) -> None:
    assert expected == parse_expires(text, now=NOW)


@pytest.mark.parametrize(
    "text", ["", "30", "30s", "-1d", "0h", "1.5d", "tomorrow", "2026-11-25T17:59:59Z"]
)
def test_parse_expires_refuses_garbage_and_the_past(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_expires(text, now=NOW)


def test_parse_expires_answers_in_utc() -> None:
    assert parse_expires("2027-06-01T12:00:00-07:00", now=NOW).tzinfo == UTC


# -- keys ls, keys revoke, whoami -------------------------------------------------------------


def test_keys_ls_json_is_the_list_of_keys(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("keys", "ls", "--json")

    assert result.exit_code == 0, result.output
    assert list(server.keys.values()) == json.loads(result.stdout)
    (request,) = server.requests
    assert (request.method, request.path) == ("GET", "/api/v1/keys")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]


def test_keys_ls_table_shows_scope_and_status(invoke: Invoke, server: FakeServer) -> None:
    invoke("keys", "create", "--role", "consumer", "--model", "iris", "--expires", "2030-01-01")
    invoke("keys", "revoke", "key000000001")

    result = invoke("keys", "ls")

    assert result.exit_code == 0, result.output
    header, admin_row, consumer_row = result.stdout.splitlines()
    assert header.split() == ["ID", "ROLE", "MODELS", "STATUS", "EXPIRES", "DESCRIPTION"]
    assert admin_row.split() == [ADMIN_ID, "admin", "all", "active", "never"]
    expected = ["key000000001", "consumer", "iris", "revoked", "2030-01-01", "00:00"]
    assert expected == consumer_row.split()


def test_keys_revoke_sends_delete_and_prints_the_key(invoke: Invoke, server: FakeServer) -> None:
    invoke("keys", "create", "--role", "consumer")
    server.requests.clear()

    result = invoke("keys", "revoke", "key000000001", "--json")

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert (request.method, request.path) == ("DELETE", "/api/v1/keys/key000000001")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    printed = json.loads(result.stdout)
    assert (printed["id"], printed["revoked_at"]) == ("key000000001", "2026-11-25T18:00:00Z")


def test_keys_revoke_human_output(invoke: Invoke, server: FakeServer) -> None:
    invoke("keys", "create", "--role", "consumer")

    result = invoke("keys", "revoke", "key000000001")

    assert result.stdout.splitlines()[0] == "revoked key key000000001"
    assert "  revoked:     2026-11-25T18:00:00Z" in result.stdout.splitlines()


def test_keys_revoke_of_unknown_key_exits_5(invoke: Invoke) -> None:
    result = invoke("keys", "revoke", "nosuchkey")

    assert result.exit_code == 5
    assert result.stderr == "error: no such key\n"


def test_whoami_json_is_the_callers_key(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("whoami", "--json")

    assert result.exit_code == 0, result.output
    assert server.keys[ADMIN_ID] == json.loads(result.stdout)
    (request,) = server.requests
    assert (request.method, request.path) == ("GET", "/api/v1/whoami")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]


def test_whoami_human_output(invoke: Invoke) -> None:
    result = invoke("whoami")

    expected = [
        f"id:          {ADMIN_ID}",
        "role:        admin",
        "models:      all",
        "expires:     never",
        "created:     2026-11-25T18:00:00Z",
    ]
    assert expected == result.stdout.splitlines()


def test_token_option_wins_over_the_environment(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("--token", ADMIN_TOKEN, "whoami", "--json", token="mk_other_key")

    assert result.exit_code == 0, result.output
    assert f"Bearer {ADMIN_TOKEN}" == server.requests[0].headers["authorization"]
