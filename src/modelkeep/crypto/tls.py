"""TLS material for ``modelkeep init`` and the TLS settings of the server.

``create_tls_material`` makes a private CA and a server certificate it signs, so a fresh install
serves HTTPS from its first start and clients can verify it by trusting one file, ``ca.pem``.
``server_ssl_context`` is the one place that decides protocol versions, cipher suites and
key-exchange groups; ``CertificateReloader`` swaps a rotated certificate into a live context.
``renew_server_certificate`` issues a fresh server certificate from the same CA
(``modelkeep tls renew``), and ``certificate_not_after`` tells when one expires.

The profile follows Mozilla's "intermediate" server configuration (docs/tls.md):
TLS 1.2 and 1.3, forward-secret AEAD suites only, the groups X25519, P-256 and P-384, and server
certificates valid at most 366 days.
"""

from __future__ import annotations

import ctypes
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

__all__ = [
    "TLS_CIPHERS",
    "TLS_GROUPS",
    "CertificateReloader",
    "certificate_not_after",
    "create_tls_material",
    "renew_server_certificate",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

# TLS 1.2 suites: forward secret (ECDHE) AEADs only. TLS 1.3 suites are all AEAD and are not
# affected by this string. Exported so uvicorn can be given the very same one.
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
# Key-exchange groups, for TLS 1.2 and 1.3 alike: Mozilla's intermediate profile leaves out
# X448 and P-521 (slow, and rarely offered by real clients).
TLS_GROUPS = "X25519:P-256:P-384"

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

_CA_VALIDITY = timedelta(days=3650)
# Mozilla's intermediate profile recommends at most 366 days (public CAs are capped at 398).
_SERVER_VALIDITY = timedelta(days=366)
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
    """A server context: TLS 1.2 or later, forward-secret AEAD suites, the ``TLS_GROUPS`` only.

    No TLS compression (CRIME) and no renegotiation. ``cafile``, when given, is loaded for
    client certificate verification to come; client certificates are not requested yet.
    ConfigError if a file cannot be loaded (the message names no path).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _restrict_groups(context, TLS_GROUPS)
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


def renew_server_certificate(
    tls_dir: Path,
    *,
    hostnames: Sequence[str] | None = None,
    ip_addresses: Sequence[str] | None = None,
    now: datetime | None = None,
) -> datetime:
    """Replace the server certificate and key in ``tls_dir`` with new ones from its CA.

    The names default to those of the current certificate. Each file is replaced atomically
    (written beside it, then renamed), so a server that reloads its certificate never reads a
    half-written file. Returns the new certificate's expiry. ConfigError if the CA or its key
    cannot be read (the message names no path).
    """
    try:
        ca_cert = x509.load_pem_x509_certificate((tls_dir / CA_FILE).read_bytes())
        ca_key = serialization.load_pem_private_key(
            (tls_dir / CA_KEY_FILE).read_bytes(), password=None
        )
    except (OSError, ValueError) as exc:
        raise ConfigError("cannot read the CA certificate or its key") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key made by `modelkeep init`")
    if hostnames is None or ip_addresses is None:
        old_hosts, old_ips = _current_names(tls_dir / SERVER_CERT_FILE)
        hostnames = old_hosts if hostnames is None else hostnames
        ip_addresses = old_ips if ip_addresses is None else ip_addresses
    names = _subject_alternative_names(hostnames, ip_addresses)
    issued_at = (now or datetime.now(UTC)) - _BACKDATE
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names, issued_at)
    pem = serialization.Encoding.PEM
    # The key first: a server reloading between the two renames fails to match the old
    # certificate with the new key, keeps its current context and tries again later.
    _replace(tls_dir / SERVER_KEY_FILE, _private_pem(server_key), 0o600)
    _replace(
        tls_dir / SERVER_CERT_FILE,
        server_cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        0o644,
    )
    fsync_directory(tls_dir, "TLS material")
    return server_cert.not_valid_after_utc


def certificate_not_after(certfile: Path) -> datetime:
    """When the first certificate in ``certfile`` expires. ConfigError if it cannot be read."""
    try:
        return x509.load_pem_x509_certificate(certfile.read_bytes()).not_valid_after_utc
    except (OSError, ValueError) as exc:
        raise ConfigError("cannot read the TLS certificate") from exc


def _current_names(certfile: Path) -> tuple[list[str], list[str]]:
    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(
            "cannot read the names of the current server certificate; give them explicitly"
        ) from exc
    hosts = names.get_values_for_type(x509.DNSName)
    ips = [str(address) for address in names.get_values_for_type(x509.IPAddress)]
    return hosts, ips


def _replace(path: Path, content: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    write_new_file(temporary, content, mode, "TLS material")
    try:
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigError("cannot replace the TLS material") from exc


# OpenSSL's SSL_CTX_ctrl command behind SSL_CTX_set1_groups_list (ssl.h, stable since 1.1.0).
_SSL_CTRL_SET_GROUPS_LIST = 92


def _restrict_groups(context: ssl.SSLContext, groups: str) -> None:
    """Limit the key-exchange groups of ``context`` to ``groups`` (OpenSSL's list syntax).

    Python's ssl module has no call for this before 3.15 (``set_ecdh_curve`` sets a single
    TLS 1.2 curve and cannot name X25519), and no library wraps an ``ssl.SSLContext`` for it, so
    it is hand-written: OpenSSL's ``SSL_CTX_set1_groups_list`` through ctypes, on the very
    libssl the ``_ssl`` module uses. The ``SSL_CTX`` pointer is read from the context object;
    before writing anything it is checked by reading the context's options through OpenSSL and
    comparing them with ``context.options``. Any mismatch or failure is a ConfigError: the server
    does not start with a profile it could not apply.
    """
    setter = getattr(context, "set_groups", None)
    if setter is not None:  # Python 3.15+
        setter(groups)
        return
    import _ssl

    try:
        libssl = ctypes.CDLL(_ssl.__file__)
        get_options = libssl.SSL_CTX_get_options
        ctrl = libssl.SSL_CTX_ctrl
    except (OSError, AttributeError) as exc:
        raise ConfigError("cannot restrict the TLS key-exchange groups") from exc
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    # CPython's PySSLContext starts with PyObject_HEAD, then the SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != int(context.options):
        raise ConfigError("cannot restrict the TLS key-exchange groups")
    if ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        raise ConfigError("cannot restrict the TLS key-exchange groups")
