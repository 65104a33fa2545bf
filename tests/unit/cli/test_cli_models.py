"""models create/set/ls, versions ls, label set and label rm against the fake management API."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import ADMIN_TOKEN, FakeServer, Invoke

UNSAFE_WARNING = (
    "warning: --unsafe-allow-unsigned: model iris will accept pushes that nobody signed; "
    "require signatures again with `modelkeep models set iris --require-signature`"
)


# -- models create, models set ----------------------------------------------------------------


def test_models_create_checks_absence_then_puts_signatures_required(
    invoke: Invoke, server: FakeServer
) -> None:
    result = invoke("models", "create", "iris", "--description", "flowers", "--json")

    assert result.exit_code == 0, result.output
    get, put = server.requests
    assert (get.method, get.path) == ("GET", "/api/v1/models/iris")
    assert (put.method, put.path) == ("PUT", "/api/v1/models/iris")
    assert put.json() == {"description": "flowers", "require_signature": True}
    assert f"Bearer {ADMIN_TOKEN}" == put.headers["authorization"]
    assert server.models["iris"] == json.loads(result.stdout)
    assert result.stderr == ""


def test_models_create_human_output_points_at_publishers_add(
    invoke: Invoke, server: FakeServer
) -> None:
    result = invoke("models", "create", "iris")

    assert result.exit_code == 0, result.output
    expected = [
        "created model iris",
        "  signatures:  required",
        "  publishers:  0",
        "next: trust a publisher key with `modelkeep publishers add iris PUBKEY_FILE`",
    ]
    assert expected == result.stdout.splitlines()


def test_models_create_unsafe_allow_unsigned_sends_false_and_warns(
    invoke: Invoke, server: FakeServer
) -> None:
    result = invoke("models", "create", "iris", "--unsafe-allow-unsigned", "--json")

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json() == {"description": None, "require_signature": False}
    assert f"{UNSAFE_WARNING}\n" == result.stderr
    assert json.loads(result.stdout)["require_signature"] is False


def test_models_create_of_an_existing_model_exits_6_and_changes_nothing(
    invoke: Invoke, server: FakeServer
) -> None:
    server.create_model("iris", require_signature=False)

    result = invoke("models", "create", "iris")

    assert result.exit_code == 6
    assert [request.method for request in server.requests] == ["GET"]
    assert result.stderr.startswith("error: model iris already exists;")
    assert server.models["iris"]["require_signature"] is False


def test_models_set_require_signature_sends_only_that_setting(
    invoke: Invoke, server: FakeServer
) -> None:
    server.create_model("iris", require_signature=False)

    result = invoke("models", "set", "iris", "--require-signature")

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json() == {"description": None, "require_signature": True}
    assert (result.stdout.splitlines()) == [
        "updated model iris",
        "  signatures:  required",
        "  publishers:  0",
    ]
    assert result.stderr == ""


def test_models_set_description_leaves_the_signature_setting_alone(
    invoke: Invoke, server: FakeServer
) -> None:
    server.create_model("iris")

    result = invoke("models", "set", "iris", "--description", "v2 flowers", "--json")

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json() == {"description": "v2 flowers", "require_signature": None}
    assert json.loads(result.stdout)["description"] == "v2 flowers"


def test_models_set_unsafe_allow_unsigned_warns_every_time(
    invoke: Invoke, server: FakeServer
) -> None:
    server.create_model("iris")

    results = [invoke("models", "set", "iris", "--unsafe-allow-unsigned") for _ in range(2)]

    assert [(0, f"{UNSAFE_WARNING}\n")] * 2 == [(r.exit_code, r.stderr) for r in results]
    assert server.requests[-1].json() == {"description": None, "require_signature": False}
    assert "  signatures:  UNSAFE: optional (unsigned pushes are accepted)" in results[0].stdout


@pytest.mark.parametrize(
    "flags",
    [["--require-signature", "--unsafe-allow-unsigned"], []],
    ids=["both", "nothing-to-change"],
)
def test_models_set_with_contradictory_or_no_flags_is_a_usage_error(
    invoke: Invoke, server: FakeServer, flags: list[str]
) -> None:
    server.create_model("iris")

    result = invoke("models", "set", "iris", *flags)

    assert result.exit_code == 2
    assert server.requests == []


def test_models_set_of_a_missing_model_exits_5_without_creating_it(
    invoke: Invoke, server: FakeServer
) -> None:
    result = invoke("models", "set", "ghost", "--require-signature")

    assert result.exit_code == 5
    assert result.stderr == "error: no model ghost\n"
    assert [request.method for request in server.requests] == ["GET"]
    assert server.models == {}


# -- models ls, versions ls -------------------------------------------------------------------


def test_models_ls_json_is_the_list_of_models(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a", b"b")
    server.add_model("mnist", b"c")

    result = invoke("models", "ls", "--json")

    assert result.exit_code == 0, result.output
    assert list(server.models.values()) == json.loads(result.stdout)
    (request,) = server.requests
    assert (request.method, request.path) == ("GET", "/api/v1/models")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    assert request.body == b""


def test_models_ls_table_shows_each_model(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a", b"b")
    server.models["iris"]["labels"] = {"production": 1}
    server.add_model("mnist", b"c")

    server.models["mnist"]["require_signature"] = True
    server.models["mnist"]["publishers"] = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]

    result = invoke("models", "ls")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    expected_header = ["NAME", "LATEST", "LABELS", "SIGNATURES", "PUBLISHERS", "CREATED", "BY"]
    assert expected_header == header.split()[:7]
    assert (rows[0].split()[:7]) == [
        "iris",
        "2",
        "production=1",
        "UNSAFE:",
        "optional",
        "0",
        "abcdefgh2345",
    ]
    assert rows[1].split()[:5] == ["mnist", "1", "required", "2", "abcdefgh2345"]


def test_models_ls_with_no_models_says_so(invoke: Invoke) -> None:
    result = invoke("models", "ls")

    assert result.exit_code == 0
    assert result.stdout == "no models yet: create one with `modelkeep models create NAME`\n"


def test_versions_ls_json_is_the_list_of_versions(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a", b"bb")

    result = invoke("versions", "ls", "iris", "--json")

    assert result.exit_code == 0, result.output
    assert server.versions["iris"] == json.loads(result.stdout)
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/api/v1/models/iris/versions")
    ]


def test_versions_ls_table_shows_labels_next_to_versions(
    invoke: Invoke, server: FakeServer
) -> None:
    server.add_model("iris", b"a", b"bb")
    server.models["iris"]["labels"] = {"production": 1, "staging": 2, "canary": 2}

    result = invoke("versions", "ls", "iris")

    assert result.exit_code == 0, result.output
    header, row1, row2 = result.stdout.splitlines()
    assert header.split()[:5] == ["VERSION", "LABELS", "SIZE", "SHA256", "SIGNER"]
    assert row1.split()[:4] == ["1", "production", "1", "byte"]
    assert row2.split()[:5] == ["2", "canary,", "staging", "2", "bytes"]


def test_versions_ls_table_shows_a_short_signer_fingerprint_or_unsigned(
    invoke: Invoke, server: FakeServer
) -> None:
    server.add_model("iris", b"a", b"bb")
    server.versions["iris"][1]["signer"] = "sha256:4f0c1a2b3c4d" + "e" * 52

    result = invoke("versions", "ls", "iris")

    _, row1, row2 = result.stdout.splitlines()
    assert ["1", "1", "byte", hashlib.sha256(b"a").hexdigest()[:12], "unsigned"] == (
        row1.split()[:5]
    )
    assert row2.split()[4] == "4f0c1a2b3c4d"


def test_versions_ls_of_unknown_model_exits_5(invoke: Invoke) -> None:
    result = invoke("versions", "ls", "ghost")

    assert result.exit_code == 5
    assert result.stderr == "error: no model ghost\n"


# -- labels -----------------------------------------------------------------------------------


def test_label_set_sends_the_version_and_prints_the_answer(
    invoke: Invoke, server: FakeServer
) -> None:
    server.add_model("iris", b"a", b"b", b"c")

    result = invoke("label", "set", "iris", "production", "3", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model": "iris", "label": "production", "version": 3}
    (request,) = server.requests
    assert (request.method, request.path) == ("PUT", "/api/v1/models/iris/labels/production")
    assert request.json() == {"version": 3}
    assert request.headers["content-type"] == "application/json"
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]


def test_label_set_human_output(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a", b"b")

    result = invoke("label", "set", "iris", "staging", "2")

    assert result.stdout == "iris: label staging -> version 2\n"


def test_label_set_rejects_version_zero(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("label", "set", "iris", "staging", "0")

    assert result.exit_code == 2
    assert server.requests == []


def test_label_rm_sends_delete(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a")
    server.models["iris"]["labels"] = {"staging": 1}

    result = invoke("label", "rm", "iris", "staging", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model": "iris", "label": "staging"}
    (request,) = server.requests
    assert (request.method, request.path) == ("DELETE", "/api/v1/models/iris/labels/staging")
    assert request.body == b""
    assert server.models["iris"]["labels"] == {}


def test_label_rm_human_output(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a")
    server.models["iris"]["labels"] = {"staging": 1}

    result = invoke("label", "rm", "iris", "staging")

    assert result.stdout == "iris: label staging removed\n"


def test_label_rm_of_unknown_label_exits_5(invoke: Invoke, server: FakeServer) -> None:
    server.add_model("iris", b"a")

    result = invoke("label", "rm", "iris", "staging")

    assert result.exit_code == 5
    assert result.stderr == "error: no label staging on iris\n"
