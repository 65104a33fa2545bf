"""push, models ls, versions ls, label set and label rm against the fake management API."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import ADMIN_TOKEN, FakeServer, Invoke

MiB = 1024 * 1024


def _model_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    content = bytes(i % 251 for i in range(size))
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    return path, content


# -- push -------------------------------------------------------------------------------------


def test_push_json_prints_model_and_version(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 1000)

    result = invoke("push", "iris", str(path), "--json")

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert {k: printed[k] for k in ("model", "version")} == {"model": "iris", "version": 1}
    assert hashlib.sha256(content).hexdigest() == printed["sha256"]
    assert result.stderr == ""


def test_push_sends_the_file_raw_with_auth_and_content_type(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 1000)

    invoke("push", "iris", str(path), "--description", "first try & more", "--json")

    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/api/v1/models/iris/versions")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    assert request.headers["content-type"] == "application/octet-stream"
    assert str(len(content)) == request.headers["content-length"]
    assert request.url.params["description"] == "first try & more"
    assert content == request.body


def test_push_without_description_sends_no_query(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    invoke("push", "iris", str(path), "--json")

    assert server.requests[0].url.query == b""


def test_push_streams_the_file_in_one_mib_chunks(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 2 * MiB + 12345)

    result = invoke("push", "iris", str(path), "--json")

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert [MiB, MiB, 12345] == [len(chunk) for chunk in request.chunks]
    assert content == request.body


def test_push_human_output_names_version_and_digest(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    server.add_model("iris", b"v1")
    path, content = _model_file(tmp_path, 2048)

    result = invoke("push", "iris", str(path))

    assert result.exit_code == 0, result.output
    first_line = result.stdout.splitlines()[0]
    expected = f"pushed iris version 2 (2.0 kB, sha256 {hashlib.sha256(content).hexdigest()})"
    assert expected == first_line
    assert "modelkeep label set iris production 2" in result.stdout


def test_push_of_a_missing_file_fails_before_any_request(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.onnx"

    result = invoke("push", "iris", str(missing))

    assert result.exit_code == 1
    assert f"error: no such file: {missing}\n" == result.stderr
    assert server.requests == []


def test_push_of_a_directory_is_refused(invoke: Invoke, server: FakeServer, tmp_path: Path) -> None:
    result = invoke("push", "iris", str(tmp_path))

    assert result.exit_code == 1
    assert f"error: {tmp_path} is a directory, not a model file\n" == result.stderr


def test_push_with_an_invalid_model_name_is_a_usage_error(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "../keys", str(path))

    assert result.exit_code == 2
    assert "not a valid name" in result.stderr
    assert server.requests == []


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

    result = invoke("models", "ls")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "LATEST", "LABELS", "CREATED", "BY"]
    assert rows[0].split()[:4] == ["iris", "2", "production=1", "abcdefgh2345"]
    assert rows[1].split()[:3] == ["mnist", "1", "abcdefgh2345"]


def test_models_ls_with_no_models_says_so(invoke: Invoke) -> None:
    result = invoke("models", "ls")

    assert result.exit_code == 0
    assert "no models yet" in result.stdout


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
    assert header.split()[:4] == ["VERSION", "LABELS", "SIZE", "SHA256"]
    assert row1.split()[:4] == ["1", "production", "1", "byte"]
    assert row2.split()[:5] == ["2", "canary,", "staging", "2", "bytes"]


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


def test_push_draws_a_progress_bar_on_a_terminal(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, MiB + 1)

    result = invoke("push", "iris", str(path), env={"TTY_COMPATIBLE": "1"})

    assert result.exit_code == 0, result.output
    assert "server is checking the model" in result.stderr
    assert result.stdout.startswith("pushed iris version 1")


@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "not-a-terminal"])
def test_push_draws_no_progress_bar_for_scripts(
    invoke: Invoke, server: FakeServer, tmp_path: Path, flags: list[str]
) -> None:
    path, _ = _model_file(tmp_path, MiB + 1)
    env = {"TTY_COMPATIBLE": "1"} if flags else {}

    result = invoke("push", "iris", str(path), *flags, env=env)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
