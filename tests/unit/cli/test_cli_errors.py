"""Every failure is one ``error:`` line on stderr with the documented exit code; no traceback."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ADMIN_TOKEN, FakeServer, Invoke
from modelkeep.cli._errors import ERROR_TABLE, exit_code_for
from modelkeep.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidInput,
    ModelkeepError,
    ModelRefused,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

# -- HTTP status -> exit code -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [
        (400, 1),
        (401, 3),
        (403, 4),
        (404, 5),
        (409, 6),
        (413, 7),
        (422, 8),
        (429, 9),
        (500, 1),
        (503, 1),
        (418, 1),
    ],
)
def test_http_error_shows_the_servers_message_and_maps_the_status(
    invoke: Invoke, server: FakeServer, status: int, exit_code: int
) -> None:
    server.fail_next = httpx.Response(status, json={"error": f"the server says {status}"})

    result = invoke("models", "ls")

    assert exit_code == result.exit_code
    assert f"error: the server says {status}\n" == result.stderr
    assert result.stdout == ""


def test_every_command_maps_errors_the_same_way(
    invoke: Invoke, server: FakeServer, tmp_path: Path
) -> None:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"not onnx")
    commands = [
        ("push", "iris", str(model_file)),
        ("models", "ls"),
        ("models", "create", "iris"),
        ("models", "set", "iris", "--require-signature"),
        ("publishers", "ls", "iris"),
        ("publishers", "rm", "iris", "sha256:" + "0" * 64),
        ("versions", "ls", "iris"),
        ("label", "set", "iris", "prod", "1"),
        ("label", "rm", "iris", "prod"),
        ("keys", "create", "--role", "consumer"),
        ("keys", "ls"),
        ("keys", "revoke", "abc"),
        ("whoami",),
    ]
    outcomes = []
    for command in commands:
        server.fail_next = httpx.Response(422, json={"error": "refused"})
        result = invoke(*command)
        outcomes.append((result.exit_code, result.stderr))

    assert [(8, "error: refused\n")] * len(commands) == outcomes


def test_rate_limited_answer_mentions_retry_after(invoke: Invoke, server: FakeServer) -> None:
    server.fail_next = httpx.Response(
        429, json={"error": "too many requests"}, headers={"Retry-After": "7"}
    )

    result = invoke("whoami")

    assert result.exit_code == 9
    assert result.stderr == "error: too many requests (retry after 7 s)\n"


def test_error_without_json_body_names_the_status(invoke: Invoke, server: FakeServer) -> None:
    server.fail_next = httpx.Response(502, text="<html>bad gateway</html>")

    result = invoke("whoami")

    assert result.exit_code == 1
    assert result.stderr == "error: server answered HTTP 502 Bad Gateway\n"


def test_server_message_cannot_inject_terminal_codes_or_lines(
    invoke: Invoke, server: FakeServer
) -> None:
    server.fail_next = httpx.Response(400, json={"error": "bad\x1b[2J input\nsecond line"})

    result = invoke("whoami")

    assert result.stderr == "error: bad\\x1b[2J input second line\n"


def test_success_answer_that_is_not_json_is_an_error(invoke: Invoke, server: FakeServer) -> None:
    server.fail_next = httpx.Response(200, text="hello")

    result = invoke("whoami")

    assert result.exit_code == 1
    assert result.stderr == "error: the server's answer is not JSON\n"


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (InvalidInput, 1),
        (Unauthenticated, 3),
        (Forbidden, 4),
        (NotFound, 5),
        (Conflict, 6),
        (TooLarge, 7),
        (ModelRefused, 8),
        (RateLimited, 9),
        (Unavailable, 1),
        (IntegrityError, 1),
        (ConfigError, 1),
        (ModelkeepError, 1),
    ],
)
def test_local_errors_map_by_code(error: type[ModelkeepError], exit_code: int) -> None:
    assert exit_code == exit_code_for(error("x"))


def test_error_table_statuses_become_their_error_class() -> None:
    from modelkeep.cli._errors import error_from_response

    classes = [
        type(error_from_response(httpx.Response(row.status, json={"error": "m"})))
        for row in ERROR_TABLE
    ]

    assert [row.error for row in ERROR_TABLE] == classes


# -- local problems ---------------------------------------------------------------------------


def test_missing_token_is_reported_before_any_request(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("models", "ls", token=None)

    assert result.exit_code == 3
    assert result.stderr == "error: no API key: set MODELKEEP_TOKEN or pass --token\n"
    assert server.requests == []


def test_url_comes_from_the_environment_with_its_path_prefix(
    invoke: Invoke, server: FakeServer
) -> None:
    invoke("whoami", env={"MODELKEEP_URL": "https://models.example:9443/mk/"})

    assert str(server.requests[0].url) == "https://models.example:9443/mk/api/v1/whoami"


def test_plain_http_to_another_host_is_refused(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("--url", "http://models.example:8080", "whoami")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: refusing to send an API key over plain http")
    assert server.requests == []


def test_plain_http_to_loopback_is_allowed(invoke: Invoke, server: FakeServer) -> None:
    result = invoke("--url", "http://127.0.0.1:8080", "whoami")

    assert result.exit_code == 0, result.output


def test_unreadable_ca_file_is_reported(invoke: Invoke, tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")

    result = invoke("--cacert", str(bad), "whoami")

    assert result.exit_code == 1
    assert f"error: CA certificate '{bad}' is not a readable PEM file\n" == result.stderr


# -- no answer at all -------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_connection_refused_gets_a_human_message(invoke: Invoke, closed_port: int) -> None:
    url = f"https://127.0.0.1:{closed_port}"

    result = invoke("--url", url, "whoami", transport=None)

    assert result.exit_code == 1
    expected = f"error: cannot connect to {url}: connection refused (is the server running?)\n"
    assert expected == result.stderr


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (httpx.ConnectTimeout("t"), "error: cannot connect to https://127.0.0.1:8443: timed out"),
        (
            httpx.ReadTimeout("t"),
            "error: no answer from https://127.0.0.1:8443: timed out waiting for the server",
        ),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            "error: connection to https://127.0.0.1:8443 failed: "
            "Server disconnected without sending a response.",
        ),
    ],
)
def test_timeouts_and_dropped_connections_get_a_human_message(
    invoke: Invoke, exception: httpx.TransportError, expected: str
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exception

    result = invoke("whoami", transport=httpx.MockTransport(fail))

    assert result.exit_code == 1
    assert f"{expected}\n" == result.stderr


# -- real TLS ---------------------------------------------------------------------------------


def _certificate_authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


class _WhoamiHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        answer: dict[str, object]
        if self.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            answer, status = {"error": "who are you"}, 401
        else:
            answer, status = {"id": "tlskey", "role": "admin", "models": None}, 200
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """An HTTPS server on 127.0.0.1; yields its URL, its CA file and an unrelated CA file."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _certificate_authority("modelkeep test CA")
    key, cert = _server_certificate(ca_key, ca_cert)
    _, other_ca = _certificate_authority("some other CA")
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "other.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem")
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _WhoamiHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield (
            f"https://127.0.0.1:{httpd.server_address[1]}",
            directory / "ca.pem",
            directory / "other.pem",
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_cacert_lets_the_client_trust_the_servers_certificate(
    invoke: Invoke, tls_server: tuple[str, Path, Path]
) -> None:
    url, ca_file, _ = tls_server

    result = invoke("--url", url, "--cacert", str(ca_file), "whoami", "--json", transport=None)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "tlskey"


def test_cacert_from_the_environment_is_used(
    invoke: Invoke, tls_server: tuple[str, Path, Path]
) -> None:
    url, ca_file, _ = tls_server

    result = invoke(
        "whoami",
        "--json",
        env={"MODELKEEP_URL": url, "MODELKEEP_CACERT": str(ca_file)},
        transport=None,
    )

    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("use_other_ca", [True, False], ids=["other-ca", "system-store"])
def test_untrusted_certificate_gets_a_human_message(
    invoke: Invoke, tls_server: tuple[str, Path, Path], use_other_ca: bool
) -> None:
    url, _, other_ca = tls_server
    args = ["--url", url] + (["--cacert", str(other_ca)] if use_other_ca else []) + ["whoami"]

    result = invoke(*args, transport=None)

    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: cannot connect to {url}: TLS certificate verification failed ("
    )
    assert result.stderr.endswith(
        "pass the server's CA certificate with --cacert or MODELKEEP_CACERT\n"
    )
    assert result.stderr.count("\n") == 1
