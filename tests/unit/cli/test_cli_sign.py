"""``modelkeep keygen`` and ``modelkeep sign``: local, offline, one error line on failure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import FakeServer, Invoke
from modelkeep.cli._sign import default_signature_path
from modelkeep.crypto.signing import TrustedKey, load_public_key, verify_in_memory

FILES = {"model.onnx": b"onnx-bytes", "extra/labels.txt": b"cat\ndog\n"}


@pytest.fixture
def publisher(invoke: Invoke, tmp_path: Path) -> tuple[Path, TrustedKey]:
    (tmp_path / "keys").mkdir()
    result = invoke("keygen", "--out", str(tmp_path / "keys" / "pub"))
    assert result.exit_code == 0, result.output
    return tmp_path / "keys" / "pub.key", load_public_key(
        (tmp_path / "keys" / "pub.pub").read_bytes()
    )


def _model_dir(path: Path) -> Path:
    for name, content in FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return path


# -- keygen -----------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_and_prints_the_public_fingerprint(
    invoke: Invoke, tmp_path: Path
) -> None:
    (tmp_path / "keys").mkdir()

    result = invoke("keygen", "--out", str(tmp_path / "keys" / "alice"))

    public = load_public_key((tmp_path / "keys" / "alice.pub").read_text())
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"fingerprint: {public.fingerprint}"
    assert stat.S_IMODE((tmp_path / "keys" / "alice.key").stat().st_mode) == 0o600
    assert public.curve == "P-256"


def test_keygen_p384(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("keygen", "--out", str(tmp_path / "k"), "--curve", "P-384")

    assert result.exit_code == 0, result.output
    assert load_public_key((tmp_path / "k.pub").read_bytes()).curve == "P-384"


def test_keygen_refuses_to_overwrite_with_one_error_line(invoke: Invoke, tmp_path: Path) -> None:
    (tmp_path / "k.key").write_text("precious")

    result = invoke("keygen", "--out", str(tmp_path / "k"))

    assert result.exit_code == 6
    assert result.stderr == "error: a key file already exists there; refusing to overwrite it\n"
    assert (tmp_path / "k.key").read_text() == "precious"
    assert not (tmp_path / "k.pub").exists()


def test_keygen_unknown_curve_is_an_error(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("keygen", "--out", str(tmp_path / "k"), "--curve", "P-521")

    assert result.exit_code == 1
    assert result.stderr == "error: unknown curve 'P-521': use P-256 or P-384\n"


# -- sign -------------------------------------------------------------------------------------


def test_sign_file_writes_file_sig_beside_it_and_it_verifies(
    invoke: Invoke, tmp_path: Path, publisher: tuple[Path, TrustedKey], server: FakeServer
) -> None:
    key, trusted = publisher
    (tmp_path / "iris.onnx").write_bytes(b"iris")

    result = invoke("sign", str(tmp_path / "iris.onnx"), "--key", str(key))

    assert result.exit_code == 0, result.output
    bundle = (tmp_path / "iris.onnx.sig").read_bytes()
    assert verify_in_memory({"iris.onnx": b"iris"}, bundle, [trusted]).signer == trusted.fingerprint
    assert server.requests == []  # signing is local: no request to any server


def test_sign_directory_writes_dir_sig_beside_it(
    invoke: Invoke, tmp_path: Path, publisher: tuple[Path, TrustedKey]
) -> None:
    key, trusted = publisher
    model = _model_dir(tmp_path / "bert")

    result = invoke("sign", str(model) + "/", "--key", str(key))

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in model.rglob("*")) == ["extra", "labels.txt", "model.onnx"]
    verified = verify_in_memory(FILES, (tmp_path / "bert.sig").read_bytes(), [trusted])
    assert sorted(verified.files) == sorted(FILES)


def test_sign_out_option_chooses_the_signature_path(
    invoke: Invoke, tmp_path: Path, publisher: tuple[Path, TrustedKey]
) -> None:
    key, trusted = publisher
    model = _model_dir(tmp_path / "m")

    result = invoke("sign", str(model), "--key", str(key), "--out", str(tmp_path / "custom.sig"))

    assert result.exit_code == 0, result.output
    assert verify_in_memory(FILES, (tmp_path / "custom.sig").read_bytes(), [trusted])
    assert not (tmp_path / "m.sig").exists()


def test_sign_refuses_a_directory_with_a_symlink_in_one_line(
    invoke: Invoke, tmp_path: Path, publisher: tuple[Path, TrustedKey]
) -> None:
    key, _ = publisher
    model = _model_dir(tmp_path / "m")
    (model / "link.onnx").symlink_to(model / "model.onnx")

    result = invoke("sign", str(model), "--key", str(key))

    assert result.exit_code != 0
    assert result.stderr.startswith("error: the model directory contains a symlink;")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "m.sig").exists()


def test_sign_missing_model_is_one_error_line(
    invoke: Invoke, tmp_path: Path, publisher: tuple[Path, TrustedKey]
) -> None:
    key, _ = publisher

    result = invoke("sign", str(tmp_path / "nope.onnx"), "--key", str(key))

    assert result.exit_code == 1
    assert result.stderr == "error: the model path is neither a file nor a directory\n"


def test_sign_with_an_rsa_key_is_refused(invoke: Invoke, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.key").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "m.onnx").write_bytes(b"m")

    result = invoke("sign", str(tmp_path / "m.onnx"), "--key", str(tmp_path / "rsa.key"))

    assert result.exit_code == 1
    assert result.stderr.startswith("error: only EC P-256 and P-384 keys are supported, not RSA")
    assert not (tmp_path / "m.onnx.sig").exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [("/a/iris.onnx", "/a/iris.onnx.sig"), ("/a/bert/", "/a/bert.sig"), ("/a/b/..", "/a.sig")],
)
def test_default_signature_path_is_beside_the_model(model: str, expected: str) -> None:
    assert default_signature_path(Path(model)) == Path(expected)
