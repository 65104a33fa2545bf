"""``modelkeep sign`` and ``modelkeep keygen``: a publisher's tools, run on the publisher's machine.

Both work offline and talk to no server. ``sign`` writes the same OpenSSF model-signing bundle
as ``model_signing sign key``, so either tool's signature is accepted by a modelkeep server that
trusts the public key; ``keygen`` makes that key pair. Failures raise ``ModelkeepError`` and the
root group turns them into one ``error:`` line and an exit code (``_errors.ERROR_TABLE``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from modelkeep.cli import _output as out
from modelkeep.crypto.signing import generate_signing_key, sign_path

__all__ = ["default_signature_path", "keygen", "sign"]


def default_signature_path(model: Path) -> Path:
    """Where ``sign`` writes by default: ``FILE.sig`` beside a file, ``DIR.sig`` beside a directory.

    Beside, never inside, a directory: a signature inside the model would be left out of what it
    signs, and a server given the whole directory would refuse it as an unsigned file.
    """
    resolved = Path(os.path.abspath(model))  # also turns "." and "dir/.." into a real name
    return resolved.with_name(resolved.name + ".sig")


def sign(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="The model: one file, or a directory (every file in it is signed).",
            show_default=False,
        ),
    ],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            metavar="KEY",
            help="EC private key (PEM), e.g. the PREFIX.key written by `modelkeep keygen`.",
            show_default=False,
        ),
    ],
    signature: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="SIG",
            help="Where to write the signature. Default: PATH.sig beside the file or directory.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Sign a model file or directory with your private key (OpenSSF model-signing bundle).

    Writes what `model_signing sign key --private_key KEY` writes: one SHA-256 per file.
    Git files are left out; a directory holding a symlink is refused.

    Example: modelkeep sign iris.onnx --key publisher.key
    """
    target = signature if signature is not None else default_signature_path(path)
    sign_path(path, key, target)
    out.say(f"signed {out.clean(path)}: signature written to {out.clean(target)}")


def keygen(
    prefix: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="PREFIX",
            help="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public).",
            show_default=False,
        ),
    ],
    curve: Annotated[
        str,
        typer.Option(metavar="CURVE", help="P-256 or P-384."),
    ] = "P-256",
) -> None:
    """Create a signing key pair; prints the public key's fingerprint. Never overwrites.

    Give PREFIX.pub to the admin who sets a model's trusted publishers.
    Keep PREFIX.key secret: it is not encrypted.

    Example: modelkeep keygen --out publisher
    """
    if prefix.name in ("", ".", ".."):
        raise typer.BadParameter("give a file name prefix, e.g. publisher", param_hint="'--out'")
    private_out = prefix.with_name(prefix.name + ".key")
    public_out = prefix.with_name(prefix.name + ".pub")
    trusted = generate_signing_key(private_out, public_out, curve=curve)
    out.say(f"private key: {out.clean(private_out)} (keep it secret)")
    out.say(f"public key:  {out.clean(public_out)} ({trusted.curve})")
    out.say(f"fingerprint: {trusted.fingerprint}")
