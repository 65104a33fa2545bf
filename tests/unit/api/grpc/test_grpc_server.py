"""The gRPC listener's certificate source: the files' pair, and a replaced pair once changed."""

from __future__ import annotations

from pathlib import Path

import grpc

from modelkeep.api.grpc.server import _address, _CertificateSource
from modelkeep.crypto import renew_server_certificate
from modelkeep.crypto.tls import create_tls_material


def test_a_renewed_certificate_is_handed_to_grpc_once(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    create_tls_material(tls)
    source = _CertificateSource(tls / "server.pem", tls / "server-key.pem", interval_s=0.0)
    assert isinstance(source.initial, grpc.ServerCertificateConfiguration)
    assert source() is None  # nothing changed
    renew_server_certificate(tls)
    assert isinstance(source(), grpc.ServerCertificateConfiguration)
    assert source() is None  # handed over once


def test_files_are_looked_at_no_more_often_than_the_interval(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    create_tls_material(tls)
    source = _CertificateSource(tls / "server.pem", tls / "server-key.pem", interval_s=3600.0)
    renew_server_certificate(tls)
    assert source() is None  # not yet time to look


def test_a_half_replaced_pair_keeps_the_old_one(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    create_tls_material(tls)
    source = _CertificateSource(tls / "server.pem", tls / "server-key.pem", interval_s=0.0)
    (tls / "server-key.pem").unlink()
    assert source() is None


def test_addresses() -> None:
    assert _address("127.0.0.1", 8081) == "127.0.0.1:8081"
    assert _address("::1", 8081) == "[::1]:8081"


def test_a_key_that_does_not_match_keeps_the_old_pair(tmp_path: Path) -> None:
    tls, other = tmp_path / "tls", tmp_path / "other"
    create_tls_material(tls)
    create_tls_material(other)
    source = _CertificateSource(tls / "server.pem", tls / "server-key.pem", interval_s=0.0)
    (tls / "server-key.pem").write_bytes((other / "server-key.pem").read_bytes())
    assert source() is None
