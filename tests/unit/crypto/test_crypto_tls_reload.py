"""CertificateReloader: a certificate rotated as cert-manager and the kubelet do it (a symlink
swapped to a new directory) reaches new handshakes on the same live context."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from modelkeep.crypto import create_tls_material, server_ssl_context
from modelkeep.crypto.tls import CertificateReloader


def _leaf_der(pem_chain: Path) -> bytes:
    first = pem_chain.read_text().split("-----END CERTIFICATE-----")[0]
    return ssl.PEM_cert_to_DER_cert(first + "-----END CERTIFICATE-----\n")


def _served_certificate(server: ssl.SSLContext, ca: Path) -> bytes:
    """The certificate a new TLS handshake with ``server`` presents, over memory BIOs."""
    client_ctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side, out, peer_in in (
            ("client", client, c_out, s_in),
            ("server", srv, s_out, c_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return der


def _kubelet_layout(mount: Path, generation: Path) -> None:
    """tls.crt -> ..data/tls.crt, ..data -> <generation>: what a Secret volume looks like."""
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(generation.name)
    os.replace(tmp_link, mount / "..data")  # the atomic swap
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


def _generation(mount: Path, name: str, source: Path) -> Path:
    folder = mount / name
    folder.mkdir()
    (folder / "tls.crt").write_bytes((source / "server.pem").read_bytes())
    (folder / "tls.key").write_bytes((source / "server-key.pem").read_bytes())
    return folder


def test_a_swapped_certificate_is_served_to_new_handshakes(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    create_tls_material(old)
    create_tls_material(new)
    mount = tmp_path / "mount"
    mount.mkdir()
    _kubelet_layout(mount, _generation(mount, "..2026_01", old))
    context = server_ssl_context(mount / "tls.crt", mount / "tls.key")
    reloader = CertificateReloader(context, mount / "tls.crt", mount / "tls.key")
    assert _served_certificate(context, old / "ca.pem") == _leaf_der(old / "server.pem")
    assert reloader.check() is False  # nothing changed yet

    _kubelet_layout(mount, _generation(mount, "..2026_02", new))

    assert reloader.check() is True
    assert _served_certificate(context, new / "ca.pem") == _leaf_der(new / "server.pem")
    assert reloader.check() is False  # loaded once per change


def test_a_mismatched_pair_keeps_the_old_certificate(tmp_path: Path) -> None:
    old, other = tmp_path / "old", tmp_path / "other"
    create_tls_material(old)
    create_tls_material(other)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes((old / "server.pem").read_bytes())
    key.write_bytes((old / "server-key.pem").read_bytes())
    context = server_ssl_context(cert, key)
    reloader = CertificateReloader(context, cert, key)

    # Half a rotation: a new certificate beside the old key.
    cert.write_bytes((other / "server.pem").read_bytes())

    assert reloader.check() is False
    assert _served_certificate(context, old / "ca.pem") == _leaf_der(old / "server.pem")
    # The key arrives: the next check loads the complete pair.
    key.write_bytes((other / "server-key.pem").read_bytes())
    assert reloader.check() is True
    assert _served_certificate(context, other / "ca.pem") == _leaf_der(other / "server.pem")
