"""`modelkeep serve` picks up a certificate rotated the way cert-manager and the kubelet rotate
a mounted Secret (a `..data` symlink swapped to a new directory), without a restart."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path

import pytest
from harness import init_server

from modelkeep.crypto import create_tls_material

pytestmark = pytest.mark.integration


def _leaf(chain: Path) -> str:
    return chain.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"


def _mount(mount: Path, generation: str, source: Path) -> None:
    folder = mount / generation
    folder.mkdir()
    (folder / "tls.crt").write_bytes((source / "server.pem").read_bytes())
    (folder / "tls.key").write_bytes((source / "server-key.pem").read_bytes())
    (mount / "..data_tmp").symlink_to(generation)
    os.replace(mount / "..data_tmp", mount / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    server = init_server(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    create_tls_material(first)
    create_tls_material(second)
    mount = tmp_path / "tls-secret"
    mount.mkdir()
    _mount(mount, "..2026_01", first)
    server.extra_env = {
        "MODELKEEP_TLS_CERT_FILE": str(mount / "tls.crt"),
        "MODELKEEP_TLS_KEY_FILE": str(mount / "tls.key"),
        "MODELKEEP_TLS_RELOAD_INTERVAL_S": "0.2",
    }
    server.ca_cert = first / "ca.pem"
    server.start()
    try:
        pid = server.proc.pid if server.proc else None
        served = ssl.get_server_certificate(("127.0.0.1", server.port))
        assert served == _leaf(first / "server.pem")

        _mount(mount, "..2026_02", second)

        deadline = time.monotonic() + 10
        while served != _leaf(second / "server.pem") and time.monotonic() < deadline:
            time.sleep(0.1)
            served = ssl.get_server_certificate(("127.0.0.1", server.port))
        assert served == _leaf(second / "server.pem")
        assert server.proc is not None
        assert (server.proc.pid, server.proc.poll()) == (pid, None)  # the same process
    finally:
        server.stop()
