"""Key services against real servers: OpenBao Transit over verified TLS, and AWS KMS's API.

OpenBao is a real server started here (modelkeep.testing_keyservers.OpenBao); AWS KMS is moto's
KMS-compatible server as a separate process, because no AWS account is reachable from the test
machines.
Every failure mode must surface as one clear KeyServiceError (or IntegrityError for a wrapped key
that does not verify), never as a fallback or a stack trace.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import Server, init_server, push, run_cli

from modelkeep.crypto import KeyService, associated_data_for, new_data_key
from modelkeep.crypto._awskms import KmsKeyService
from modelkeep.crypto._openbao import TransitKeyService, _Credentials
from modelkeep.crypto.keyservice import open_key_service
from modelkeep.crypto.tls import create_tls_material
from modelkeep.errors import ConfigError, IntegrityError, InvalidInput, KeyServiceError
from modelkeep.settings import Settings
from modelkeep.testing_keyservers import MotoKms, OpenBao

pytestmark = pytest.mark.integration

CONTEXT = associated_data_for("iris", 1, "ab" * 32)
OTHER_CONTEXT = associated_data_for("iris", 2, "ab" * 32)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = OpenBao(tmp_path_factory.mktemp("openbao"))
    try:  # a start that fails half-way still stops the process it spawned
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def opened() -> Iterator[list[KeyService]]:
    """Key services a test opens; closed after it."""
    services: list[KeyService] = []
    yield services
    for service in services:
        service.close()


@pytest.fixture
def transit(bao: OpenBao, opened: list[KeyService]) -> Callable[..., TransitKeyService]:
    def make(key: str, token_file: Path, *, verify_with: Path | None = None) -> TransitKeyService:
        service = TransitKeyService(
            bao.address,
            "transit",
            key,
            token=_Credentials(token_file=token_file),
            ca_file=verify_with or bao.ca_file,
        )
        opened.append(service)
        return service

    return make


@pytest.fixture
def keys(
    bao: OpenBao, tmp_path: Path, transit: Callable[..., TransitKeyService]
) -> TransitKeyService:
    """modelkeep's view of a fresh derived Transit key, with a least-privilege token."""
    return transit(bao.new_key(), bao.token_file(tmp_path))


# -- OpenBao Transit ---------------------------------------------------------------------------


def test_transit_wraps_and_unwraps_bound_to_the_context(keys: TransitKeyService) -> None:
    data_key = new_data_key()
    wrapped = keys.wrap(data_key, CONTEXT)
    assert wrapped.startswith(b"vault:v1:")
    assert keys.key_id.endswith(":v1")
    assert data_key == keys.unwrap(wrapped, CONTEXT)
    with pytest.raises(IntegrityError):
        keys.unwrap(wrapped, OTHER_CONTEXT)
    tampered = wrapped[:-6] + (b"AAAAAA" if not wrapped.endswith(b"AAAAAA") else b"BBBBBB")
    with pytest.raises(IntegrityError):
        keys.unwrap(tampered, CONTEXT)


def test_settings_url_form_selects_transit_and_refuses_plain_http_off_loopback(
    bao: OpenBao, tmp_path: Path, opened: list[KeyService]
) -> None:
    name = bao.new_key()
    settings = Settings(
        data_dir=tmp_path,
        key_service=f"openbao+{bao.address}/transit/keys/{name}",
        key_service_token_file=bao.token_file(tmp_path),
        key_service_ca_file=bao.ca_file,
    )
    keys = open_key_service(settings, tmp_path / "unused")
    opened.append(keys)
    data_key = new_data_key()
    assert data_key == keys.unwrap(keys.wrap(data_key, CONTEXT), CONTEXT)
    assert f"transit/{name}:v1" == keys.key_id
    plain = settings.model_copy(
        update={"key_service": f"openbao+http://bao.example:8200/transit/keys/{name}"}
    )
    with pytest.raises(ConfigError, match="must be https"):
        open_key_service(plain, tmp_path / "unused")


def test_transit_tls_is_verified(
    bao: OpenBao, tmp_path: Path, transit: Callable[..., TransitKeyService]
) -> None:
    """Without the CA that issued OpenBao's certificate, nothing is sent to it."""
    other_ca = tmp_path / "other-tls"
    create_tls_material(other_ca)
    unverified = transit(bao.new_key(), bao.token_file(tmp_path), verify_with=other_ca / "ca.pem")
    with pytest.raises(KeyServiceError, match="TLS certificate did not verify"):
        unverified.wrap(new_data_key(), CONTEXT)


def test_transit_rotate_then_rewrap_moves_a_data_key_to_the_new_version(
    bao: OpenBao, keys: TransitKeyService
) -> None:
    data_key = new_data_key()
    old = keys.wrap(data_key, CONTEXT)
    first = keys.key_id
    second = keys.rotate(new_key=True)
    assert (first[-3:], second[-3:]) == (":v1", ":v2")
    new = keys.rewrap(old, CONTEXT)
    assert new.startswith(b"vault:v2:")
    assert data_key == keys.unwrap(new, CONTEXT)
    # Retiring v1 in OpenBao: what is still wrapped by it is refused for good, clearly.
    name = keys._name
    bao.call("POST", f"transit/keys/{name}/config", {"min_decryption_version": 2})
    with pytest.raises(KeyServiceError, match="no longer has") as refused:
        keys.unwrap(old, CONTEXT)
    assert refused.value.retry_after is None
    assert data_key == keys.unwrap(new, CONTEXT)


def test_key_id_names_the_version_this_threads_wrap_used_while_another_thread_rotates(
    keys: TransitKeyService,
) -> None:
    """What a push records next to its wrapped key is the version that wrapped it."""
    wrapped = keys.wrap(new_data_key(), CONTEXT)
    rotated: list[str] = []
    other = threading.Thread(target=lambda: rotated.append(keys.rotate(new_key=True)))
    other.start()
    other.join()
    assert (wrapped[:9], keys.key_id[-3:], rotated[0][-3:]) == (b"vault:v1:", ":v1", ":v2")
    assert keys.wrap(new_data_key(), CONTEXT)[:9] == b"vault:v2:"
    assert keys.key_id[-3:] == ":v2"


def test_a_sealed_openbao_refuses_with_a_clear_retryable_error(
    bao: OpenBao, keys: TransitKeyService
) -> None:
    data_key = new_data_key()
    wrapped = keys.wrap(data_key, CONTEXT)
    bao.seal()
    try:
        with pytest.raises(KeyServiceError, match="sealed") as sealed:
            keys.unwrap(wrapped, CONTEXT)
        assert sealed.value.retry_after is not None
    finally:
        bao.unseal()
    assert data_key == keys.unwrap(wrapped, CONTEXT)


def test_a_wrong_key_name_is_a_clear_error_and_no_key_is_created(
    bao: OpenBao, tmp_path: Path, transit: Callable[..., TransitKeyService]
) -> None:
    keys = transit("no-such-key", bao.token_file(tmp_path))
    with pytest.raises(KeyServiceError, match="no Transit key 'transit/keys/no-such-key'"):
        keys.wrap(new_data_key(), CONTEXT)
    listed = bao.call("LIST", "transit/keys")["data"]["keys"]
    assert "no-such-key" not in listed


def test_a_revoked_token_is_refused_clearly(
    bao: OpenBao, tmp_path: Path, transit: Callable[..., TransitKeyService]
) -> None:
    token_file = bao.token_file(tmp_path)
    keys = transit(bao.new_key(), token_file)
    wrapped = keys.wrap(new_data_key(), CONTEXT)
    bao.revoke(token_file)
    with pytest.raises(KeyServiceError, match="refused modelkeep's token"):
        keys.unwrap(wrapped, CONTEXT)


def test_approle_login_gets_a_token(bao: OpenBao, tmp_path: Path, opened: list[KeyService]) -> None:
    bao.call("POST", "sys/auth/approle", {"type": "approle"})
    bao.call("POST", "auth/approle/role/modelkeep", {"token_policies": ["modelkeep"]})
    role_id = bao.call("GET", "auth/approle/role/modelkeep/role-id")["data"]["role_id"]
    secret = bao.call("POST", "auth/approle/role/modelkeep/secret-id")["data"]["secret_id"]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret)
    keys = TransitKeyService(
        bao.address,
        "transit",
        bao.new_key(),
        token=_Credentials(role_id=role_id, secret_id_file=secret_file),
        ca_file=bao.ca_file,
    )
    opened.append(keys)
    data_key = new_data_key()
    assert data_key == keys.unwrap(keys.wrap(data_key, CONTEXT), CONTEXT)


def test_openbao_audit_trail_holds_no_data_key(bao: OpenBao, keys: TransitKeyService) -> None:
    """The audit device logs every call, with plaintext fields HMAC'd: no data key in it."""
    data_keys = [new_data_key() for _ in range(3)]
    wrapped = [keys.wrap(k, CONTEXT) for k in data_keys]
    assert data_keys == [keys.unwrap(w, CONTEXT) for w in wrapped]
    keys.rotate(new_key=True)
    assert data_keys == [keys.unwrap(keys.rewrap(w, CONTEXT), CONTEXT) for w in wrapped]
    trail = bao.audit_log.read_bytes()
    assert trail.count(b"transit/decrypt/") >= 6  # the calls are there...
    for key in data_keys:  # ...and no form of any data key
        for form in (key, key.hex().encode(), base64.b64encode(key), base64.b64encode(key)[:20]):
            assert form not in trail


def test_a_key_service_that_never_answers_times_out(
    tmp_path: Path, opened: list[KeyService]
) -> None:
    """A listener that accepts and stays silent: the call gives up after the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    token = tmp_path / "token"
    token.write_text("s.unused")
    keys = TransitKeyService(
        f"http://127.0.0.1:{listener.getsockname()[1]}",
        "transit",
        "mk",
        token=_Credentials(token_file=token),
        timeout_s=0.5,
    )
    opened.append(keys)
    started = time.monotonic()
    try:
        with pytest.raises(KeyServiceError, match="did not answer in time"):
            keys.wrap(new_data_key(), CONTEXT)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert time.monotonic() - started < 10


def test_openbao_down_is_unreachable_then_works_again(
    bao: OpenBao, keys: TransitKeyService
) -> None:
    data_key = new_data_key()
    wrapped = keys.wrap(data_key, CONTEXT)
    bao.stop()
    try:
        with pytest.raises(KeyServiceError, match="unreachable") as down:
            keys.unwrap(wrapped, CONTEXT)
        assert down.value.retry_after is not None
    finally:
        bao.start()
    assert data_key == keys.unwrap(wrapped, CONTEXT)


# -- AWS KMS (moto's KMS-compatible server) ----------------------------------------------------


@pytest.fixture(scope="module")
def kms_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoKms]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        server = MotoKms(tmp_path_factory.mktemp("moto"))
        try:
            server.start()
            yield server
        finally:
            server.stop()


@pytest.fixture
def kms_alias(kms_server: MotoKms) -> tuple[str, str]:
    """A new KMS key behind a new alias: (alias, key id)."""
    client = kms_server.client()
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    alias = f"alias/mk-{key_id[:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=key_id)
    return alias, key_id


@pytest.fixture
def kms_keys(kms_server: MotoKms, opened: list[KeyService]) -> Callable[[str], KmsKeyService]:
    def make(key: str) -> KmsKeyService:
        service = KmsKeyService(key, region="us-east-1", endpoint_url=kms_server.endpoint)
        opened.append(service)
        return service

    return make


def test_kms_wraps_with_an_encryption_context_naming_model_and_version(
    kms_server: MotoKms, kms_alias: tuple[str, str], kms_keys: Callable[[str], KmsKeyService]
) -> None:
    alias, key_id = kms_alias
    keys = kms_keys(alias)
    data_key = new_data_key()
    wrapped = keys.wrap(data_key, CONTEXT)
    assert f"awskms:{key_id}" == keys.key_id
    assert data_key == keys.unwrap(wrapped, CONTEXT)
    # The context is KMS's encryption context, readable by an operator...
    raw = kms_server.client().decrypt(
        CiphertextBlob=wrapped,
        EncryptionContext={
            "modelkeep-context": base64.b64encode(CONTEXT).decode(),
            "model": "iris",
            "version": "1",
        },
    )
    assert data_key == raw["Plaintext"]
    # ...and a mismatch is refused.
    with pytest.raises(IntegrityError):
        keys.unwrap(wrapped, OTHER_CONTEXT)


def test_kms_settings_form_selects_kms(
    kms_server: MotoKms, kms_alias: tuple[str, str], tmp_path: Path, opened: list[KeyService]
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        key_service=f"awskms:{kms_alias[0]}",
        key_service_region="us-east-1",
        key_service_endpoint=kms_server.endpoint,
    )
    keys = open_key_service(settings, tmp_path / "unused")
    opened.append(keys)
    data_key = new_data_key()
    assert data_key == keys.unwrap(keys.wrap(data_key, CONTEXT), CONTEXT)


def test_kms_rotation_moves_data_keys_to_the_key_the_alias_names_now(
    kms_server: MotoKms, kms_alias: tuple[str, str], kms_keys: Callable[[str], KmsKeyService]
) -> None:
    alias, _ = kms_alias
    keys = kms_keys(alias)
    data_key = new_data_key()
    old = keys.wrap(data_key, CONTEXT)
    with pytest.raises(InvalidInput, match="rotates key material itself"):
        keys.rotate(new_key=True)
    client = kms_server.client()
    second = client.create_key()["KeyMetadata"]["KeyId"]
    client.update_alias(AliasName=alias, TargetKeyId=second)
    assert f"awskms:{second}" == keys.rotate(new_key=False)
    new = keys.rewrap(old, CONTEXT)
    assert f"awskms:{second}" == keys.key_id
    assert data_key == keys.unwrap(new, CONTEXT)
    # moto does not enforce key state on Decrypt, so the refusal of a data key wrapped by a
    # disabled key is tested with botocore's Stubber (tests/unit/crypto).


def test_kms_unreachable_is_a_clear_error(opened: list[KeyService]) -> None:
    from harness import free_port

    keys = KmsKeyService(
        "alias/mk", region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    opened.append(keys)
    with pytest.raises(KeyServiceError, match="unreachable"):
        keys.wrap(new_data_key(), CONTEXT)


# -- `modelkeep kek rotate` on a real server over OpenBao --------------------------------------

INFER = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


def _infer(server: Server, model: str) -> httpx.Response:
    with server.client(server.admin_key) as c:
        return c.post(f"/v2/models/{model}/infer", json=INFER)


def _by_key(server: Server) -> dict[str, int]:
    status = json.loads(run_cli("kek", "status", "--json", env=server.cli_env()).stdout)
    counts: dict[str, int] = status["versions_by_key"]
    return counts


@pytest.fixture(scope="module")
def bao_server(
    bao: OpenBao, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A modelkeep server whose data keys are wrapped by a fresh Transit key: (server, key).

    Shared by the tests below, which use distinct models.
    """
    tmp_path = tmp_path_factory.mktemp("modelkeep")
    key = bao.new_key("e2e")
    server = init_server(
        tmp_path,
        extra_env={
            "MODELKEEP_KEY_SERVICE": f"openbao+{bao.address}/transit/keys/{key}",
            "MODELKEEP_KEY_SERVICE_TOKEN_FILE": str(bao.token_file(tmp_path)),
            "MODELKEEP_KEY_SERVICE_CA_FILE": str(bao.ca_file),
        },
    )
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


def test_kek_rotate_survives_an_interruption_and_refuses_what_a_retired_key_wraps(
    bao: OpenBao, bao_server: tuple[Server, str], iris_onnx: bytes
) -> None:
    server, key = bao_server
    v1, v2, v3 = (f"transit/{key}:v{n}" for n in (1, 2, 3))
    for model in ("a", "b", "c"):
        assert push(server, model, iris_onnx).status_code == 201
    assert {v1: 3} == _by_key(server)

    # 1. A rotation interrupted after its first pass: the server is killed mid-way.
    with server.client(server.admin_key) as c:
        assert {"key_id": v2} == c.post("/api/v1/kek/rotate", json={}).json()
        first = c.post("/api/v1/kek/rewrap", json={"limit": 1}).json()
    assert (first["rewrapped"], first["remaining"]) == ([{"model": "a", "version": 1}], 2)
    server.kill()
    server.start()
    assert {v1: 2, v2: 1} == _by_key(server)

    # 2. Resumed from the command line: it finishes what is left, pass by pass.
    done = run_cli("kek", "rotate", "--rewrap-only", "--batch", "1", env=server.cli_env())
    assert f"every version and captured payload is wrapped by {v2}" in done.stdout
    assert {v2: 3} == _by_key(server)

    # 3. A new version, then a second rotation that leaves it behind under v2.
    assert push(server, "d", iris_onnx).status_code == 201
    with server.client(server.admin_key) as c:
        assert {"key_id": v3} == c.post("/api/v1/kek/rotate", json={}).json()
        moved = c.post("/api/v1/kek/rewrap", json={"limit": 3}).json()
    assert [m["model"] for m in moved["rewrapped"]] == ["a", "b", "c"]

    # 4. OpenBao retires v1 and v2. In a fresh process every re-wrapped model loads (blobs
    #    untouched), and the version left under a key OpenBao no longer has is refused,
    #    clearly, never served.
    bao.call("POST", f"transit/keys/{key}/config", {"min_decryption_version": 3})
    server.stop()
    server.start()
    assert [_infer(server, m).status_code for m in ("a", "b", "c")] == [200, 200, 200]
    refused = _infer(server, "d")
    assert (refused.status_code, refused.json()) == (
        503,
        {
            "error": "model 'd' version 1 cannot be loaded: the key service no longer has the "
            "key-encryption key version that wrapped this data key"
        },
    )
    stuck = run_cli("kek", "rotate", "--rewrap-only", env=server.cli_env(), check=False)
    assert stuck.returncode != 0
    assert "model d version 1: the key service no longer has" in stuck.stderr
    assert "1 version(s) are still wrapped by an older key-encryption key" in stuck.stderr

    # 5. Every step is in modelkeep's audit log, whose chain still verifies.
    with server.client(server.admin_key) as c:
        entries = c.get("/api/v1/audit/entries", params={"limit": 1000}).json()["entries"]
        verified = c.get("/api/v1/audit/verify").json()
    rotations = [(e["action"], e["outcome"]) for e in entries if e["action"].startswith("kek.")]
    assert rotations.count(("kek.rotate", "success")) == 4
    assert ("kek.rewrap", "success") in rotations
    assert verified["ok"] is True
    # 6. OpenBao's audit trail never saw model bytes.
    assert iris_onnx[200:264] not in bao.audit_log.read_bytes()


def test_an_unreachable_key_service_fails_loads_closed_and_keeps_serving_what_is_loaded(
    bao: OpenBao, bao_server: tuple[Server, str], iris_onnx: bytes
) -> None:
    server, _ = bao_server
    assert push(server, "loaded", iris_onnx).status_code == 201
    assert _infer(server, "loaded").status_code == 200
    bao.seal()
    try:
        # In memory: still served. A push needs the key service: a clear 503, nothing stored.
        assert _infer(server, "loaded").status_code == 200
        refused = push(server, "new", iris_onnx)
        assert (refused.status_code, refused.json()["error"]) == (
            503,
            "the key service is sealed or unavailable",
        )
        assert "Retry-After" in refused.headers
        # A fresh process has nothing in memory: the load fails closed, with the reason.
        server.stop()
        server.start()
        down = _infer(server, "loaded")
        assert (down.status_code, down.json()["error"]) == (
            503,
            "model 'loaded' version 1 cannot be loaded: the key service is sealed or unavailable",
        )
    finally:
        bao.unseal()
    # Back: the next request loads it (an outage is not remembered as a failure).
    assert _infer(server, "loaded").status_code == 200


def test_kek_rotate_with_the_local_key_file(tmp_path: Path, iris_onnx: bytes) -> None:
    """The embedded default rotates too (how other worker processes follow the new key file
    is in tests/unit/crypto/test_crypto_keyservice_select.py)."""
    server = init_server(tmp_path)
    server.start()
    try:
        assert push(server, "before", iris_onnx).status_code == 201
        (old,) = _by_key(server)
        # A captured payload is sealed under a data key of its own, wrapped by the same KEK.
        with server.client(server.admin_key) as admin:
            policy = {"capture": {"sample": 1.0, "days": 7}}
            assert admin.put("/api/v1/models/before/policy", json=policy).status_code == 200
        assert _infer(server, "before").status_code == 200
        capture_id = _wait_for_capture(server, "before")
        rotated = run_cli("kek", "rotate", env=server.cli_env())
        new = rotated.stdout.split("every version and captured payload is wrapped by ")[1]
        new = new.strip()
        assert (new != old, {new: 1}) == (True, _by_key(server))
        status = json.loads(run_cli("kek", "status", "--json", env=server.cli_env()).stdout)
        assert (status["captures_by_key"], status["captures_to_rewrap"]) == ({new: 1}, 0)
        # Pushes after the rotation are wrapped by the new KEK.
        for n in range(2):
            assert push(server, f"after-{n}", iris_onnx).status_code == 201
        assert {new: 3} == _by_key(server)
        # Nothing needs the retired KEK any more: without it, a fresh server loads everything.
        (server.data_dir / "kek.retired" / f"{old}.key").unlink()
        server.stop()
        server.start()
        models = ["before", "after-0", "after-1"]
        assert [_infer(server, m).status_code for m in models] == [200] * 3
        # The capture still opens for an auditor: its data key moved to the new KEK too.
        with server.client(server.admin_key) as admin:
            read = admin.get(f"/api/v1/models/before/captures/{capture_id}")
        assert read.status_code == 200
        assert json.loads(base64.b64decode(read.json()["record"]["input"])) == INFER
    finally:
        server.stop()


def _wait_for_capture(server: Server, model: str) -> str:
    """The id of ``model``'s one capture, once the background writer has stored it."""
    with server.client(server.admin_key) as admin:
        for _ in range(100):
            found = admin.get(f"/api/v1/models/{model}/captures").json()["captures"]
            if found:
                return str(found[0]["id"])
            time.sleep(0.1)
    raise AssertionError(f"no capture of {model} was stored")
