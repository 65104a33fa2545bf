"""TLS material for ``modelkeep init`` and the TLS settings of the server.

``create_tls_material`` makes a private CA and a server certificate it signs, so a fresh install
serves HTTPS from its first start and clients can verify it by trusting one file, ``ca.pem``.
``server_ssl_context`` is the one place that decides protocol versions and cipher suites;
``CertificateReloader`` swaps a rotated certificate into a live context.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelkeep.crypto.keyfiles import fsync_directory, write_new_file
from modelkeep.errors import ConfigError

__all__ = ["TLS_CIPHERS", "CertificateReloader", "create_tls_material", "server_ssl_context"]

log = logging.getLogger(__name__)

# TLS 1.2 suites: forward secret (ECDHE) AEADs only. TLS 1.3 suites are all AEAD and are not
# affected by this string. Exported so uvicorn can be given the very same one.
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

_CA_VALIDITY = timedelta(days=3650)
# The longest validity that all major clients accept for a server certificate.
_SERVER_VALIDITY = timedelta(days=825)
# Tolerate a client whose clock is a little behind the machine that ran `modelkeep init`.
_BACKDATE = timedelta(minutes=5)


def create_tls_material(
    tls_dir: Path,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    now: datetime | None = None,
) -> None:
    """Write a new CA and a server certificate for ``hostnames`` and ``ip_addresses``.

    Files in ``tls_dir``: ``ca.pem`` (the certificate clients trust), ``ca-key.pem`` (0600),
    ``server.pem`` (server certificate followed by the CA certificate) and ``server-key.pem``
    (0600). Keys are EC P-256, signatures ECDSA with SHA-256. Existing material is never
    overwritten (ConfigError), and nothing is written unless all four files can be.
    """
    names = _subject_alternative_names(hostnames, ip_addresses)
    issued_at = (now or datetime.now(UTC)) - _BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, issued_at)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names, issued_at)

    pem = serialization.Encoding.PEM
    files = {
        CA_FILE: (ca_cert.public_bytes(pem), 0o644),
        CA_KEY_FILE: (_private_pem(ca_key), 0o600),
        SERVER_CERT_FILE: (server_cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644),
        SERVER_KEY_FILE: (_private_pem(server_key), 0o600),
    }
    try:
        tls_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("cannot create the TLS directory") from exc
    if any((tls_dir / name).exists() for name in files):
        raise ConfigError("TLS material already exists; refusing to overwrite it")
    written: list[Path] = []
    try:
        for name, (content, mode) in files.items():
            write_new_file(tls_dir / name, content, mode, "TLS material")
            written.append(tls_dir / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    fsync_directory(tls_dir, "TLS material")


def server_ssl_context(
    certfile: Path, keyfile: Path, *, cafile: Path | None = None
) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, forward-secret AEAD suites only.

    No TLS compression (CRIME) and no renegotiation. ``cafile``, when given, is loaded for
    client certificate verification to come; client certificates are not requested yet.
    ConfigError if a file cannot be loaded (the message names no path).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError("cannot load the TLS certificate or its key") from exc
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError("cannot load the TLS CA file") from exc
    return context


class CertificateReloader:
    """Loads a replaced certificate and key into a live server context.

    cert-manager and the kubelet rotate a mounted certificate by swapping a symlink to a new
    directory, so ``check`` compares what the paths resolve to (device, inode, size, mtime).
    The new pair is tried in a scratch context first: a half-written or mismatched pair is
    reported and the context keeps serving the old one until a later check succeeds.
    Connections set up after a reload get the new certificate; open ones keep theirs.
    """

    def __init__(self, context: ssl.SSLContext, certfile: Path, keyfile: Path) -> None:
        self._context = context
        self._certfile = certfile
        self._keyfile = keyfile
        self._loaded = self._identity()

    def _identity(self) -> tuple[tuple[int, int, int, int], ...] | None:
        try:
            stats = (os.stat(self._certfile), os.stat(self._keyfile))
        except OSError:
            return None  # between the two halves of a swap; look again next time
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def check(self) -> bool:
        """Reload if the files changed since the last load; returns whether it did."""
        current = self._identity()
        if current is None or current == self._loaded:
            return False
        try:
            server_ssl_context(self._certfile, self._keyfile)
            self._context.load_cert_chain(certfile=self._certfile, keyfile=self._keyfile)
        except (ConfigError, OSError, ssl.SSLError, ValueError):
            log.warning("the replaced TLS certificate or key cannot be loaded; keeping the old")
            return False
        self._loaded = current
        log.info("TLS certificate reloaded")
        return True


def _ca_certificate(key: ec.EllipticCurvePrivateKey, issued_at: datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelkeep local CA")])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at)
        .not_valid_after(issued_at + _CA_VALIDITY)
        # pathlen 0: this CA signs server (and later client) certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    issued_at: datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelkeep server")])
    public_key = key.public_key()
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at)
        .not_valid_after(issued_at + _SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE_ECDSA handshakes need digitalSignature and nothing else.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _subject_alternative_names(
    hostnames: Sequence[str], ip_addresses: Sequence[str]
) -> list[x509.GeneralName]:
    if isinstance(hostnames, str) or isinstance(ip_addresses, str):
        raise TypeError("hostnames and ip_addresses must be sequences of strings")
    names: list[x509.GeneralName] = []
    for hostname in hostnames:
        if not hostname or not hostname.isascii():
            raise ConfigError(f"not a valid DNS name for the server certificate: {hostname!r}")
        names.append(x509.DNSName(hostname))
    for text in ip_addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"not an IP address: {text!r}") from None
        names.append(x509.IPAddress(address))
    if not names:
        raise ConfigError("the server certificate needs at least one hostname or IP address")
    return names


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
