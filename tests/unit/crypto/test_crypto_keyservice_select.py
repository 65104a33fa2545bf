"""Choosing the key service from settings, and the adapters' error translation without a server.

The adapters' behaviour against real servers is in tests/integration/test_key_services.py; here
are the settings forms, the unsafe ones refused at start, and AWS KMS error codes (botocore's
Stubber) that moto's server does not produce, such as a disabled key.
"""

from __future__ import annotations

import base64
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.stub import Stubber

from modelkeep.crypto import (
    InMemoryKeyService,
    LocalKeyService,
    associated_data_for,
    new_data_key,
)
from modelkeep.crypto._awskms import KmsKeyService
from modelkeep.crypto._openbao import TransitKeyService
from modelkeep.crypto.keyservice import open_key_service
from modelkeep.crypto.sealed import model_and_version_of
from modelkeep.errors import ConfigError, IntegrityError, InvalidInput, KeyServiceError
from modelkeep.settings import Settings

CONTEXT = associated_data_for("fraud", 7, "cd" * 32)
OTHER = associated_data_for("fraud", 8, "cd" * 32)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s.token\n")
    return path


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_local_is_the_default_and_loads_the_key_file(tmp_path: Path) -> None:
    created = LocalKeyService.create(tmp_path / "kek.key")
    keys = open_key_service(_settings(tmp_path), tmp_path / "kek.key")
    assert (LocalKeyService, created.key_id) == (type(keys), keys.key_id)


def test_rotating_the_key_file_keeps_the_old_kek_until_every_version_is_rewrapped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kek.key"
    keys = LocalKeyService.create(path)
    other_worker = LocalKeyService.load(path)
    data_key = new_data_key()
    old_id, old = keys.key_id, keys.wrap(data_key, CONTEXT)
    assert old[:9] == b"\x02" + bytes.fromhex(old_id)

    new_id = keys.rotate(new_key=True)
    retired = tmp_path / "kek.retired" / f"{old_id}.key"
    assert (new_id != old_id, stat.S_IMODE(retired.stat().st_mode)) == (True, 0o600)
    assert data_key == keys.unwrap(old, CONTEXT)
    new = keys.rewrap(old, CONTEXT)
    assert new[1:9].hex() == new_id
    # Another worker process notices the new key file: it wraps under it and unwraps it.
    assert data_key == other_worker.unwrap(new, CONTEXT)
    assert other_worker.wrap(data_key, CONTEXT)[1:9].hex() == new_id
    # Retired file deleted too early: what it still wraps is refused clearly, for good.
    retired.unlink()
    with pytest.raises(KeyServiceError, match=f"key file {old_id} .* is no longer kept") as gone:
        LocalKeyService.load(path).unwrap(old, CONTEXT)
    assert gone.value.retry_after is None


def test_wraps_made_before_key_ids_were_recorded_still_open(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    LocalKeyService.create(path)
    legacy = InMemoryKeyService(path.read_bytes())
    data_key = new_data_key()
    wrapped = legacy.wrap(data_key, CONTEXT)
    keys = LocalKeyService.load(path)
    keys.rotate(new_key=True)
    assert data_key == keys.unwrap(wrapped, CONTEXT)
    with pytest.raises(IntegrityError):
        keys.unwrap(wrapped, OTHER)


def test_a_rotation_interrupted_after_keeping_the_old_kek_can_be_run_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kek.key"
    keys = LocalKeyService.create(path)
    wrapped = keys.wrap(data_key := new_data_key(), CONTEXT)
    retired = tmp_path / "kek.retired"
    retired.mkdir()
    (retired / f"{keys.key_id}.key").write_bytes(path.read_bytes())  # step 1 done, then a crash
    (retired / f"{keys.key_id}.key").chmod(0o600)
    (tmp_path / "kek.key.new").write_bytes(b"half")
    keys.rotate(new_key=True)
    assert data_key == LocalKeyService.load(path).unwrap(wrapped, CONTEXT)


def test_a_kek_held_only_in_memory_cannot_be_rotated() -> None:
    with pytest.raises(InvalidInput, match="cannot be rotated"):
        InMemoryKeyService().rotate(new_key=True)


@pytest.mark.parametrize(
    "kind",
    [
        "openbao+https://bao.example:8200/transit/keys/modelkeep",
        "openbao",
    ],
)
def test_openbao_url_and_bare_forms_name_the_same_key(
    tmp_path: Path, token_file: Path, kind: str
) -> None:
    settings = _settings(
        tmp_path,
        key_service=kind,
        key_service_address="https://bao.example:8200",
        key_service_key="transit/keys/modelkeep",
        key_service_token_file=token_file,
    )
    keys = open_key_service(settings, tmp_path / "unused")
    assert isinstance(keys, TransitKeyService)
    assert repr(keys) == "TransitKeyService(key=transit/keys/modelkeep)"
    keys.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key_service": "vault"}, "must be local, openbao, awskms"),
        ({"key_service": "openbao", "key_service_address": None}, "needs MODELKEEP_KEY_SERVICE_"),
        ({"key_service": "openbao+http://bao.example:8200/transit/keys/k"}, "must be https"),
        ({"key_service": "openbao+https://bao.example/transit/k"}, "MOUNT/keys/NAME"),
        ({"key_service_token_file": None}, "needs MODELKEEP_KEY_SERVICE_TOKEN_FILE"),
        ({"key_service_approle_role_id": "role"}, "one of them"),
        ({"key_service": "awskms", "key_service_key": None}, "needs a key"),
    ],
)
def test_incomplete_or_unsafe_key_service_settings_are_refused_at_start(
    tmp_path: Path, token_file: Path, changes: dict[str, object], message: str
) -> None:
    base: dict[str, object] = {
        "key_service": "openbao",
        "key_service_address": "https://bao.example:8200",
        "key_service_key": "transit/keys/modelkeep",
        "key_service_token_file": token_file,
        "key_service_approle_secret_id_file": None,
    }
    if changes.get("key_service_approle_role_id"):
        base["key_service_approle_secret_id_file"] = token_file
    with pytest.raises(ConfigError, match=message):
        open_key_service(_settings(tmp_path, **{**base, **changes}), tmp_path / "unused")


def test_an_unreadable_token_file_is_refused_at_start(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        key_service="openbao+https://bao.example:8200/transit/keys/modelkeep",
        key_service_token_file=tmp_path / "missing",
    )
    with pytest.raises(ConfigError, match="cannot read the key service token file"):
        open_key_service(settings, tmp_path / "unused")


def test_plain_http_is_accepted_to_loopback_only(tmp_path: Path, token_file: Path) -> None:
    settings = _settings(
        tmp_path,
        key_service="openbao+http://127.0.0.1:8200/transit/keys/modelkeep",
        key_service_token_file=token_file,
    )
    open_key_service(settings, tmp_path / "unused").close()


def test_model_and_version_are_read_back_from_sealed_associated_data_only() -> None:
    assert model_and_version_of(CONTEXT) == ("fraud", 7)
    assert model_and_version_of(CONTEXT + b"x") is None
    assert model_and_version_of(b"model=fraud;version=7") is None


# -- AWS KMS error codes, through botocore's Stubber --------------------------------------------


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KmsKeyService, Stubber]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    keys = KmsKeyService("alias/modelkeep", region="us-east-1")
    with Stubber(keys._kms) as stub:
        yield keys, stub
    keys.close()


LABELS = {
    "modelkeep-context": base64.b64encode(CONTEXT).decode(),
    "model": "fraud",
    "version": "7",
}


def test_kms_wraps_with_model_and_version_in_the_encryption_context(
    kms: tuple[KmsKeyService, Stubber],
) -> None:
    keys, stub = kms
    data_key = new_data_key()
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    stub.add_response(
        "encrypt",
        {"CiphertextBlob": b"wrapped", "KeyId": arn},
        {"KeyId": "alias/modelkeep", "Plaintext": data_key, "EncryptionContext": LABELS},
    )
    assert keys.wrap(data_key, CONTEXT) == b"wrapped"
    assert keys.key_id == "awskms:1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    ("code", "error", "message", "retry"),
    [
        ("DisabledException", KeyServiceError, "no longer has", False),
        ("KMSInvalidStateException", KeyServiceError, "no longer has", False),
        ("AccessDeniedException", KeyServiceError, "refused modelkeep's credentials", True),
        ("InvalidCiphertextException", IntegrityError, "failed verification", False),
        ("KMSInternalException", KeyServiceError, "answered with an error", True),
    ],
)
def test_kms_errors_become_clear_modelkeep_errors(
    kms: tuple[KmsKeyService, Stubber],
    code: str,
    error: type[Exception],
    message: str,
    retry: bool,
) -> None:
    keys, stub = kms
    stub.add_client_error("decrypt", service_error_code=code)
    with pytest.raises(error, match=message) as raised:
        keys.unwrap(b"wrapped", CONTEXT)
    if isinstance(raised.value, KeyServiceError):
        assert retry == (raised.value.retry_after is not None)
