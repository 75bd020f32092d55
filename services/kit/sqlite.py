"""The one way a service opens its local SQLite state: the file 0600 in a 0700 directory,
before SQLite creates it (its WAL and shared-memory files take the same mode), WAL
journal with full fsync. State files hold key material (the vault index) or personal
data (case and agent ids): no other user of the host may read them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any


def private_path(path: Path) -> Path:
    """Create ``path``'s directory 0700 and the file itself 0600 if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


def connect(path: Path, **options: Any) -> sqlite3.Connection:
    """A WAL, synchronous=FULL connection to a private SQLite file."""
    db: sqlite3.Connection = sqlite3.connect(private_path(path), **options)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
