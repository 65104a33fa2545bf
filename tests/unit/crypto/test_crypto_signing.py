"""Model signatures: what verify_in_memory accepts and refuses, and interop with model_signing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import model_signing.hashing
import model_signing.signing
import model_signing.verifying
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from modelkeep.crypto.signing import (
    MAX_BUNDLE_SIZE,
    SignatureError,
    TrustedKey,
    generate_signing_key,
    load_public_key,
    sign_path,
    verify_in_memory,
)
from modelkeep.errors import Conflict, InvalidInput, ModelRefused

MODEL_FILES = {
    "model.onnx": b"\x08\x07onnx-bytes" * 100,
    "config.json": b'{"labels": ["a", "b"]}',
    "tokenizer/vocab.txt": b"hello\nworld\n",
}


@dataclass(frozen=True)
class Publisher:
    private: Path
    public: Path
    trusted: TrustedKey


def _publisher(directory: Path, name: str, curve: str = "P-256") -> Publisher:
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    return Publisher(private, public, generate_signing_key(private, public, curve=curve))


def _write_model(directory: Path, files: Mapping[str, bytes]) -> Path:
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    return directory


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Publisher]:
    directory = tmp_path_factory.mktemp("keys")
    return {
        "alice": _publisher(directory, "alice"),
        "bob": _publisher(directory, "bob"),
        "carol384": _publisher(directory, "carol384", "P-384"),
    }


@pytest.fixture(scope="module")
def signed_model(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Publisher]
) -> tuple[Path, bytes]:
    """A model directory signed by alice with sign_path, and its bundle."""
    base = tmp_path_factory.mktemp("signed")
    model = _write_model(base / "model", MODEL_FILES)
    sign_path(model, keys["alice"].private, base / "model.sig")
    return model, (base / "model.sig").read_bytes()


def _refusal(files: Mapping[str, bytes], bundle: bytes, trusted: list[TrustedKey]) -> str:
    with pytest.raises(SignatureError) as caught:
        verify_in_memory(files, bundle, trusted)
    return caught.value.message


def _statement(bundle: bytes) -> dict[str, Any]:
    payload = json.loads(bundle)["dsseEnvelope"]["payload"]
    statement: dict[str, Any] = json.loads(base64.b64decode(payload))
    return statement


# -- what is accepted -------------------------------------------------------------------------


def test_good_signature_verifies_and_reports_signer_and_digests(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model

    verified = verify_in_memory(MODEL_FILES, bundle, [keys["bob"].trusted, keys["alice"].trusted])

    assert keys["alice"].trusted.fingerprint == verified.signer
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in MODEL_FILES.items()}
    assert expected == dict(verified.files)
    assert hashlib.sha256(bundle).hexdigest() == verified.bundle_digest


def test_p384_key_signs_and_verifies(tmp_path: Path, keys: dict[str, Publisher]) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    sign_path(model, keys["carol384"].private, tmp_path / "m.sig")

    verified = verify_in_memory(
        MODEL_FILES, (tmp_path / "m.sig").read_bytes(), [keys["carol384"].trusted]
    )

    assert ("P-384", keys["carol384"].trusted.fingerprint) == (
        keys["carol384"].trusted.curve,
        verified.signer,
    )


def test_single_file_is_recorded_as_dot_and_verifies_under_any_file_name(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = tmp_path / "iris.onnx"
    model.write_bytes(b"iris-model-bytes")
    sign_path(model, keys["alice"].private, tmp_path / "iris.onnx.sig")
    bundle = (tmp_path / "iris.onnx.sig").read_bytes()

    statement = _statement(bundle)
    verified = verify_in_memory(
        {"renamed.onnx": b"iris-model-bytes"}, bundle, [keys["alice"].trusted]
    )

    assert [r["name"] for r in statement["predicate"]["resources"]] == ["."]
    assert statement["subject"][0]["name"] == "iris.onnx"
    assert {"renamed.onnx": hashlib.sha256(b"iris-model-bytes").hexdigest()} == dict(verified.files)


# -- what is refused --------------------------------------------------------------------------


def test_wrong_key_is_refused(signed_model: tuple[Path, bytes], keys: dict[str, Publisher]) -> None:
    _, bundle = signed_model

    message = _refusal(MODEL_FILES, bundle, [keys["bob"].trusted, keys["carol384"].trusted])

    assert "not made by a publisher key trusted for this model" in message


def test_empty_trusted_list_fails_closed(signed_model: tuple[Path, bytes]) -> None:
    _, bundle = signed_model

    message = _refusal(MODEL_FILES, bundle, [])

    assert "no publisher key is trusted for this model" in message


def test_tampered_file_is_refused_and_named(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model
    tampered = {**MODEL_FILES, "config.json": b'{"labels": ["a", "evil"]}'}

    message = _refusal(tampered, bundle, [keys["alice"].trusted])

    assert message.startswith("'config.json' does not match its signed digest")


def test_extra_unsigned_file_is_refused(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model

    message = _refusal({**MODEL_FILES, "extra.py": b"import os"}, bundle, [keys["alice"].trusted])

    assert message.startswith("not covered by the signature: 'extra.py';")


def test_missing_file_is_refused(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model
    partial = {k: v for k, v in MODEL_FILES.items() if k != "tokenizer/vocab.txt"}

    message = _refusal(partial, bundle, [keys["alice"].trusted])

    assert message.startswith(
        "the signature covers files that were not given: 'tokenizer/vocab.txt'"
    )


def test_signature_made_for_another_models_bytes_is_refused(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(b"another model entirely")
    sign_path(other, keys["alice"].private, tmp_path / "other.sig")

    message = _refusal(
        {"model.onnx": MODEL_FILES["model.onnx"]},
        (tmp_path / "other.sig").read_bytes(),
        [keys["alice"].trusted],
    )

    assert message.startswith("'model.onnx' does not match its signed digest")


def test_single_file_signature_refuses_several_files(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    (tmp_path / "one.onnx").write_bytes(b"one")
    sign_path(tmp_path / "one.onnx", keys["alice"].private, tmp_path / "one.sig")

    message = _refusal(
        {"one.onnx": b"one", "two.onnx": b"two"},
        (tmp_path / "one.sig").read_bytes(),
        [keys["alice"].trusted],
    )

    assert "covers a single file but 2 files were given" in message


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a//b", "./a", "a/../b", "a\\b", ""])
def test_unnormalized_file_names_are_refused(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher], name: str
) -> None:
    _, bundle = signed_model

    message = _refusal({**MODEL_FILES, name: b"x"}, bundle, [keys["alice"].trusted])

    assert "is not a normalized relative path" in message


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"",
        lambda b: b"\x00\xffgarbage that is not json",
        lambda b: b"[]",
        lambda b: b.replace(b"v0.3+json", b"v0.1+json"),
        lambda b: b + b" " * MAX_BUNDLE_SIZE,
    ],
    ids=["truncated", "empty", "garbage", "json-array", "other-media-type", "over-1-MiB"],
)
def test_broken_bundles_are_refused_without_echoing_them(
    signed_model: tuple[Path, bytes],
    keys: dict[str, Publisher],
    mangle: Callable[[bytes], bytes],
) -> None:
    _, bundle = signed_model
    broken = mangle(bundle)

    message = _refusal(MODEL_FILES, broken, [keys["alice"].trusted])

    assert "garbage" not in message
    assert "sign the model again with `modelkeep sign`" in message


def test_altered_payload_fails_the_signature_check(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model
    document = json.loads(bundle)
    statement = _statement(bundle)
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    document["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()

    message = _refusal(MODEL_FILES, json.dumps(document).encode(), [keys["alice"].trusted])

    assert "not made by a publisher key trusted for this model" in message


def test_key_hint_naming_another_key_is_refused(
    signed_model: tuple[Path, bytes], keys: dict[str, Publisher]
) -> None:
    _, bundle = signed_model
    document = json.loads(bundle)
    document["verificationMaterial"]["publicKey"]["hint"] = "ab" * 32

    message = _refusal(MODEL_FILES, json.dumps(document).encode(), [keys["alice"].trusted])

    assert "key hint does not match its signer" in message


def test_sharded_manifest_is_refused_with_how_to_resign(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=keys["alice"].private
    ).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization(shard_size=64)
    ).sign(model, tmp_path / "m.sig")

    message = _refusal(MODEL_FILES, (tmp_path / "m.sig").read_bytes(), [keys["alice"].trusted])

    assert "one SHA-256 digest per file" in message


def test_signature_error_is_a_model_refusal_with_its_own_code() -> None:
    error = SignatureError("x")

    assert (isinstance(error, ModelRefused), error.code) == (True, "model_refused")


# -- sign_path --------------------------------------------------------------------------------


def test_sign_path_refuses_a_directory_holding_a_symlink(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    (model / "tokenizer" / "link.txt").symlink_to(model / "config.json")

    with pytest.raises(SignatureError, match="contains a symlink"):
        sign_path(model, keys["alice"].private, tmp_path / "m.sig")
    assert not (tmp_path / "m.sig").exists()


def test_sign_path_refuses_a_symlink_as_the_model(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    (tmp_path / "link").symlink_to(model)

    with pytest.raises(SignatureError, match="is a symlink"):
        sign_path(tmp_path / "link", keys["alice"].private, tmp_path / "m.sig")


def test_sign_path_leaves_a_signature_inside_the_model_out_of_it(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    sign_path(model, keys["alice"].private, model / "model.sig")

    verified = verify_in_memory(
        MODEL_FILES, (model / "model.sig").read_bytes(), [keys["alice"].trusted]
    )

    assert sorted(MODEL_FILES) == sorted(verified.files)
    assert sorted(os.listdir(model)) == ["config.json", "model.onnx", "model.sig", "tokenizer"]


def test_sign_path_refuses_a_non_ec_private_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "m.onnx").write_bytes(b"m")

    with pytest.raises(InvalidInput, match="only EC P-256 and P-384 keys are supported"):
        sign_path(tmp_path / "m.onnx", tmp_path / "rsa.key", tmp_path / "m.sig")


# -- keys -------------------------------------------------------------------------------------


def test_generated_private_key_is_0600_and_fingerprint_is_sha256_of_der(tmp_path: Path) -> None:
    trusted = generate_signing_key(tmp_path / "k.key", tmp_path / "k.pub")

    public = serialization.load_pem_public_key((tmp_path / "k.pub").read_bytes())
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert "sha256:" + hashlib.sha256(der).hexdigest() == trusted.fingerprint
    assert trusted == load_public_key((tmp_path / "k.pub").read_text())


def test_generate_signing_key_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("old public key")

    with pytest.raises(Conflict):
        generate_signing_key(tmp_path / "k.key", tmp_path / "k.pub")
    assert (
        (tmp_path / "k.pub").read_text(),
        (tmp_path / "k.key").exists(),
    ) == ("old public key", False)


def _public_pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("make_key", "kind"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "not RSA keys"),
        (ed25519.Ed25519PrivateKey.generate, "not Ed25519 keys"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1 is not supported"),
    ],
    ids=["rsa", "ed25519", "p521"],
)
def test_load_public_key_refuses_other_key_types(
    make_key: Callable[
        [], rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    ],
    kind: str,
) -> None:
    pem = _public_pem(make_key())

    with pytest.raises(InvalidInput, match=kind):
        load_public_key(pem)


def test_load_public_key_refuses_what_is_not_a_pem_key() -> None:
    with pytest.raises(InvalidInput, match="not a PEM public key"):
        load_public_key("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- interop with model_signing ---------------------------------------------------------------


def test_bundle_from_model_signing_api_verifies_in_memory(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["bob"].private).sign(
        model, tmp_path / "m.sig"
    )

    verified = verify_in_memory(
        MODEL_FILES, (tmp_path / "m.sig").read_bytes(), [keys["bob"].trusted]
    )

    assert keys["bob"].trusted.fingerprint == verified.signer


@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "file"])
def test_bundle_from_model_signing_cli_verifies_in_memory(
    tmp_path: Path, keys: dict[str, Publisher], single_file: bool
) -> None:
    cli = Path(sys.executable).parent / "model_signing"
    if not cli.exists():
        pytest.skip("the model_signing command is not installed in this environment")
    model = _write_model(tmp_path / "m", MODEL_FILES)
    files: Mapping[str, bytes] = MODEL_FILES
    if single_file:
        model, files = model / "model.onnx", {"model.onnx": MODEL_FILES["model.onnx"]}
    subprocess.run(
        [str(cli), "sign", "key", "--private_key", str(keys["carol384"].private),
         "--signature", str(tmp_path / "cli.sig"), str(model)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    verified = verify_in_memory(
        files, (tmp_path / "cli.sig").read_bytes(), [keys["carol384"].trusted]
    )

    assert sorted(files) == sorted(verified.files)


@pytest.mark.parametrize("single_file", [False, True], ids=["directory", "file"])
def test_sign_path_bundle_verifies_with_model_signing(
    tmp_path: Path, keys: dict[str, Publisher], single_file: bool
) -> None:
    model = _write_model(tmp_path / "m", MODEL_FILES)
    if single_file:
        model = model / "model.onnx"
    sign_path(model, keys["alice"].private, tmp_path / "m.sig")

    model_signing.verifying.Config().use_elliptic_key_verifier(
        public_key=keys["alice"].public
    ).verify(model, tmp_path / "m.sig")  # raises ValueError on any mismatch


def test_model_signing_refuses_what_sign_path_signed_once_tampered(
    tmp_path: Path, keys: dict[str, Publisher]
) -> None:
    """The interop check above can fail: model_signing does notice a changed file."""
    model = _write_model(tmp_path / "m", MODEL_FILES)
    sign_path(model, keys["alice"].private, tmp_path / "m.sig")
    (model / "config.json").write_bytes(b"changed")

    with pytest.raises(ValueError, match="Signature mismatch"):
        model_signing.verifying.Config().use_elliptic_key_verifier(
            public_key=keys["alice"].public
        ).verify(model, tmp_path / "m.sig")
