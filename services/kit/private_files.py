"""Private files (keys, passwords, profiles): written 0600 in a 0700 directory, never
readable by others even for a moment; read only when no one else could have read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class ExposedFileError(PermissionError):
    """A private file that others may read or write: refuse it, say how to fix it."""


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Create (or with ``exclusive=False`` replace) ``path`` with mode 0600 in a 0700
    directory. ``exclusive`` refuses to overwrite: a key that exists is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(path: Path) -> None:
    """Raise ``ExposedFileError`` when group or others have any right on ``path``."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ExposedFileError(f"{path} is open to other users (mode "
                               f"{stat.S_IMODE(mode):04o}): run chmod 600 {path}")


def read_private(path: Path) -> bytes:
    """The file's bytes, after checking that only its owner may read it."""
    check_private(path)
    return path.read_bytes()
