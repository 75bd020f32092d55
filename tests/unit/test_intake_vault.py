"""Vault: envelope encryption, binding, local KEK file, index, crypto-shredding (tmp files)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.intake.outcomes import OutcomeLog
from services.vault import (
    FileObjectStore,
    LocalKek,
    ObjectPurged,
    S3ObjectStore,
    VaultError,
    binding,
    open_db,
)
from tests.unit.fakes import index_db, tmp_vault

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IMAGE = b"\xff\xd8\xff" + os.urandom(4096) + b"clear-image-marker" + b"\xff\xd9"


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_round_trip_and_nothing_in_clear(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    ref = vault.put(probe_id="prb-1", case_id="CASE-1", data=IMAGE, created_at=T0,
                    expires_at=T0 + timedelta(hours=72))
    assert ref == "vault:probe/prb-1"
    assert vault.get(ref) == IMAGE
    disk = all_bytes(tmp_path)
    assert b"clear-image-marker" not in disk and IMAGE[3:67] not in disk
    # Files and directories are private to the service user.
    for p in tmp_path.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_file() and p.name != "kek":
            assert mode & 0o077 == 0, p
    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600


def test_one_data_key_per_object(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    for pid in ("prb-1", "prb-2"):
        vault.put(probe_id=pid, case_id="C", data=IMAGE, created_at=T0, expires_at=T0)
    k1 = vault.index.wrapped_key("vault:probe/prb-1")[1]
    k2 = vault.index.wrapped_key("vault:probe/prb-2")[1]
    assert k1 and k2 and k1 != k2
    c1 = vault.read_ciphertext("vault:probe/prb-1")
    c2 = vault.read_ciphertext("vault:probe/prb-2")
    assert c1 != c2


def test_aad_binds_probe_and_case(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    vault.put(probe_id="prb-1", case_id="CASE-1", data=IMAGE, created_at=T0, expires_at=T0)
    vault.put(probe_id="prb-2", case_id="CASE-1", data=b"\xff\xd8other", created_at=T0,
              expires_at=T0)
    stolen = vault.read_ciphertext("vault:probe/prb-1")
    with pytest.raises(VaultError):  # one probe's ciphertext under another's key and id
        vault.open_blob("vault:probe/prb-2", stolen)
    # The wrapped key is bound too: unwrapping under another case fails.
    _kek, wrapped = vault.index.wrapped_key("vault:probe/prb-1")
    assert wrapped is not None
    with pytest.raises(VaultError):
        vault.keys.unwrap(wrapped, binding("prb-1", "CASE-OTHER", "probe"))


def test_redelivered_put_keeps_one_object(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    for _ in range(3):
        vault.put(probe_id="prb-1", case_id="C", data=IMAGE, created_at=T0, expires_at=T0)
    assert len(list((tmp_path / "objects").rglob("*.bin"))) == 1
    n = index_db(vault).execute("SELECT COUNT(*) FROM vault_objects").fetchone()[0]
    assert n == 1


def test_crypto_shredding(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    ref = vault.put(probe_id="prb-1", case_id="C", data=IMAGE, created_at=T0,
                    expires_at=T0 + timedelta(hours=1))
    copy = vault.read_ciphertext(ref)  # e.g. a backup taken before the purge
    _kek, wrapped = vault.index.wrapped_key(ref)
    assert wrapped is not None and vault.open_blob(ref, copy) == IMAGE
    entry = vault.purge(ref, "expired", T0 + timedelta(hours=2))
    assert entry.state == "purged" and entry.purge_reason == "expired"
    assert not list((tmp_path / "objects").rglob("*.bin"))
    with pytest.raises(ObjectPurged):
        vault.open_blob(ref, copy)
    # The wrapped key is gone from every file of the vault (db, WAL), not just unlinked.
    assert wrapped not in all_bytes(tmp_path)
    # A fresh process with the same files cannot decrypt the copy either.
    with pytest.raises(ObjectPurged):
        tmp_vault(tmp_path).open_blob(ref, copy)
    # Purging again is harmless.
    assert vault.purge(ref, "expired", T0 + timedelta(hours=3)).state == "purged"


def test_index_due_and_case_close(tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    vault.put(probe_id="a", case_id="C1", data=IMAGE, created_at=T0,
              expires_at=T0 + timedelta(hours=1))
    vault.put(probe_id="b", case_id="C2", data=IMAGE, created_at=T0,
              expires_at=T0 + timedelta(hours=72))
    idx = vault.index
    assert [e.probe_id for e in idx.due(T0 + timedelta(hours=2))] == ["a"]
    assert idx.count_past_expiry(T0 + timedelta(hours=2)) == 1
    assert idx.expire_case("C2", T0 + timedelta(hours=2)) == 1
    due = idx.due(T0 + timedelta(hours=2))
    assert {e.probe_id: e.purge_reason for e in due} == {"a": None, "b": "case_closed"}


def test_local_kek_refuses_open_permissions(tmp_path: Path) -> None:
    LocalKek(tmp_path / "kek")
    os.chmod(tmp_path / "kek", 0o644)
    with pytest.raises(VaultError):
        LocalKek(tmp_path / "kek")


async def test_outcome_log_first_wins(tmp_path: Path) -> None:
    from schemas.events import ProbeRejected, RejectReason

    log = OutcomeLog(open_db(tmp_path / "intake.db"))
    first = ProbeRejected(probe_id="prb-x", request_id="r1", reason=RejectReason.EMPTY_IMAGE,
                          detail="d", rejected_at=T0)
    await log.record("r1", first)
    await log.record("r1", first.model_copy(update={"reason": RejectReason.POLYGLOT}))
    assert await log.get("r1") == first
    assert await log.get("r2") is None


@pytest.mark.parametrize("status", ["Enabled", "Suspended", None])
def test_a_bucket_that_keeps_versions_is_refused(status: str | None) -> None:
    class Client:
        def get_bucket_versioning(self, *, Bucket: str) -> dict[str, str]:
            return {} if status is None else {"Status": status}
    store = S3ObjectStore(Client(), "vault")
    if status is None:
        store.refuse_versioned_bucket()  # never versioned: a delete destroys the object
    else:
        with pytest.raises(VaultError, match="keeps object versions"):
            store.refuse_versioned_bucket()


def test_delete_also_removes_a_copy_a_crashed_write_left(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "objects")
    store.put("probe/prb-1", b"ciphertext")
    # A write of the same object that died between its fsync and its rename.
    leftover = tmp_path / "objects" / "probe" / "prb-1.tmp4242"
    leftover.write_bytes(b"ciphertext, half written")
    other = tmp_path / "objects" / "probe" / "prb-10.tmp4242"
    other.write_bytes(b"another object's write")
    store.delete("probe/prb-1")
    assert not leftover.exists() and not (tmp_path / "objects" / "probe" / "prb-1.bin").exists()
    assert other.exists()  # prb-10 is not prb-1
