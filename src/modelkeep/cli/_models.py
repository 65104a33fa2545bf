"""Models, their trusted publishers, and what a push sends to them.

``models create|set`` configure a model (``PUT /api/v1/models/NAME``); ``publishers add|ls|rm``
manage the public keys whose signatures the model accepts. ``open_artifact`` and
``push_signature`` prepare a push: one file as it is, or a directory packed as an uncompressed
tar into a temporary file on this machine (never whole in memory), and the signature bundle that
goes with it. A directory holding a symlink or a special file is refused before anything is sent:
the server must see exactly the bytes that were signed, and a link would make that ambiguous.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Literal

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import JSONObject, client_from
from modelkeep.cli._errors import SEE_EXIT_CODES
from modelkeep.cli._params import JsonOption, check_name
from modelkeep.crypto.signing import MAX_BUNDLE_SIZE, load_public_key, sign_path
from modelkeep.errors import Conflict, InvalidInput, ModelkeepError, NotFound

__all__ = [
    "Artifact",
    "models_app",
    "models_create",
    "models_delete",
    "models_ls",
    "models_set",
    "open_artifact",
    "publishers_app",
    "push_signature",
    "refused_report",
]

EPILOG = SEE_EXIT_CODES

models_app = typer.Typer(
    help="Create, configure and list models (signature requirement, description).",
    no_args_is_help=True,
)

# As `modelkeep sign` and `model_signing sign`: top-level git files are not part of the model.
_GIT_NAMES = frozenset({".git", ".github", ".gitattributes", ".gitignore"})
# A tar smaller than this stays in memory; a bigger one goes to a temporary file.
_SPOOL_MAX = 8 * 1024 * 1024
# Well above any PEM public key; a bigger file is not one.
_MAX_PUBLIC_KEY_FILE = 16 * 1024
_FINGERPRINT_HEX = 64

ModelArgument = Annotated[
    str, typer.Argument(metavar="MODEL", help="Model name.", callback=check_name)
]
DescriptionOption = Annotated[
    str | None,
    typer.Option(metavar="TEXT", help="What the model is for.", show_default=False),
]
UnsafeAllowUnsignedOption = Annotated[
    bool,
    typer.Option(
        "--unsafe-allow-unsigned",
        help="UNSAFE: accept pushes that carry no signature. Prints a warning every time.",
    ),
]


# -- what a push sends ------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A model ready to stream: ``handle`` at offset 0, ``size`` if known (``None`` for a pipe)."""

    handle: IO[bytes]
    size: int | None
    layout: Literal["file", "directory"]
    file_name: str


@contextmanager
def open_artifact(path: Path, *, leave_out: Path | None = None) -> Iterator[Artifact]:
    """``path`` opened for a push: a file as it is, a directory as a tar of its regular files.

    The tar holds each regular file under its relative POSIX name, with neutral owner, mode and
    time; top-level git files and ``leave_out`` (a signature kept inside the directory) are left
    out, as signing leaves them out. A symlink or special file in the directory, or an empty
    directory, raises ``InvalidInput`` before anything is sent.
    """
    if path.is_dir():
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX) as spool:
            _pack_directory(path, _identity(leave_out), spool)
            packed = spool.tell()
            spool.seek(0)
            yield Artifact(spool, packed, "directory", _base_name(path))
        return
    with _open_model_file(path) as handle:
        mode = os.fstat(handle.fileno()).st_mode
        # A regular file has a known length; a pipe is sent with chunked encoding instead.
        size = os.fstat(handle.fileno()).st_size if stat.S_ISREG(mode) else None
        yield Artifact(handle, size, "file", _base_name(path))


def push_signature(path: Path, *, signature: Path | None, sign_key: Path | None) -> bytes | None:
    """The bundle to send with ``path``: read from ``signature``, or made now with ``sign_key``
    (in a temporary file, as ``modelkeep sign`` would), or ``None`` for an unsigned push.
    The caller gives at most one of the two."""
    if signature is not None:
        return _read_bundle(signature)
    if sign_key is None:
        return None
    with tempfile.TemporaryDirectory(prefix="modelkeep-sign-") as directory:
        bundle_path = Path(directory, "model.sig")
        sign_path(path, sign_key, bundle_path)
        return _read_bundle(bundle_path)


def _read_bundle(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            bundle = handle.read(MAX_BUNDLE_SIZE + 1)
    except FileNotFoundError:
        raise InvalidInput(f"no such signature file: {out.clean(path)}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{out.clean(path)} is a directory, not a signature file") from None
    except OSError as exc:
        reason = exc.strerror or "I/O error"
        raise InvalidInput(f"cannot read signature {out.clean(path)}: {reason}") from None
    if not bundle:
        raise InvalidInput(f"the signature file {out.clean(path)} is empty")
    if len(bundle) > MAX_BUNDLE_SIZE:
        raise InvalidInput(
            f"{out.clean(path)} is larger than 1 MiB, far more than a signature: give the .sig "
            "file written by `modelkeep sign`"
        )
    return bundle


def _open_model_file(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InvalidInput(f"no such file or directory: {out.clean(path)}") from None
    except PermissionError:
        raise InvalidInput(f"cannot read {out.clean(path)}: permission denied") from None
    except OSError as exc:
        reason = exc.strerror or "I/O error"
        raise InvalidInput(f"cannot read {out.clean(path)}: {reason}") from None


def _base_name(path: Path) -> str:
    # abspath turns "." and "dir/.." into a real name, as `modelkeep sign` names its output.
    return Path(os.path.abspath(path)).name


def _identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        found = path.stat()
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def _pack_directory(root: Path, leave_out: tuple[int, int] | None, into: IO[bytes]) -> None:
    members = _regular_files(root, leave_out)
    if not members:
        raise InvalidInput(f"the model directory {out.clean(root)} has no files to push")
    with tarfile.open(fileobj=into, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, full in members:
            _add_file(tar, name, full)


def _regular_files(root: Path, leave_out: tuple[int, int] | None) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (relative POSIX name, path), sorted by name."""
    members: list[tuple[str, Path]] = []
    for current, directories, names in os.walk(root, onerror=_walk_failed):
        here = Path(current)
        top = here == root
        directories[:] = sorted(d for d in directories if not (top and d in _GIT_NAMES))
        for name in directories:
            if (here / name).is_symlink():
                raise _link_refused(root, here / name)
        for name in sorted(names):
            if top and name in _GIT_NAMES:
                continue
            full = here / name
            found = full.lstat()
            if stat.S_ISLNK(found.st_mode):
                raise _link_refused(root, full)
            if not stat.S_ISREG(found.st_mode):
                raise InvalidInput(
                    f"{_relative(root, full)} in the model directory is not a regular file "
                    "(a device, socket or pipe); only regular files can be pushed"
                )
            if leave_out is not None and (found.st_dev, found.st_ino) == leave_out:
                continue
            # The exact name, never an escaped one: it must match the signed manifest.
            members.append((full.relative_to(root).as_posix(), full))
    return sorted(members)


def _add_file(tar: tarfile.TarFile, name: str, full: Path) -> None:
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a pipe since the walk is refused,
    # never followed or waited on.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(full, flags)
    except OSError as exc:
        raise InvalidInput(
            f"cannot read {out.clean(name)} in the model directory: {exc.strerror or 'I/O error'}"
        ) from None
    with os.fdopen(descriptor, "rb") as handle:
        found = os.fstat(handle.fileno())
        if not stat.S_ISREG(found.st_mode):
            raise InvalidInput(f"{out.clean(name)} in the model directory is not a regular file")
        # The server needs names and bytes only: no local owner, mode or time leaves this machine.
        info = tarfile.TarInfo(name)
        info.size = found.st_size
        try:
            tar.addfile(info, handle)
        except OSError as exc:
            raise InvalidInput(
                f"{out.clean(name)} in the model directory changed while it was being packed; "
                "push again"
            ) from exc


def _relative(root: Path, full: Path) -> str:
    return out.clean(full.relative_to(root).as_posix())


def _link_refused(root: Path, full: Path) -> InvalidInput:
    return InvalidInput(
        f"{_relative(root, full)} in the model directory is a symlink; links are refused: "
        "replace it with the real file, so that what is signed is what is served"
    )


def _walk_failed(exc: OSError) -> None:
    raise InvalidInput(f"cannot read the model directory: {exc.strerror or 'I/O error'}") from exc


# -- models create, models set ----------------------------------------------------------------


def _warn_unsafe(model: str) -> None:
    out.warn(
        f"warning: --unsafe-allow-unsigned: model {model} will accept pushes that nobody "
        "signed; require signatures again with `modelkeep models set "
        f"{model} --require-signature`"
    )


@models_app.command("create", epilog=EPILOG)
def models_create(
    ctx: typer.Context,
    model: ModelArgument,
    description: DescriptionOption = None,
    unsafe_allow_unsigned: UnsafeAllowUnsignedOption = False,
    json_output: JsonOption = False,
) -> None:
    """Create MODEL; pushes to it must be signed by a trusted publisher unless told otherwise.

    Refused (exit 6) if MODEL exists: change it with `modelkeep models set`.

    Example: modelkeep models create iris --description "flower classifier"
    """
    if unsafe_allow_unsigned:
        _warn_unsafe(model)
    with client_from(ctx.obj) as client:
        # The API's PUT creates or updates; reading first keeps `create` from changing a model.
        try:
            client.get_model(model)
        except NotFound:
            pass
        else:
            raise Conflict(
                f"model {model} already exists; change it with `modelkeep models set {model}`"
            )
        created = client.put_model(
            model, description=description, require_signature=not unsafe_allow_unsigned
        )
    if json_output:
        out.print_json(created)
        return
    out.say(f"created model {out.clean(created.get('name', model))}")
    _describe_model(created)
    if not created.get("publishers"):
        out.say(f"next: trust a publisher key with `modelkeep publishers add {model} PUBKEY_FILE`")


@models_app.command("set", epilog=EPILOG)
def models_set(
    ctx: typer.Context,
    model: ModelArgument,
    description: DescriptionOption = None,
    require_signature: Annotated[
        bool,
        typer.Option(
            "--require-signature", help="Accept only pushes signed by a trusted publisher."
        ),
    ] = False,
    unsafe_allow_unsigned: UnsafeAllowUnsignedOption = False,
    json_output: JsonOption = False,
) -> None:
    """Change the description of MODEL or whether its pushes must be signed.

    Example: modelkeep models set iris --require-signature
    """
    if require_signature and unsafe_allow_unsigned:
        raise typer.BadParameter("give --require-signature or --unsafe-allow-unsigned, not both")
    if description is None and not require_signature and not unsafe_allow_unsigned:
        raise typer.BadParameter(
            "nothing to change: give --description, --require-signature or --unsafe-allow-unsigned"
        )
    if unsafe_allow_unsigned:
        _warn_unsafe(model)
    required = True if require_signature else (False if unsafe_allow_unsigned else None)
    with client_from(ctx.obj) as client:
        # The API's PUT would create a missing model; `set` only changes an existing one.
        client.get_model(model)
        changed = client.put_model(model, description=description, require_signature=required)
    if json_output:
        out.print_json(changed)
        return
    out.say(f"updated model {out.clean(changed.get('name', model))}")
    _describe_model(changed)


@models_app.command("ls", epilog=EPILOG)
def models_ls(
    ctx: typer.Context,
    json_output: JsonOption = False,
) -> None:
    """List the models this key may read.

    Example: modelkeep models ls --json
    """
    with client_from(ctx.obj) as client:
        models = client.list_models()
    if json_output:
        out.print_json(models)
    elif not models:
        out.say("no models yet: create one with `modelkeep models create NAME`")
    else:
        out.stdout_console().print(out.models_table(models))


@models_app.command("delete", epilog=EPILOG)
def models_delete(
    ctx: typer.Context,
    model: ModelArgument,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", help="Confirm: deleting a model cannot be undone.", show_default=False
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete MODEL (admin; needs --yes): every version crypto-shredded, its labels, captured
    payloads and settings destroyed. The name cannot be used again.

    Example: modelkeep models delete old-iris --yes
    """
    if not yes:
        raise typer.BadParameter(
            "deleting a model cannot be undone: add --yes", param_hint="'--yes'"
        )
    with client_from(ctx.obj) as client:
        done = client.delete_model(model)
    if json_output:
        out.print_json(done)
        return
    versions = done.get("deleted_versions")
    count = len(versions) if isinstance(versions, list) else 0
    out.say(
        f"deleted model {model}: {count} version(s) shredded, "
        f"{out.clean(done.get('captures_deleted'))} capture(s) destroyed"
    )


def _describe_model(model: JSONObject) -> None:
    required = model.get("require_signature")
    if required is True:
        out.say("  signatures:  required")
    elif required is False:
        out.say(f"  signatures:  {out.UNSAFE_OPTIONAL} (unsigned pushes are accepted)")
    publishers = model.get("publishers")
    if isinstance(publishers, list):
        out.say(f"  publishers:  {len(publishers)}")
    if model.get("description"):
        out.say(f"  description: {out.clean(model.get('description'))}")


# -- publishers -------------------------------------------------------------------------------

publishers_app = typer.Typer(
    help="Trust, list and remove the publisher keys whose signatures a model accepts.",
    no_args_is_help=True,
)


def _check_fingerprint(value: str) -> str:
    algorithm, _, digest = value.partition(":")
    if (
        algorithm != "sha256"
        or len(digest) != _FINGERPRINT_HEX
        or any(ch not in "0123456789abcdef" for ch in digest)
    ):
        raise typer.BadParameter(
            "give the full fingerprint, 'sha256:' and 64 hex digits, as `modelkeep publishers "
            "ls` shows it"
        )
    return value


@publishers_app.command("add", epilog=EPILOG)
def publishers_add(
    ctx: typer.Context,
    model: ModelArgument,
    public_key_file: Annotated[
        Path,
        typer.Argument(
            metavar="PUBKEY_FILE",
            help="The publisher's public key (PEM), e.g. PREFIX.pub from `modelkeep keygen`.",
            show_default=False,
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Trust the public key in PUBKEY_FILE to sign pushes of MODEL.

    Only the public key is sent: the file is read and checked here, and a private key is refused.

    Example: modelkeep publishers add iris publisher.pub
    """
    trusted_pem = _read_public_key(public_key_file)
    with client_from(ctx.obj) as client:
        publisher = client.add_publisher(model, trusted_pem)
    if json_output:
        out.print_json(publisher)
        return
    out.say(f"{model}: trusts publisher {out.clean(publisher.get('fingerprint'))}")


def _read_public_key(path: Path) -> str:
    """The PEM public key in ``path``, re-encoded so that nothing else in the file is sent."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_PUBLIC_KEY_FILE + 1)
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {out.clean(path)}") from None
    except OSError as exc:
        reason = exc.strerror or "I/O error"
        raise InvalidInput(f"cannot read {out.clean(path)}: {reason}") from None
    if b"PRIVATE KEY" in data:
        # Never send a private key anywhere, not even to a server that would refuse it.
        raise InvalidInput(
            f"{out.clean(path)} holds a private key; give the public key (PREFIX.pub from "
            "`modelkeep keygen`) and keep the private key secret"
        )
    if len(data) > _MAX_PUBLIC_KEY_FILE:
        raise InvalidInput(f"{out.clean(path)} is too large to be a PEM public key")
    return load_public_key(data).pem


@publishers_app.command("ls", epilog=EPILOG)
def publishers_ls(
    ctx: typer.Context,
    model: ModelArgument,
    json_output: JsonOption = False,
) -> None:
    """List the publisher keys MODEL trusts, by fingerprint.

    Example: modelkeep publishers ls iris
    """
    with client_from(ctx.obj) as client:
        publishers = client.list_publishers(model)
    if json_output:
        out.print_json(publishers)
    elif not publishers:
        out.say(
            f"{model} trusts no publisher yet: add one with "
            f"`modelkeep publishers add {model} PUBKEY_FILE`"
        )
    else:
        out.stdout_console().print(out.publishers_table(publishers))


@publishers_app.command("rm", epilog=EPILOG)
def publishers_rm(
    ctx: typer.Context,
    model: ModelArgument,
    fingerprint: Annotated[
        str,
        typer.Argument(
            metavar="FINGERPRINT",
            help="sha256:... as `modelkeep publishers ls` shows it.",
            callback=_check_fingerprint,
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Stop trusting a publisher key for MODEL; versions it signed stay.

    Example: modelkeep publishers rm iris sha256:4f0c...
    """
    with client_from(ctx.obj) as client:
        client.remove_publisher(model, fingerprint)
    if json_output:
        out.print_json({"model": model, "fingerprint": fingerprint})
    else:
        out.say(f"{model}: no longer trusts publisher {fingerprint}")


def refused_report(error: ModelkeepError) -> JSONObject | None:
    """The scan report a refused push carries, if the server sent one."""
    report = (error.details or {}).get("report")
    return report if isinstance(report, dict) else None
