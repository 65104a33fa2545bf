"""push: a file or a directory (as a tar), its signature in a header, and how refusals read."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from conftest import ADMIN_TOKEN, FakeServer, Invoke, fake_signer
from modelkeep.cli import app
from modelkeep.cli._client import ClientOverrides
from modelkeep.crypto.signing import TrustedKey, generate_signing_key, verify_in_memory

MiB = 1024 * 1024
BUNDLE = b'{"mediaType": "not checked by the fake server"}\x00\xff'


@pytest.fixture
def unsafe_server(server: FakeServer) -> FakeServer:
    """The fake server with model ``iris`` accepting unsigned pushes."""
    server.create_model("iris", require_signature=False)
    return server


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[Path, TrustedKey]:
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys" / "publisher.key"
    return key, generate_signing_key(key, tmp_path / "keys" / "publisher.pub")


def _model_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    content = bytes(i % 251 for i in range(size))
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    return path, content


def _model_dir(path: Path) -> Path:
    """A model directory with a nested file, an empty directory and git files."""
    (path / "extra").mkdir(parents=True)
    (path / "empty").mkdir()
    (path / "model.onnx").write_bytes(b"onnx-bytes")
    (path / "extra" / "labels.txt").write_bytes(b"cat\ndog\n")
    (path / ".git").mkdir()
    (path / ".git" / "config").write_bytes(b"[core]\n")
    (path / ".gitignore").write_bytes(b"*.tmp\n")
    return path


def _tar_members(body: bytes) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        for member in tar:
            assert member.isfile(), member.name
            extracted = tar.extractfile(member)
            assert extracted is not None
            members[member.name] = extracted.read()
    return members


def _bundle_sent(server: FakeServer) -> bytes:
    (request,) = server.requests
    return base64.b64decode(request.headers["modelkeep-signature"], validate=True)


# -- a file -----------------------------------------------------------------------------------


def test_push_json_prints_the_version_with_model_and_version(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 1000)

    result = invoke("push", "iris", str(path), "--json")

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert {k: printed[k] for k in ("model", "version")} == {"model": "iris", "version": 1}
    assert hashlib.sha256(content).hexdigest() == printed["sha256"]
    assert result.stderr == ""


def test_unsigned_push_of_a_file_sends_raw_bytes_with_filename_and_layout(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 1000)

    invoke("push", "iris", str(path), "--json")

    (request,) = unsafe_server.requests
    assert (request.method, request.path) == ("POST", "/api/v1/models/iris/versions")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    assert request.headers["content-type"] == "application/octet-stream"
    assert str(len(content)) == request.headers["content-length"]
    assert dict(request.url.params) == {"filename": "model.onnx", "layout": "file"}
    assert "modelkeep-signature" not in request.headers
    assert content == request.body


def test_push_with_signature_sends_the_bundle_base64_in_a_header(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    server.create_model("iris")
    path, content = _model_file(tmp_path, 100)
    (tmp_path / "model.onnx.sig").write_bytes(BUNDLE)

    result = invoke("push", "iris", str(path), "--signature", str(tmp_path / "model.onnx.sig"))

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert base64.b64encode(BUNDLE).decode("ascii") == request.headers["modelkeep-signature"]
    assert dict(request.url.params) == {"filename": "model.onnx", "layout": "file"}
    assert content == request.body
    assert f"signed by {fake_signer(BUNDLE)}" == result.stdout.splitlines()[1]


def test_push_with_sign_key_sends_a_bundle_that_verifies_for_the_file(
    invoke: Invoke,
    server: FakeServer,
    tmp_path: Path,
    publisher: tuple[Path, TrustedKey],
) -> None:
    server.create_model("iris")
    key, trusted = publisher
    path, content = _model_file(tmp_path, 5000)

    result = invoke("push", "iris", str(path), "--sign-key", str(key), "--json")

    assert result.exit_code == 0, result.output
    verified = verify_in_memory({"model.onnx": content}, _bundle_sent(server), [trusted])
    assert trusted.fingerprint == verified.signer
    assert list(tmp_path.glob("*.sig")) == []  # the bundle was made in a temporary place


def test_push_streams_the_file_in_one_mib_chunks(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 2 * MiB + 12345)

    result = invoke("push", "iris", str(path), "--json")

    assert result.exit_code == 0, result.output
    (request,) = unsafe_server.requests
    assert [MiB, MiB, 12345] == [len(chunk) for chunk in request.chunks]
    assert content == request.body


def test_push_human_output_names_version_and_digest_and_warns_when_unsigned(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    unsafe_server.add_model("iris", b"v1")
    path, content = _model_file(tmp_path, 2048)

    result = invoke("push", "iris", str(path))

    assert result.exit_code == 0, result.output
    expected = [
        f"pushed iris version 2 (2.0 kB, sha256 {hashlib.sha256(content).hexdigest()})",
        "served under iris's guard policy; with none set, modelkeep's defaults: consumers see the"
        " top-1 class only, each key has a rate and a daily row budget, detectors alert"
        " (`modelkeep policy show iris`)",
        "point a label at it: modelkeep label set iris production 2",
    ]
    assert expected == result.stdout.splitlines()
    assert result.stderr == "warning: version 2 is unsigned: model iris accepts unsigned pushes\n"


def test_unsigned_push_refused_by_the_server_shows_its_message(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    server.create_model("iris")  # signatures required
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "iris", str(path))

    assert result.exit_code == 8
    assert result.stderr == "error: model 'iris' requires a signature\n"
    assert result.stdout == ""


def test_push_to_a_model_that_does_not_exist_exits_5(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "ghost", str(path))

    assert result.exit_code == 5
    assert result.stderr == "error: no model ghost\n"


# -- a directory ------------------------------------------------------------------------------


def test_push_of_a_directory_sends_a_tar_of_its_regular_files(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    server.create_model("bert")
    model = _model_dir(tmp_path / "bert-base")
    (tmp_path / "bert.sig").write_bytes(BUNDLE)

    result = invoke("push", "bert", str(model), "--signature", str(tmp_path / "bert.sig"))

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert dict(request.url.params) == {"filename": "bert-base", "layout": "directory"}
    assert base64.b64encode(BUNDLE).decode("ascii") == request.headers["modelkeep-signature"]
    assert str(len(request.body)) == request.headers["content-length"]
    # Git files are left out, as signing leaves them out; directories need no entry.
    expected = {"extra/labels.txt": b"cat\ndog\n", "model.onnx": b"onnx-bytes"}
    assert expected == _tar_members(request.body)


def test_pushed_tar_carries_no_local_owner_or_time(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    model = _model_dir(tmp_path / "m")

    invoke("push", "iris", str(model), "--json")

    with tarfile.open(fileobj=io.BytesIO(unsafe_server.requests[0].body), mode="r:") as tar:
        owners = {(m.uid, m.gid, m.uname, m.gname, m.mtime, m.mode) for m in tar.getmembers()}
    assert {(0, 0, "", "", 0, 0o644)} == owners


def test_pushed_tar_keeps_unusual_file_names_exactly(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    model = tmp_path / "m"
    (model / "sub dir").mkdir(parents=True)
    (model / "sub dir" / "tab\there é.bin").write_bytes(b"x")

    result = invoke("push", "iris", str(model), "--json")

    assert result.exit_code == 0, result.output
    assert _tar_members(unsafe_server.requests[0].body) == {"sub dir/tab\there é.bin": b"x"}


def test_push_of_a_directory_leaves_out_a_signature_kept_inside_it(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    server.create_model("bert")
    model = _model_dir(tmp_path / "bert")
    (model / "model.sig").write_bytes(BUNDLE)

    result = invoke("push", "bert", str(model), "--signature", str(model / "model.sig"))

    assert result.exit_code == 0, result.output
    assert sorted(_tar_members(server.requests[0].body)) == ["extra/labels.txt", "model.onnx"]


def test_push_with_sign_key_signs_the_directory_exactly_as_it_is_sent(
    invoke: Invoke,
    server: FakeServer,
    tmp_path: Path,
    publisher: tuple[Path, TrustedKey],
) -> None:
    server.create_model("bert")
    key, trusted = publisher
    model = _model_dir(tmp_path / "bert")

    result = invoke("push", "bert", str(model), "--sign-key", str(key))

    assert result.exit_code == 0, result.output
    members = _tar_members(server.requests[0].body)
    assert trusted.fingerprint == verify_in_memory(members, _bundle_sent(server), [trusted]).signer


@pytest.mark.parametrize("target", ["model.onnx", "extra"], ids=["to-a-file", "to-a-directory"])
def test_push_of_a_directory_holding_a_symlink_is_refused_before_any_request(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path, target: str
) -> None:
    model = _model_dir(tmp_path / "m")
    (model / "extra" / "link").symlink_to(model / target)

    result = invoke("push", "iris", str(model))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: extra/link in the model directory is a symlink;")
    assert unsafe_server.requests == []


def test_push_of_a_directory_holding_a_pipe_is_refused(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    model = _model_dir(tmp_path / "m")
    os.mkfifo(model / "fifo")

    result = invoke("push", "iris", str(model))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: fifo in the model directory is not a regular file")
    assert unsafe_server.requests == []


def test_push_of_an_empty_directory_is_refused(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)

    result = invoke("push", "iris", str(tmp_path / "m"))

    assert result.exit_code == 1
    assert f"error: the model directory {tmp_path / 'm'} has no files to push\n" == result.stderr
    assert unsafe_server.requests == []


# -- mistakes caught before sending -----------------------------------------------------------


def test_push_of_a_missing_path_fails_before_any_request(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.onnx"

    result = invoke("push", "iris", str(missing))

    assert result.exit_code == 1
    assert f"error: no such file or directory: {missing}\n" == result.stderr
    assert unsafe_server.requests == []


def test_push_of_a_missing_signature_fails_before_any_request(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "iris", str(path), "--signature", str(tmp_path / "nope.sig"))

    assert result.exit_code == 1
    assert f"error: no such signature file: {tmp_path / 'nope.sig'}\n" == result.stderr
    assert server.requests == []


def test_push_with_both_signature_and_sign_key_is_a_usage_error(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "iris", str(path), "--signature", "a.sig", "--sign-key", "a.key")

    assert result.exit_code == 2
    assert "give --signature or --sign-key, not both" in result.stderr
    assert server.requests == []


def test_push_with_an_invalid_model_name_is_a_usage_error(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "../keys", str(path))

    assert result.exit_code == 2
    assert "not a valid name" in result.stderr
    assert server.requests == []


def test_push_has_no_description_option(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "iris", str(path), "--description", "x")

    assert result.exit_code == 2
    assert unsafe_server.requests == []


# -- refusals with a scan report --------------------------------------------------------------

REFUSAL = httpx.Response(
    422,
    json={
        "error": "the scan refused this model (malicious)",
        "report": {
            "verdict": "malicious",
            "exit_code": 3,
            "format": "pickle",
            "findings": [
                {"severity": "critical", "location": "model.pkl", "message": "calls os.system"},
                {"severity": "low", "location": "", "message": "not a servable\x1b[2J format"},
            ],
            "files": ["model.pkl"],
            "trusted_types": [],
        },
    },
)


def test_refused_push_prints_the_findings_then_the_error_line(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)
    unsafe_server.fail_next = REFUSAL

    result = invoke("push", "iris", str(path))

    assert result.exit_code == 8
    expected = [
        "scan report: verdict malicious, format pickle",
        "  critical  model.pkl: calls os.system",
        "  low       -: not a servable\\x1b[2J format",
        "error: the scan refused this model (malicious)",
    ]
    assert expected == result.stderr.splitlines()
    assert result.stdout == ""


def test_refused_push_in_json_mode_prints_only_the_error_line(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)
    unsafe_server.fail_next = REFUSAL

    result = invoke("push", "iris", str(path), "--json")

    assert result.exit_code == 8
    assert result.stderr == "error: the scan refused this model (malicious)\n"
    assert result.stdout == ""


# -- progress ---------------------------------------------------------------------------------


def test_push_draws_a_progress_bar_on_a_terminal(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
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
    server.create_model("iris")
    path, _ = _model_file(tmp_path, MiB + 1)
    (tmp_path / "model.onnx.sig").write_bytes(BUNDLE)
    env = {"TTY_COMPATIBLE": "1"} if flags else {}

    result = invoke(
        "push", "iris", str(path), "--signature", str(tmp_path / "model.onnx.sig"), *flags, env=env
    )

    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# -- retries and idempotency ----------------------------------------------------------------------


class _DropsReplies(httpx.BaseTransport):
    """The fake server behind a link that loses the answer to the first ``drops`` pushes: the
    server has made the version, the client only sees the connection close."""

    def __init__(self, server: FakeServer, drops: int) -> None:
        self.server = server
        self.drops = drops

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.server.handle_request(request)
        if request.method == "POST" and self.drops > 0:
            self.drops -= 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return response


def _invoke_with(transport: httpx.BaseTransport, slept: list[float], *args: str) -> Result:
    obj = ClientOverrides(transport=transport, sleep=slept.append)
    env = {"COLUMNS": "200", "MODELKEEP_TOKEN": ADMIN_TOKEN}
    return CliRunner().invoke(app, list(args), env=env, obj=obj)


def test_each_push_sends_a_fresh_idempotency_key(
    invoke: Invoke, unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 100)

    assert invoke("push", "iris", str(path)).exit_code == 0
    assert invoke("push", "iris", str(path)).exit_code == 0

    keys = [r.headers["idempotency-key"] for r in unsafe_server.requests]
    assert len(keys) == 2
    assert keys[0] != keys[1]
    assert all(len(key) == 36 for key in keys)  # a UUID


def test_a_push_whose_answer_is_lost_is_sent_again_whole_with_the_same_key(
    unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, content = _model_file(tmp_path, 3 * MiB + 5)
    slept: list[float] = []

    result = _invoke_with(_DropsReplies(unsafe_server, 2), slept, "push", "iris", str(path))

    assert result.exit_code == 0, result.output
    pushes = unsafe_server.requests
    assert len(pushes) == 3
    assert len({r.headers["idempotency-key"] for r in pushes}) == 1
    assert [b"".join(r.chunks) for r in pushes] == [content] * 3
    assert slept == [1.0, 2.0]


def test_a_push_gives_up_after_its_retries_with_the_connection_error(
    unsafe_server: FakeServer, tmp_path: Path
) -> None:
    path, _ = _model_file(tmp_path, 10)
    slept: list[float] = []

    result = _invoke_with(_DropsReplies(unsafe_server, 99), slept, "push", "iris", str(path))

    assert result.exit_code != 0
    assert "Server disconnected" in result.stderr
    assert len(unsafe_server.requests) == 5
    assert slept == [1.0, 2.0, 4.0, 8.0]


def test_a_refusal_is_not_retried(invoke: Invoke, server: FakeServer, tmp_path: Path) -> None:
    server.create_model("iris")  # requires a signature: the unsigned push is refused
    path, _ = _model_file(tmp_path, 10)

    result = invoke("push", "iris", str(path))

    assert result.exit_code != 0
    assert len(server.requests) == 1
