"""Creating key files: never over an existing file, with an exact mode, durable on return."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from modelkeep.errors import ConfigError


def write_new_file(path: Path, data: bytes, mode: int, what: str) -> None:
    """Create ``path`` holding ``data`` with exactly ``mode``, fsynced; never replaces a file.

    ConfigError (naming ``what``, never the path) if it exists or cannot be written; a file
    that could not be written completely is removed.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"the {what} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"cannot create the {what}") from exc
    try:
        # The umask can only remove bits; this makes the mode exact whatever it is.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the {what}") from exc
    os.close(fd)


def fsync_directory(directory: Path, what: str) -> None:
    """Make new entries in ``directory`` durable, so a created file survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot open the directory of the {what}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; the files themselves are already durable.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise ConfigError(f"cannot sync the directory of the {what}") from exc
    finally:
        os.close(fd)
