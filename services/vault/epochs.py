"""Epoch key-encryption keys: crypto-shredding that holds against copies of the index
(REQ-TTL; the argument is in docs/security.md, "Crypto-shredding").

Purging an object destroys its wrapped data key in the index, but a dump, a backup or a
write-ahead log taken before the purge still holds it, and a single key-encryption key
that lives forever would unwrap it. Here time is cut into epochs (``FRS_VAULT_KEK_EPOCH_
HOURS``, aligned on the Unix epoch, so UTC days by default); each data key is wrapped
under the key of the epoch that holds its object's expiry, and the wrapped key names
that epoch. Epoch keys are 32-byte 0600 files in a 0700 directory of their own, never in
the index. Once an epoch has ended (plus a grace) and no object wrapped under it is still
stored, its key is overwritten, unlinked and the directory fsynced: every copy of every
data key it wrapped is noise from then on, wherever that copy is.

An older vault's objects, wrapped under the single ``LocalKek`` file, still unwrap with
it; that file is destroyed in the same way once none of them is stored."""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.kit.private_files import ExposedFileError, read_private, write_private
from services.vault.core import LiveKeys, LocalKek, VaultError, _aad, _fsync_dir

log = logging.getLogger("frs.vault.epochs")

_MAGIC = b"FRSE1"
_HEADER = struct.Struct(">qI")  # epoch start (Unix seconds), epoch length (seconds)
_NONCE = 12
_FILE = re.compile(r"epoch-(-?\d+)-(\d+)\.kek")


@dataclass(frozen=True, order=True)
class Epoch:
    """[start, start + length) in Unix seconds. It carries its own length, so a change
    of the epoch setting leaves the keys already made readable and destroyable."""

    start: int
    length: int

    @classmethod
    def containing(cls, when: datetime, length: int) -> Epoch:
        return cls(int(when.timestamp()) // length * length, length)

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(self.start + self.length, UTC)

    @property
    def name(self) -> str:
        return f"epoch-{self.start}-{self.length}"

    def header(self) -> bytes:
        return _HEADER.pack(self.start, self.length)


def wrapped_epoch(wrapped: bytes) -> Epoch | None:
    """The epoch a wrapped key names; None for a key wrapped by the single local KEK."""
    if not wrapped.startswith(_MAGIC) or len(wrapped) < len(_MAGIC) + _HEADER.size:
        return None
    start, length = _HEADER.unpack_from(wrapped, len(_MAGIC))
    return Epoch(start, length)


class EpochKek:
    """Local mode's key wrapper: one key-encryption key per expiry epoch, in
    ``directory``. ``legacy`` is the single KEK file of a vault made before epochs: read
    while objects wrapped under it are stored, then destroyed; never created here."""

    kek_id = "epoch"

    def __init__(self, directory: Path, *, epoch_hours: float = 24.0,
                 grace: timedelta = timedelta(hours=1), legacy: Path | None = None) -> None:
        self.directory = directory
        self.length = max(1, round(epoch_hours * 3600))
        self.grace = grace
        self.legacy = legacy
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    # --- wrapping -------------------------------------------------------------------

    def new_data_key(self, context: Mapping[str, str], *,
                     expires_at: datetime) -> tuple[bytes, bytes]:
        epoch = Epoch.containing(expires_at, self.length)
        kek = AESGCM(self._key(epoch, create=True))
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        head = _MAGIC + epoch.header()
        return dek, head + nonce + kek.encrypt(nonce, dek, _aad(context) + head)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        epoch = wrapped_epoch(wrapped)
        if epoch is None:
            return self._legacy().unwrap(wrapped, context)
        head = _MAGIC + epoch.header()
        body = wrapped[len(head):]
        try:
            return AESGCM(self._key(epoch, create=False)).decrypt(
                body[:_NONCE], body[_NONCE:], _aad(context) + head)
        except (InvalidTag, ValueError):
            raise VaultError("data key does not unwrap under this key and binding") from None

    def _path(self, epoch: Epoch) -> Path:
        return self.directory / f"{epoch.name}.kek"

    def _key(self, epoch: Epoch, *, create: bool) -> bytes:
        """The epoch's key, read from its file on every use: a key destroyed by one
        process (the intake's purger) is gone for every other (dispatch) at once."""
        path = self._path(epoch)
        if create and not path.exists():
            # Written aside and linked into place: a reader never sees a partial key, and
            # of two writers racing the first link wins.
            tmp = self.directory / f".{epoch.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            write_private(tmp, os.urandom(32), exclusive=True)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
                _fsync_dir(self.directory)
        try:
            key = read_private(path)
        except FileNotFoundError:
            raise VaultError(f"the key-encryption key of {epoch.name} was destroyed (its "
                             "objects are past their expiry)") from None
        except ExposedFileError as exc:
            raise VaultError(str(exc)) from None
        if len(key) != 32:
            raise VaultError(f"{path} does not hold a 32-byte key")
        return key

    def _legacy(self) -> LocalKek:
        if self.legacy is None or not self.legacy.exists():
            raise VaultError("data key wrapped under the single local key-encryption key, "
                             "which was destroyed (no object wrapped under it was stored)")
        return LocalKek(self.legacy, create=False)

    # --- destruction ----------------------------------------------------------------

    def epochs(self) -> list[Epoch]:
        """The epochs whose keys exist, oldest first."""
        found = (_FILE.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(Epoch(int(m[1]), int(m[2])) for m in found if m)

    def destroy_expired_epochs(self, now: datetime, live_keys: LiveKeys) -> list[str]:
        """Destroy every epoch key whose epoch ended more than the grace before ``now``
        and wraps no key in ``live_keys`` (the index's keys not yet destroyed); then the
        legacy key once it wraps none. The names destroyed; an epoch still holding a
        stored object is kept (and logged): its object's purge is behind."""
        cutoff = now - self.grace
        over = [e for e in self.epochs() if e.end <= cutoff]
        destroyed: list[str] = []
        if over:
            in_use = {wrapped_epoch(w) for w in live_keys(max(e.end for e in over))}
            for epoch in over:
                if epoch in in_use:
                    log.warning("epoch key kept: an object wrapped under it is still "
                                "stored past its expiry", extra={"epoch": epoch.name})
                    continue
                self._shred(self._path(epoch),
                            self.directory.glob(f".{epoch.name}.*.tmp"))
                destroyed.append(epoch.name)
        if self.legacy is not None and self.legacy.exists() \
                and all(wrapped_epoch(w) is not None for w in live_keys(None)):
            self._shred(self.legacy, [])
            destroyed.append(self.legacy.name)
        for name in destroyed:
            log.info("key-encryption key destroyed", extra={"epoch": name})
        return destroyed

    @staticmethod
    def _shred(path: Path, leftovers: Iterable[Path]) -> None:
        """Overwrite, unlink, fsync the directory: the key and any copy a crash left
        beside it. (On a copy-on-write or flash device the overwrite may land elsewhere:
        docs/security.md says what that leaves.)"""
        for victim in [path, *leftovers]:
            try:
                fd = os.open(victim, os.O_WRONLY)
            except FileNotFoundError:
                continue
            try:
                os.write(fd, b"\0" * max(32, os.fstat(fd).st_size))
                os.fsync(fd)
            finally:
                os.close(fd)
            victim.unlink(missing_ok=True)
        _fsync_dir(path.parent)
