"""The image vault (REQ-ENCRYPT, REQ-TTL): envelope encryption, claim-check references, and
a durable index of expiries that the purger works from.

Each object gets its own 256-bit data key; the image is sealed with AES-256-GCM whose
associated data binds the probe id, case id and object kind, so a ciphertext cannot be
passed off as another probe's. The data key is wrapped by a key-encryption key, either a
local 0600 key file or AWS KMS (GenerateDataKey/Decrypt with the same binding as
encryption context), and the wrapped key lives only in the index, never next to the
ciphertext. Purging deletes the ciphertext and then destroys the wrapped key
(crypto-shredding): any copy of the ciphertext, in a backup or a replica, is then noise.
A copy of the index taken before the purge (a dump, a backup, its WAL) still holds the
wrapped key: in local mode the data key is therefore wrapped under the key of the epoch
its expiry falls in (``services/vault/epochs.py``), kept outside the index and destroyed
once the epoch is over, which makes every such copy noise too (docs/security.md).

The index is a port (``VaultIndex``): ``SqliteVaultIndex`` (one host: WAL mode with
``secure_delete`` on and a truncating checkpoint after each shred, so the destroyed key does
not linger in free pages or the write-ahead log) or ``PgVaultIndex``
(``services/vault/pg_index.py``: the shared database, every instance of intake and dispatch
on every host). ``services.vault.open_index`` picks one from ``FRS_STATE_URL``.

Every service opens it the same way (``services.vault.open_vault`` over ``VaultSettings``,
FRS_VAULT_*): ``Vault.get(ref)`` returns the sanitized image or raises ``ObjectPurged`` /
``UnknownObject``. Only the intake's purger deletes."""

from __future__ import annotations

import glob
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.kit.private_files import ExposedFileError, read_private, write_private
from services.kit.sqlite import connect

ObjectKind = Literal["probe", "candidate"]
_MAGIC = b"FRSV1"
_NONCE = 12


class VaultError(Exception):
    """A vault operation failed; never carries key or image bytes."""


class ObjectPurged(VaultError):
    """The object was purged: its data key no longer exists."""


class UnknownObject(VaultError):
    """No object is indexed under that reference."""


def probe_ref(probe_id: str, kind: ObjectKind = "probe") -> str:
    return f"vault:{kind}/{probe_id}"


def binding(probe_id: str, case_id: str, kind: ObjectKind) -> dict[str, str]:
    """What a ciphertext and its wrapped key are bound to (AAD and KMS context)."""
    return {"frs:probe_id": probe_id, "frs:case_id": case_id, "frs:kind": kind}


def _aad(context: Mapping[str, str]) -> bytes:
    return b"frs-vault-v1\x00" + b"\x00".join(
        f"{k}={context[k]}".encode() for k in sorted(context))


# --- key-encryption keys --------------------------------------------------------------


class KeyWrapper(Protocol):
    kek_id: str

    def new_data_key(self, context: Mapping[str, str], *,
                     expires_at: datetime) -> tuple[bytes, bytes]:
        """A fresh 256-bit data key for an object that expires at ``expires_at``:
        (plaintext, wrapped)."""
        ...

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes: ...


LiveKeys = Callable[[datetime | None], list[bytes]]


@runtime_checkable
class ExpiringKeys(Protocol):
    """A key wrapper whose key-encryption keys end (services/vault/epochs.py)."""

    def destroy_expired_epochs(self, now: datetime, live_keys: LiveKeys) -> list[str]: ...


class LocalKek:
    """Local mode: a 32-byte key-encryption key in a 0600 file, created on first use
    (unless ``create`` is false: the epoch wrapper only reads an older vault's key)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        if create and not path.exists():
            write_private(path, os.urandom(32), exclusive=True)
        try:
            key = read_private(path)
        except ExposedFileError as exc:
            raise VaultError(str(exc)) from None
        if len(key) != 32:
            raise VaultError(f"{path} does not hold a 32-byte key")
        self._aead = AESGCM(key)
        self.kek_id = "local:" + hashlib.sha256(b"kek-id" + key).hexdigest()[:16]

    def new_data_key(self, context: Mapping[str, str], *,
                     expires_at: datetime | None = None) -> tuple[bytes, bytes]:
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        return dek, nonce + self._aead.encrypt(nonce, dek, _aad(context))

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _aad(context))
        except (InvalidTag, ValueError):
            raise VaultError("data key does not unwrap under this key and binding") from None


class KmsKek:
    """AWS KMS: the data key comes from GenerateDataKey and is unwrapped by Decrypt, both
    under an encryption context binding probe, case and kind."""

    def __init__(self, client: Any, key_id: str) -> None:
        self._kms = client
        self.kek_id = f"kms:{key_id}"
        self._key_id = key_id

    def new_data_key(self, context: Mapping[str, str], *,
                     expires_at: datetime | None = None) -> tuple[bytes, bytes]:
        out = self._kms.generate_data_key(KeyId=self._key_id, KeySpec="AES_256",
                                          EncryptionContext=dict(context))
        return bytes(out["Plaintext"]), bytes(out["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        try:
            out = self._kms.decrypt(CiphertextBlob=wrapped, KeyId=self._key_id,
                                    EncryptionContext=dict(context))
        except Exception as exc:  # botocore's ClientError and friends
            raise VaultError(f"KMS refused to unwrap the data key ({type(exc).__name__})") \
                from None
        return bytes(out["Plaintext"])


# --- object stores --------------------------------------------------------------------


class ObjectStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes: ...

    def delete(self, name: str) -> None:
        """Idempotent: deleting a missing object is not an error."""
        ...


class FileObjectStore:
    """Ciphertexts as 0600 files under ``root``; writes are atomic and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, name: str) -> Path:
        path = (self.root / f"{name}.bin").resolve()
        if self.root.resolve() not in path.parents:
            raise VaultError("object name escapes the vault")
        return path

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise UnknownObject("no stored object under that name") from None

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        # A write a crash cut short left its temporary copy: that is the object too.
        for tmp in path.parent.glob(f"{glob.escape(path.stem)}.tmp*"):
            tmp.unlink(missing_ok=True)
        # Durable like the write: after a power cut the file must not be back while the
        # index says purged.
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class S3ObjectStore:
    """Ciphertexts as S3 objects (any S3-compatible server) under ``prefix``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._s3 = client
        self.bucket = bucket
        self.prefix = prefix

    def put(self, name: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data,
                            ContentType="application/octet-stream")

    def get(self, name: str) -> bytes:
        try:
            out = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except self._s3.exceptions.NoSuchKey:
            raise UnknownObject("no stored object under that name") from None
        return bytes(out["Body"].read())

    def delete(self, name: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def refuse_versioned_bucket(self) -> None:
        """A bucket that keeps versions turns a delete into a delete marker: the
        ciphertext would outlive its purge. Such a bucket is refused at start."""
        status = self._s3.get_bucket_versioning(Bucket=self.bucket).get("Status")
        if status in ("Enabled", "Suspended"):
            raise VaultError(f"bucket {self.bucket} keeps object versions (versioning "
                             f"{status}): a purge could not destroy them; use a bucket "
                             "whose versioning was never enabled")


# --- the index ------------------------------------------------------------------------

State = Literal["stored", "purging", "purged", "announced"]


@dataclass(frozen=True)
class VaultEntry:
    ref: str
    probe_id: str
    case_id: str
    kind: ObjectKind
    object_name: str
    created_at: datetime
    expires_at: datetime
    state: State
    purge_reason: str | None
    purged_at: datetime | None


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def open_db(path: Path) -> sqlite3.Connection:
    """The intake's local state: vault index and request outcomes, one 0600 SQLite file."""
    conn = connect(path, isolation_level=None)
    conn.execute("PRAGMA secure_delete=ON")
    return conn


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vault_objects (
  ref TEXT PRIMARY KEY,
  probe_id TEXT NOT NULL,
  case_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  object_name TEXT NOT NULL,
  kek_id TEXT NOT NULL,
  wrapped_key BLOB,
  created_at REAL NOT NULL,
  expires_at REAL NOT NULL,
  state TEXT NOT NULL,
  purge_reason TEXT,
  purged_at REAL
);
CREATE INDEX IF NOT EXISTS vault_due ON vault_objects(state, expires_at);
CREATE INDEX IF NOT EXISTS vault_case ON vault_objects(case_id, state);
"""

_COLUMNS = ("ref, probe_id, case_id, kind, object_name, created_at, expires_at, state, "
            "purge_reason, purged_at")


class VaultIndex(Protocol):
    """The port: where each object is, its wrapped data key, its expiry and its purge
    state. Every transition is one conditional write, so of two instances (or a purger
    and a redelivered put) acting on one object at once exactly one changes it: a purge
    begins once, a key is destroyed once, a purge is announced once, and nothing brings a
    purged object back."""

    def upsert(self, entry: VaultEntry, kek_id: str, wrapped_key: bytes) -> None: ...
    def get(self, ref: str) -> VaultEntry | None: ...
    def wrapped_key(self, ref: str) -> tuple[str, bytes | None]: ...
    def expire_case(self, case_id: str, now: datetime) -> int: ...
    def live_case_ids(self) -> list[str]: ...
    def due(self, now: datetime, limit: int = 1000) -> list[VaultEntry]: ...
    def count_past_expiry(self, now: datetime) -> int: ...
    def count_stored(self) -> int: ...

    def mark_purging(self, ref: str, reason: str) -> bool:
        """True when this call began the purge (the object was stored)."""
        ...

    def shred(self, ref: str, now: datetime, *, checkpoint: bool = True) -> bool:
        """True when this call destroyed the wrapped key."""
        ...

    def live_wrapped_keys(self, expiring_before: datetime | None = None) -> list[bytes]: ...

    def checkpoint(self) -> bool:
        """True when no copy of a destroyed key is left in the index's own log."""
        ...

    def announcing(self, ref: str) -> AbstractContextManager[bool]:
        """Claim the announcement of a purged object: True for the one caller that is to
        publish its ImagePurged inside the block. The object is marked announced when the
        block ends; a block that raises leaves it to a later sweep."""
        ...

    def mark_announced(self, ref: str) -> bool: ...
    def close(self) -> None: ...


class SqliteVaultIndex:
    """The index in the intake's SQLite file (one host; dispatch reads the same file)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> VaultEntry:
        created, expires, purged = _dt(row[5]), _dt(row[6]), _dt(row[9])
        assert created is not None and expires is not None
        return VaultEntry(row[0], row[1], row[2], row[3], row[4], created, expires,
                          row[7], row[8], purged)

    def upsert(self, entry: VaultEntry, kek_id: str, wrapped_key: bytes) -> None:
        """Index a new object, or re-key one still stored (a redelivered request). One
        whose purge has begun is never brought back: ObjectPurged."""
        with self._tx() as c:
            written = c.execute(
                "INSERT INTO vault_objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(ref) DO UPDATE SET kek_id=excluded.kek_id, "
                "wrapped_key=excluded.wrapped_key, created_at=excluded.created_at, "
                "expires_at=excluded.expires_at WHERE vault_objects.state='stored'",
                (entry.ref, entry.probe_id, entry.case_id, entry.kind, entry.object_name,
                 kek_id, wrapped_key, _ts(entry.created_at), _ts(entry.expires_at),
                 entry.state, None, None),
            ).rowcount
        if written == 0:
            raise ObjectPurged("the object was purged; it is not stored again")

    def get(self, ref: str) -> VaultEntry | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM vault_objects WHERE ref=?",
                                (ref,)).fetchone()
        return None if row is None else self._entry(row)

    def wrapped_key(self, ref: str) -> tuple[str, bytes | None]:
        row = self.conn.execute("SELECT kek_id, wrapped_key FROM vault_objects WHERE ref=?",
                                (ref,)).fetchone()
        if row is None:
            raise UnknownObject("no object is indexed under that reference")
        return str(row[0]), None if row[1] is None else bytes(row[1])

    def expire_case(self, case_id: str, now: datetime) -> int:
        """The case closed: every live object of it expires now."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE vault_objects SET expires_at=?, purge_reason='case_closed' "
                "WHERE case_id=? AND state='stored' AND expires_at>?",
                (_ts(now), case_id, _ts(now)))
        return cur.rowcount

    def live_case_ids(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT case_id FROM vault_objects WHERE state='stored'").fetchall()
        return [r[0] for r in rows]

    def due(self, now: datetime, limit: int = 1000) -> list[VaultEntry]:
        """Objects past expiry not yet purged, plus purges a crash left unfinished."""
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM vault_objects WHERE "
            "(state='stored' AND expires_at<=?) OR state IN ('purging','purged') "
            "ORDER BY expires_at LIMIT ?", (_ts(now), limit)).fetchall()
        return [self._entry(r) for r in rows]

    def count_past_expiry(self, now: datetime) -> int:
        row = self.conn.execute(
            "SELECT COUNT(*) FROM vault_objects WHERE state IN ('stored','purging') "
            "AND expires_at<=?", (_ts(now),)).fetchone()
        return int(row[0])

    def count_stored(self) -> int:
        row = self.conn.execute(
            "SELECT COUNT(*) FROM vault_objects WHERE state IN ('stored','purging')").fetchone()
        return int(row[0])

    def mark_purging(self, ref: str, reason: str) -> bool:
        with self._tx() as c:
            cur = c.execute("UPDATE vault_objects SET state='purging', "
                            "purge_reason=COALESCE(purge_reason, ?) "
                            "WHERE ref=? AND state='stored'", (reason, ref))
        return cur.rowcount == 1

    def shred(self, ref: str, now: datetime, *, checkpoint: bool = True) -> bool:
        """Destroy the wrapped data key; with secure_delete the old bytes are zeroed."""
        with self._tx() as c:
            cur = c.execute("UPDATE vault_objects SET wrapped_key=NULL, state='purged', "
                            "purged_at=? WHERE ref=? AND state IN ('stored','purging')",
                            (_ts(now), ref))
        # Old page images of the row live on in the WAL until a checkpoint truncates it
        # (a sweep of many objects runs one checkpoint at its end instead).
        if checkpoint:
            self.checkpoint()
        return cur.rowcount == 1

    def live_wrapped_keys(self, expiring_before: datetime | None = None) -> list[bytes]:
        """Every wrapped key not yet destroyed (of objects expiring before
        ``expiring_before``). An object's expiry only ever moves earlier once its key is
        wrapped (a closed case; a re-put wraps a new key), so the keys wrapped for an
        expiry before t are all among those returned for t."""
        sql = "SELECT wrapped_key FROM vault_objects WHERE wrapped_key IS NOT NULL"
        args: tuple[float, ...] = ()
        if expiring_before is not None:
            sql, args = sql + " AND expires_at<?", (_ts(expiring_before),)
        return [bytes(r[0]) for r in self.conn.execute(sql, args).fetchall()]

    def checkpoint(self) -> bool:
        """Fold the WAL into the database and truncate it. False when a reader (dispatch
        shares this file) kept it from completing: destroyed keys may still be in the
        WAL, so the purger does not announce until a checkpoint succeeds."""
        busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return int(busy) == 0

    @contextmanager
    def announcing(self, ref: str) -> Iterator[bool]:
        # One host, one purger: no other caller to hold off (and no transaction may stay
        # open on this connection across the publish: the intake's handlers share it).
        entry = self.get(ref)
        ours = entry is not None and entry.state == "purged"
        yield ours
        if ours:
            self.mark_announced(ref)

    def mark_announced(self, ref: str) -> bool:
        with self._tx() as c:
            cur = c.execute("UPDATE vault_objects SET state='announced' WHERE ref=? "
                            "AND state='purged'", (ref,))
        return cur.rowcount == 1

    def close(self) -> None:
        self.conn.close()


# --- the vault ------------------------------------------------------------------------


class Vault:
    def __init__(self, index: VaultIndex, store: ObjectStore, keys: KeyWrapper) -> None:
        self.index = index
        self.store = store
        self.keys = keys

    def put(self, *, probe_id: str, case_id: str, data: bytes, created_at: datetime,
            expires_at: datetime, kind: ObjectKind = "probe") -> str:
        """Seal and store one object; the same probe id always maps to the same ref, so a
        redelivered request replaces its object rather than adding a second one."""
        ref = probe_ref(probe_id, kind)
        context = binding(probe_id, case_id, kind)
        dek, wrapped = self.keys.new_data_key(context, expires_at=expires_at)
        nonce = os.urandom(_NONCE)
        blob = _MAGIC + nonce + AESGCM(dek).encrypt(nonce, data, _aad(context))
        entry = VaultEntry(ref, probe_id, case_id, kind, f"{kind}/{probe_id}", created_at,
                           expires_at, "stored", None, None)
        # Index first: if the object write then fails or the process dies, the expiry is
        # already durable and the purger cleans up whatever was written.
        self.index.upsert(entry, self.keys.kek_id, wrapped)
        self.store.put(entry.object_name, blob)
        return ref

    def get(self, ref: str) -> bytes:
        entry = self._entry(ref)
        return self.open_blob(ref, self.store.get(entry.object_name))

    def read_ciphertext(self, ref: str) -> bytes:
        return self.store.get(self._entry(ref).object_name)

    def open_blob(self, ref: str, blob: bytes) -> bytes:
        """Decrypt a ciphertext of ``ref`` with the key the index holds for it now."""
        entry = self._entry(ref)
        _kek, wrapped = self.index.wrapped_key(ref)
        if wrapped is None:
            raise ObjectPurged("the object's data key was destroyed")
        context = binding(entry.probe_id, entry.case_id, entry.kind)
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
            raise VaultError("not a vault ciphertext")
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
        dek = self.keys.unwrap(wrapped, context)
        try:
            return AESGCM(dek).decrypt(nonce, blob[len(_MAGIC) + _NONCE :], _aad(context))
        except InvalidTag:
            raise VaultError("ciphertext does not open under its key and binding") from None

    def _entry(self, ref: str) -> VaultEntry:
        entry = self.index.get(ref)
        if entry is None:
            raise UnknownObject("no object is indexed under that reference")
        return entry

    def purge(self, ref: str, reason: str, now: datetime, *,
              checkpoint: bool = True) -> VaultEntry:
        """Delete the ciphertext, then destroy its wrapped key. Safe to repeat. Without
        ``checkpoint`` the caller runs ``index.checkpoint()`` before announcing."""
        entry = self._entry(ref)
        if entry.state == "stored":
            self.index.mark_purging(ref, reason)
        if entry.state in ("stored", "purging"):
            self.store.delete(entry.object_name)
            self.index.shred(ref, now, checkpoint=checkpoint)
        return self._entry(ref)

    def destroy_expired_epochs(self, now: datetime) -> list[str]:
        """Destroy the key-encryption keys whose epoch is over and holds no stored object
        (epoch keys only; a single local key or KMS has none): every copy of a wrapped key
        of theirs, in a dump, a backup or a WAL, is noise from then on. The epochs
        destroyed, by name."""
        if not isinstance(self.keys, ExpiringKeys):
            return []
        return self.keys.destroy_expired_epochs(now, self.index.live_wrapped_keys)
