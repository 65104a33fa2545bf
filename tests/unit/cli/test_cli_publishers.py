"""publishers add, ls and rm: the keys whose signatures a model accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ADMIN_TOKEN, FakeServer, Invoke
from modelkeep.crypto.signing import TrustedKey, generate_signing_key


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path, TrustedKey]:
    private, public = tmp_path / "publisher.key", tmp_path / "publisher.pub"
    return private, public, generate_signing_key(private, public)


def test_publishers_add_sends_the_public_key_and_prints_the_answer(
    invoke: Invoke, server: FakeServer, keypair: tuple[Path, Path, TrustedKey]
) -> None:
    server.create_model("iris")
    _, public, trusted = keypair

    result = invoke("publishers", "add", "iris", str(public), "--json")

    assert result.exit_code == 0, result.output
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/api/v1/models/iris/publishers")
    assert f"Bearer {ADMIN_TOKEN}" == request.headers["authorization"]
    assert {"public_key": trusted.pem} == request.json()
    expected = {"model": "iris", "fingerprint": trusted.fingerprint, "public_key": trusted.pem}
    assert expected == json.loads(result.stdout)


def test_publishers_add_sends_only_the_public_key_block(
    invoke: Invoke, server: FakeServer, keypair: tuple[Path, Path, TrustedKey], tmp_path: Path
) -> None:
    server.create_model("iris")
    _, public, trusted = keypair
    noisy = tmp_path / "noisy.pub"
    noisy.write_text(f"comment: alice's laptop\n{public.read_text()}trailing words\n")

    result = invoke("publishers", "add", "iris", str(noisy))

    assert result.exit_code == 0, result.output
    assert {"public_key": trusted.pem} == server.requests[0].json()
    assert f"iris: trusts publisher {trusted.fingerprint}\n" == result.stdout


def test_publishers_add_refuses_a_private_key_before_any_request(
    invoke: Invoke, server: FakeServer, keypair: tuple[Path, Path, TrustedKey]
) -> None:
    server.create_model("iris")
    private, _, _ = keypair

    result = invoke("publishers", "add", "iris", str(private))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {private} holds a private key;")
    assert server.requests == []


def test_publishers_add_refuses_a_file_that_is_no_public_key(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    result = invoke("publishers", "add", "iris", str(tmp_path / "notes.txt"))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: not a PEM public key")
    assert server.requests == []


def test_publishers_ls_json_and_table(
    invoke: Invoke, server: FakeServer, keypair: tuple[Path, Path, TrustedKey]
) -> None:
    server.create_model("iris")
    _, public, trusted = keypair
    invoke("publishers", "add", "iris", str(public))

    as_json = invoke("publishers", "ls", "iris", "--json")
    as_table = invoke("publishers", "ls", "iris")

    expected = [{"model": "iris", "fingerprint": trusted.fingerprint, "public_key": trusted.pem}]
    assert expected == json.loads(as_json.stdout)
    assert ["FINGERPRINT", trusted.fingerprint] == as_table.stdout.split()
    assert (
        server.requests[-1].method,
        server.requests[-1].path,
    ) == ("GET", "/api/v1/models/iris/publishers")


def test_publishers_ls_with_none_says_how_to_add_one(invoke: Invoke, server: FakeServer) -> None:
    server.create_model("iris")

    result = invoke("publishers", "ls", "iris")

    assert result.exit_code == 0, result.output
    expected = (
        "iris trusts no publisher yet: add one with `modelkeep publishers add iris PUBKEY_FILE`"
    )
    assert f"{expected}\n" == result.stdout


def test_publishers_rm_sends_delete_with_the_fingerprint_in_the_path(
    invoke: Invoke, server: FakeServer, keypair: tuple[Path, Path, TrustedKey]
) -> None:
    server.create_model("iris")
    _, public, trusted = keypair
    invoke("publishers", "add", "iris", str(public))

    result = invoke("publishers", "rm", "iris", trusted.fingerprint, "--json")

    assert result.exit_code == 0, result.output
    request = server.requests[-1]
    hex_digest = trusted.fingerprint.removeprefix("sha256:")
    expected_path = f"/api/v1/models/iris/publishers/sha256%3A{hex_digest}".encode()
    assert ("DELETE", expected_path) == (request.method, request.url.raw_path)
    assert {"model": "iris", "fingerprint": trusted.fingerprint} == json.loads(result.stdout)
    assert server.models["iris"]["publishers"] == []


def test_publishers_rm_of_an_unknown_key_exits_5(invoke: Invoke, server: FakeServer) -> None:
    server.create_model("iris")

    result = invoke("publishers", "rm", "iris", "sha256:" + "0" * 64)

    assert result.exit_code == 5
    assert result.stderr.startswith("error: no publisher sha256:000")


@pytest.mark.parametrize("fingerprint", ["sha256:4f0c1a2b3c4d", "4f0c" * 16, "md5:" + "a" * 64])
def test_publishers_rm_wants_the_full_fingerprint(
    invoke: Invoke, server: FakeServer, fingerprint: str
) -> None:
    result = invoke("publishers", "rm", "iris", fingerprint)

    assert result.exit_code == 2
    assert "give the full fingerprint" in result.stderr
    assert server.requests == []
