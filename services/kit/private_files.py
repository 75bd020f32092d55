"""Private files (keys, passwords, profiles): written 0600 in a 0700 directory, never
readable by others even for a moment; read only when no one else could have read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

K = TypeVar("K", bound=PrivateKeyTypes)


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


def load_or_create_key(path: Path, kind: Any, generate: Callable[[], K]) -> K:
    """A PEM private key of ``kind`` kept in ``path``: created once, 0600; a key file
    others may read, or of another kind, is refused, not used."""
    if path.exists():
        key = serialization.load_pem_private_key(read_private(path), password=None)
        if not isinstance(key, kind):  # kind: an abstract key class such as X25519PrivateKey
            raise ValueError(f"{path} does not hold a {kind.__name__}")
        return cast(K, key)
    key = generate()
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), exclusive=True)
    return key
