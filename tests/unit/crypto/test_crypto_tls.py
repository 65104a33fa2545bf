"""TLS material and server context: real handshakes on loopback, certificate contents, modes."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelkeep.crypto import (
    TLS_CIPHERS,
    certificate_not_after,
    create_tls_material,
    renew_server_certificate,
    server_ssl_context,
)
from modelkeep.errors import ConfigError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    create_tls_material(directory)
    return directory


@dataclass
class _OneShotServer:
    """Accepts one TLS connection, records how the handshake went, answers b"ok"."""

    context: ssl.SSLContext
    port: int = 0
    version: str | None = None
    cipher: str | None = None
    error: BaseException | None = None
    _listener: socket.socket = field(init=False)
    _thread: threading.Thread = field(init=False)

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self._listener.accept()
            connection.settimeout(TIMEOUT)
            with self.context.wrap_socket(connection, server_side=True) as tls:
                self.version = tls.version()
                cipher = tls.cipher()
                self.cipher = cipher[0] if cipher else None
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
        finally:
            self._listener.close()

    def join(self) -> None:
        self._thread.join(TIMEOUT)


@pytest.fixture
def server(tls_dir: Path) -> Iterator[_OneShotServer]:
    context = server_ssl_context(tls_dir / "server.pem", tls_dir / "server-key.pem")
    one_shot = _OneShotServer(context)
    one_shot.start()
    yield one_shot
    one_shot.join()


def _connect(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(2)


def _certificates(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_a_client_trusting_ca_pem_verifies_the_server(
    tls_dir: Path, server: _OneShotServer, server_hostname: str
) -> None:
    client = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    assert _connect(server.port, client, server_hostname) == b"ok"
    server.join()
    assert (server.error, server.version) == (None, "TLSv1.3")


def test_a_tls_1_2_client_gets_an_ecdhe_aead_suite(tls_dir: Path, server: _OneShotServer) -> None:
    client = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _connect(server.port, client, "localhost") == b"ok"
    server.join()
    assert server.version == "TLSv1.2"
    assert server.cipher in {
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    }


def test_a_client_pinned_to_tls_1_1_is_refused(tls_dir: Path, server: _OneShotServer) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(tls_dir / "ca.pem"))
    # Python deprecates TLS 1.0/1.1 and OpenSSL's default security level hides them; lower
    # both on the client only, so that the refusal observed is the server's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as info:
        _connect(server.port, client, "localhost")
    server.join()
    # The client offered TLS 1.1 and the server answered with a protocol_version alert.
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert isinstance(server.error, ssl.SSLError)
    assert server.error.reason == "UNSUPPORTED_PROTOCOL"
    assert server.version is None


def test_a_client_checking_another_hostname_refuses_the_server(
    tls_dir: Path, server: _OneShotServer
) -> None:
    client = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(server.port, client, "example.com")


def test_the_server_context_allows_only_tls_1_2_and_later_without_compression(
    tls_dir: Path,
) -> None:
    context = server_ssl_context(tls_dir / "server.pem", tls_dir / "server-key.pem")
    assert ssl.TLSVersion.TLSv1_2 == context.minimum_version
    assert ssl.OP_NO_COMPRESSION & context.options
    assert ssl.OP_NO_RENEGOTIATION & context.options
    assert context.verify_mode == ssl.CERT_NONE
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12
    assert all(name.startswith("ECDHE-") for name in tls12)
    assert all("GCM" in name or "CHACHA20" in name for name in tls12)


def test_tls_ciphers_is_the_string_the_context_uses(tls_dir: Path) -> None:
    reference = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    reference.set_ciphers(TLS_CIPHERS)
    context = server_ssl_context(tls_dir / "server.pem", tls_dir / "server-key.pem")
    names = [c["name"] for c in context.get_ciphers()]
    assert [c["name"] for c in reference.get_ciphers()] == names


def test_a_ca_file_is_loaded_but_client_certificates_are_not_requested(tls_dir: Path) -> None:
    context = server_ssl_context(
        tls_dir / "server.pem", tls_dir / "server-key.pem", cafile=tls_dir / "ca.pem"
    )
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.verify_mode == ssl.CERT_NONE


def test_unloadable_files_raise_config_error_without_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        server_ssl_context(tmp_path / "nope.pem", tmp_path / "nope-key.pem")
    assert str(tmp_path) not in info.value.message


def test_key_files_are_owner_only_and_certificates_readable(tls_dir: Path) -> None:
    modes = {
        name: stat.S_IMODE((tls_dir / name).stat().st_mode)
        for name in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")
    }
    expected = {"ca.pem": 0o644, "ca-key.pem": 0o600, "server.pem": 0o644, "server-key.pem": 0o600}
    assert expected == modes


def test_the_ca_certificate(tmp_path: Path) -> None:
    create_tls_material(tmp_path, now=NOW)
    (ca,) = _certificates(tmp_path / "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "modelkeep local CA"
    assert ca.subject == ca.issuer
    assert (
        constraints.critical,
        constraints.value.ca,
        constraints.value.path_length,
    ) == (True, True, 0)
    assert (usage.key_cert_sign, usage.crl_sign, usage.digital_signature) == (True, True, False)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.signature_hash_algorithm.name == "sha256"  # type: ignore[union-attr]
    assert timedelta(days=3650) == ca.not_valid_after_utc - ca.not_valid_before_utc
    assert ca.not_valid_before_utc <= NOW < ca.not_valid_after_utc


def test_the_server_certificate(tmp_path: Path) -> None:
    create_tls_material(
        tmp_path, hostnames=("models.internal",), ip_addresses=("10.0.0.7",), now=NOW
    )
    leaf, chained_ca = _certificates(tmp_path / "server.pem")
    (ca,) = _certificates(tmp_path / "ca.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca == chained_ca
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "modelkeep server"
    assert ca.subject == leaf.issuer
    assert san.get_values_for_type(x509.DNSName) == ["models.internal"]
    assert [ipaddress.ip_address("10.0.0.7")] == san.get_values_for_type(x509.IPAddress)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert constraints.ca is False
    assert leaf.signature_hash_algorithm.name == "sha256"  # type: ignore[union-attr]
    assert timedelta(days=366) == leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert leaf.not_valid_before_utc <= NOW < leaf.not_valid_after_utc
    leaf.verify_directly_issued_by(ca)


def test_serial_numbers_are_random(tmp_path: Path) -> None:
    create_tls_material(tmp_path / "a")
    create_tls_material(tmp_path / "b")
    serials = {
        cert.serial_number
        for name in ("a/ca.pem", "a/server.pem", "b/ca.pem", "b/server.pem")
        for cert in _certificates(tmp_path / name)
    }
    assert len(serials) == 4


def test_existing_material_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "server-key.pem").write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_tls_material(tmp_path)
    assert (tmp_path / "server-key.pem").read_bytes() == b"keep me"
    assert not (tmp_path / "ca.pem").exists()


@pytest.mark.parametrize(
    ("hostnames", "ip_addresses"),
    [(("localhost",), ("not-an-ip",)), ((), ()), (("",), ())],
)
def test_bad_names_raise_config_error(
    tmp_path: Path, hostnames: tuple[str, ...], ip_addresses: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError):
        create_tls_material(tmp_path, hostnames=hostnames, ip_addresses=ip_addresses)
    assert list(tmp_path.iterdir()) == []


def _openssl_handshake(port: int, ca: Path, *args: str) -> str:
    """The line openssl s_client prints about the session: protocol and cipher, or (NONE)."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed (scripts/debian-packages.txt)"
    result = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), *args],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    session = [line for line in result.stdout.decode().splitlines() if line.startswith("New, ")]
    assert session, result.stdout.decode()
    return session[0]


@pytest.mark.parametrize(
    ("group", "version"),
    [("X448", "-tls1_3"), ("P-521", "-tls1_3"), ("X448", "-tls1_2"), ("P-521", "-tls1_2")],
)
def test_a_client_offering_only_x448_or_p521_is_refused(
    tls_dir: Path, server: _OneShotServer, group: str, version: str
) -> None:
    session = _openssl_handshake(server.port, tls_dir / "ca.pem", "-groups", group, version)
    server.join()
    assert session == "New, (NONE), Cipher is (NONE)"
    assert isinstance(server.error, ssl.SSLError)


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_a_tls_1_3_client_offering_one_allowed_group_connects(
    tls_dir: Path, server: _OneShotServer, group: str
) -> None:
    session = _openssl_handshake(server.port, tls_dir / "ca.pem", "-groups", group, "-tls1_3")
    server.join()
    assert session.startswith("New, TLSv1.3, Cipher is TLS_")
    assert server.error is None


def test_renewal_issues_a_new_key_and_certificate_for_the_same_names(tmp_path: Path) -> None:
    create_tls_material(
        tmp_path, hostnames=("models.internal",), ip_addresses=("10.0.0.7",), now=NOW
    )
    old_key = (tmp_path / "server-key.pem").read_bytes()
    (old_leaf, _) = _certificates(tmp_path / "server.pem")
    later = NOW + timedelta(days=300)

    expires = renew_server_certificate(tmp_path, now=later)

    leaf, chained_ca = _certificates(tmp_path / "server.pem")
    (ca,) = _certificates(tmp_path / "ca.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert old_key != (tmp_path / "server-key.pem").read_bytes()
    assert old_leaf.serial_number != leaf.serial_number
    assert san.get_values_for_type(x509.DNSName) == ["models.internal"]
    assert [ipaddress.ip_address("10.0.0.7")] == san.get_values_for_type(x509.IPAddress)
    assert leaf.not_valid_before_utc <= later < leaf.not_valid_after_utc
    assert timedelta(days=366) == leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert expires == leaf.not_valid_after_utc == certificate_not_after(tmp_path / "server.pem")
    assert ca == chained_ca
    leaf.verify_directly_issued_by(ca)
    assert stat.S_IMODE((tmp_path / "server-key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "server-key.pem",
        "server.pem",
    ]
    # The renewed pair loads as a server context.
    server_ssl_context(tmp_path / "server.pem", tmp_path / "server-key.pem")


def test_renewal_without_the_ca_key_changes_nothing(tmp_path: Path) -> None:
    create_tls_material(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(ConfigError, match="CA") as caught:
        renew_server_certificate(tmp_path)
    assert str(tmp_path) not in str(caught.value)
    assert (tmp_path / "server.pem").read_bytes() == before["server.pem"]
    assert (tmp_path / "server-key.pem").read_bytes() == before["server-key.pem"]
