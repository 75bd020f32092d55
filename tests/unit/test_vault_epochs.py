"""EpochKek: wrap/unwrap, the epoch of an expiry at its boundaries, destruction of epochs
that are over and hold nothing, refusal of exposed key files, older single-KEK vaults,
and the settings that choose it (tmp files)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.vault import (
    EpochKek,
    FileObjectStore,
    LocalKek,
    SqliteVaultIndex,
    Vault,
    VaultError,
    VaultSettings,
    binding,
    open_db,
)
from services.vault import key_wrapper as settings_key_wrapper
from services.vault.epochs import Epoch, wrapped_epoch

DAY1 = datetime(2026, 1, 1, tzinfo=UTC)  # a UTC midnight: an epoch start at 24 h
DAY2 = DAY1 + timedelta(days=1)
CTX = binding("prb-1", "CASE-1", "probe")
IMAGE = b"\xff\xd8\xff" + os.urandom(512) + b"\xff\xd9"


def kek(tmp: Path, **kw: object) -> EpochKek:
    return EpochKek(tmp / "epochs", **kw)  # type: ignore[arg-type]


def vault_over(tmp: Path, keys: EpochKek | LocalKek) -> Vault:
    return Vault(SqliteVaultIndex(open_db(tmp / "intake.db")), FileObjectStore(tmp / "objects"),
                 keys)


def test_wrap_unwrap_and_binding(tmp_path: Path) -> None:
    keys = kek(tmp_path)
    dek, wrapped = keys.new_data_key(CTX, expires_at=DAY1 + timedelta(hours=5))
    assert len(dek) == 32 and dek not in wrapped
    assert keys.unwrap(wrapped, CTX) == dek
    assert wrapped_epoch(wrapped) == Epoch(int(DAY1.timestamp()), 86400)
    with pytest.raises(VaultError):  # bound to probe, case and kind
        keys.unwrap(wrapped, binding("prb-1", "CASE-2", "probe"))
    # The epoch named in the header is bound too: relabelled, it does not unwrap.
    other = kek(tmp_path).new_data_key(CTX, expires_at=DAY2)[1]
    forged = other[:17] + wrapped[17:]
    with pytest.raises(VaultError):
        keys.unwrap(forged, CTX)
    # Key files: 0600 in a 0700 directory, one per epoch, 32 bytes.
    assert stat.S_IMODE((tmp_path / "epochs").stat().st_mode) == 0o700
    files = sorted((tmp_path / "epochs").iterdir())
    assert [f.name for f in files] == [f"epoch-{int(DAY1.timestamp())}-86400.kek",
                                       f"epoch-{int(DAY2.timestamp())}-86400.kek"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and len(f.read_bytes()) == 32


def test_each_wrap_under_the_epoch_holding_the_expiry(tmp_path: Path) -> None:
    keys = kek(tmp_path, epoch_hours=24)
    tick = timedelta(microseconds=1)
    cases = {DAY1: DAY1, DAY2 - tick: DAY1, DAY2: DAY2, DAY2 + tick: DAY2,
             DAY1 - tick: DAY1 - timedelta(days=1)}
    for expiry, start in cases.items():
        epoch = wrapped_epoch(keys.new_data_key(CTX, expires_at=expiry)[1])
        assert epoch is not None and epoch.start == int(start.timestamp()), expiry
        # The key lives at least as long as the object: the epoch ends after its expiry.
        assert epoch.end > expiry
    six = kek(tmp_path, epoch_hours=6)
    epoch = wrapped_epoch(six.new_data_key(CTX, expires_at=DAY1 + timedelta(hours=13))[1])
    assert epoch == Epoch(int((DAY1 + timedelta(hours=12)).timestamp()), 6 * 3600)


def test_a_changed_epoch_length_keeps_older_keys(tmp_path: Path) -> None:
    _dek, wrapped = kek(tmp_path, epoch_hours=24).new_data_key(CTX, expires_at=DAY1)
    six = kek(tmp_path, epoch_hours=6)
    assert six.unwrap(wrapped, CTX) == _dek
    assert six.destroy_expired_epochs(DAY2 + timedelta(hours=1), lambda _t: []) == \
        [f"epoch-{int(DAY1.timestamp())}-86400"]


def test_destroys_only_epochs_over_with_nothing_stored(tmp_path: Path) -> None:
    keys = kek(tmp_path, grace=timedelta(hours=1))
    vault = vault_over(tmp_path, keys)
    a = vault.put(probe_id="a", case_id="C", data=IMAGE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=20))
    b = vault.put(probe_id="b", case_id="C", data=IMAGE, created_at=DAY1,
                  expires_at=DAY2 + timedelta(hours=3))
    day1 = f"epoch-{int(DAY1.timestamp())}-86400"
    copy_a = vault.index.wrapped_key(a)[1]
    assert copy_a is not None
    # Within the epoch, and within its grace: kept, though nothing is stored.
    vault.purge(a, "expired", DAY1 + timedelta(hours=21))
    assert vault.destroy_expired_epochs(DAY1 + timedelta(hours=23)) == []
    assert vault.destroy_expired_epochs(DAY2 + timedelta(minutes=59)) == []
    # Past the grace: the first epoch goes, the second (b still stored) stays.
    assert vault.destroy_expired_epochs(DAY2 + timedelta(hours=1)) == [day1]
    assert not (tmp_path / "epochs" / f"{day1}.kek").exists()
    with pytest.raises(VaultError, match="destroyed"):  # a copy of a's key: noise
        keys.unwrap(copy_a, binding("a", "C", "probe"))
    assert vault.get(b) == IMAGE
    # Over but b still stored (its purge is behind): kept, then gone once b is purged.
    late = DAY2 + timedelta(days=1, hours=2)
    assert vault.destroy_expired_epochs(late) == []
    assert vault.get(b) == IMAGE
    vault.purge(b, "expired", late)
    assert vault.destroy_expired_epochs(late) == [f"epoch-{int(DAY2.timestamp())}-86400"]
    assert list((tmp_path / "epochs").iterdir()) == []


def test_a_closed_case_moves_expiry_earlier_and_its_epoch_still_waits(tmp_path: Path) -> None:
    """The key of an object whose case closed stays in its original epoch; the epoch is
    kept while the object is stored, however early its expiry now is."""
    vault = vault_over(tmp_path, kek(tmp_path, grace=timedelta(0)))
    ref = vault.put(probe_id="a", case_id="C", data=IMAGE, created_at=DAY1,
                    expires_at=DAY2 + timedelta(hours=5))
    vault.index.expire_case("C", DAY1 + timedelta(hours=1))
    assert vault.destroy_expired_epochs(DAY2 + timedelta(days=2)) == []
    assert vault.get(ref) == IMAGE
    vault.purge(ref, "case_closed", DAY1 + timedelta(hours=2))
    assert len(vault.destroy_expired_epochs(DAY2 + timedelta(days=2))) == 1


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    keys = kek(tmp_path)
    _dek, wrapped = keys.new_data_key(CTX, expires_at=DAY1)
    (key_file,) = (tmp_path / "epochs").iterdir()
    os.chmod(key_file, 0o644)
    with pytest.raises(VaultError, match="open to other users"):
        keys.unwrap(wrapped, CTX)
    with pytest.raises(VaultError, match="open to other users"):
        keys.new_data_key(CTX, expires_at=DAY1)
    os.chmod(key_file, 0o600)
    assert keys.unwrap(wrapped, CTX) == _dek


def test_destruction_overwrites_and_leaves_no_copy(tmp_path: Path) -> None:
    keys = kek(tmp_path, grace=timedelta(0))
    keys.new_data_key(CTX, expires_at=DAY1)
    (key_file,) = (tmp_path / "epochs").iterdir()
    key = key_file.read_bytes()
    # A copy a crash left beside the key (written, linked, not yet unlinked).
    leftover = tmp_path / "epochs" / f".{key_file.stem}.123.abcd.tmp"
    leftover.write_bytes(key)
    os.chmod(leftover, 0o600)
    held = os.open(key_file, os.O_RDONLY)  # the inode, as a reader holding it open
    try:
        assert keys.destroy_expired_epochs(DAY2, lambda _t: []) == [key_file.stem]
        assert os.pread(held, 64, 0) == b"\0" * 32  # overwritten before the unlink
    finally:
        os.close(held)
    assert list((tmp_path / "epochs").iterdir()) == []


def test_reads_a_single_kek_vault_and_destroys_that_kek_when_done(tmp_path: Path) -> None:
    legacy = tmp_path / "keys" / "vault.kek"
    old = vault_over(tmp_path, LocalKek(legacy))
    a = old.put(probe_id="a", case_id="C", data=IMAGE, created_at=DAY1,
                expires_at=DAY1 + timedelta(hours=5))
    copy_a = old.index.wrapped_key(a)[1]
    assert copy_a is not None
    keys = kek(tmp_path, legacy=legacy, grace=timedelta(0))
    vault = vault_over(tmp_path, keys)
    assert vault.get(a) == IMAGE  # an older object, read with the single KEK
    b = vault.put(probe_id="b", case_id="C", data=IMAGE, created_at=DAY1,
                  expires_at=DAY2 + timedelta(hours=5))
    assert wrapped_epoch(vault.index.wrapped_key(b)[1] or b"") is not None
    assert vault.destroy_expired_epochs(DAY1 + timedelta(hours=1)) == []  # a is stored
    assert legacy.exists()
    vault.purge(a, "expired", DAY1 + timedelta(hours=6))
    assert vault.destroy_expired_epochs(DAY1 + timedelta(hours=6)) == ["vault.kek"]
    assert not legacy.exists()
    with pytest.raises(VaultError, match="destroyed"):
        keys.unwrap(copy_a, binding("a", "C", "probe"))
    assert not legacy.exists()  # a read does not bring it back
    assert vault.get(b) == IMAGE


def test_settings_choose_epochs_in_local_mode(tmp_path: Path) -> None:
    s = VaultSettings(state_dir=tmp_path)
    assert s.kek_backend == "epoch" and s.kek_epoch_hours == 24
    keys = settings_key_wrapper(s)
    assert isinstance(keys, EpochKek)
    assert keys.directory == tmp_path / "keys" / "vault-epochs"
    assert keys.legacy == tmp_path / "keys" / "vault.kek" and keys.length == 86400
    assert isinstance(settings_key_wrapper(VaultSettings(state_dir=tmp_path,
                                                         kek_backend="local")), LocalKek)
    with pytest.raises(ValidationError, match="KEK_BACKEND=kms"):
        VaultSettings(state_dir=tmp_path, local_mode=False)


def test_other_key_wrappers_have_no_epochs(tmp_path: Path) -> None:
    vault = vault_over(tmp_path, LocalKek(tmp_path / "kek"))
    vault.put(probe_id="a", case_id="C", data=IMAGE, created_at=DAY1, expires_at=DAY1)
    assert vault.destroy_expired_epochs(DAY2 + timedelta(days=30)) == []
    assert (tmp_path / "kek").exists()
