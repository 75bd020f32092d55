"""Crypto-shredding against copies (issue 17, item 5; docs/security.md "Crypto-shredding").

An attacker copies everything before the purge: the vault index file and its WAL, a
`sqlite3 .dump` of it, the ciphertext store. The purger then purges and destroys the key
epoch. With every byte of those copies and every byte still on disk, nothing decrypts
the image: no 32-byte string anywhere unwraps a dumped data key or opens a ciphertext
copy. Before the epoch goes, the same copies do decrypt (the attack is real), and with the
single local KEK they do forever."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.events import CaseRecord
from schemas.types import Purpose
from services.intake.purge import Purger
from services.vault import VaultSettings, binding, open_vault
from services.vault.core import _aad
from tests.unit.fakes import EventSink, FakeClock

DAY1 = datetime(2026, 1, 1, tzinfo=UTC)
IMAGE = b"\xff\xd8\xff" + bytes(range(256)) * 2 + b"clear-image-marker\xff\xd9"
ALIVE = b"\xff\xd8\xff" + b"still-stored" * 20 + b"\xff\xd9"


def read_index(path: Path) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT ref, wrapped_key FROM vault_objects "
                          "WHERE wrapped_key IS NOT NULL").fetchall()
    return {ref: bytes(key) for ref, key in rows}


def dump(index: Path) -> str:
    """`sqlite3 .dump`: the text a backup job would keep."""
    if shutil.which("sqlite3"):
        return subprocess.run(["sqlite3", "-readonly", str(index), ".dump"], check=True,
                              capture_output=True, text=True).stdout
    with sqlite3.connect(index) as db:  # the same statements, from Python's iterdump
        return "\n".join(db.iterdump())


def keys_in_dump(text: str) -> dict[str, bytes]:
    db = sqlite3.connect(":memory:")
    db.executescript(text)
    rows = db.execute("SELECT ref, wrapped_key FROM vault_objects "
                      "WHERE wrapped_key IS NOT NULL").fetchall()
    return {ref: bytes(key) for ref, key in rows}


def haul(*roots: Path) -> bytes:
    """Every byte of every file under ``roots``, with the hex blobs of dump text decoded."""
    out = bytearray()
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                out += data
                for blob in re.findall(rb"X'([0-9A-Fa-f]+)'", data):
                    out += bytes.fromhex(blob.decode())
    return bytes(out)


def candidates(data: bytes) -> set[bytes]:
    """Every 32-byte window: any key left anywhere, at any offset."""
    return {data[i : i + 32] for i in range(len(data) - 31)}


def opens(key: bytes, sealed: bytes, aad: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError):
        return None


def unwrap_with(keys: Iterable[bytes], wrapped: bytes, ctx: dict[str, str]) -> bytes | None:
    head = wrapped[:17] if wrapped.startswith(b"FRSE1") else b""
    for key in keys:
        dek = opens(key, wrapped[len(head):], _aad(ctx) + head)
        if dek is not None:
            return dek
    return None


def decrypt_copy(keys: Iterable[bytes], blob: bytes, ctx: dict[str, str]) -> bytes | None:
    assert blob.startswith(b"FRSV1")
    for key in keys:
        clear = opens(key, blob[5:], _aad(ctx))
        if clear is not None:
            return clear
    return None


def case(case_id: str, status: str) -> CaseRecord:
    return CaseRecord(case_id=case_id, status=status,
                      offense_category=Purpose.FINANCIAL_FRAUD, updated_at=DAY1)


async def test_a_dump_taken_before_the_purge_cannot_decrypt_after_the_epoch(
        tmp_path: Path) -> None:
    state, copies = tmp_path / "state", tmp_path / "attacker"
    settings = VaultSettings(state_dir=state, kek_backend="epoch", kek_epoch_hours=24,
                             kek_epoch_grace_hours=1)
    vault = open_vault(settings)
    # a: its case closes early; b: expires late on day 1; c: expires on day 2.
    a = vault.put(probe_id="a", case_id="CASE-A", data=IMAGE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=10))
    b = vault.put(probe_id="b", case_id="CASE-B", data=IMAGE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=20))
    c = vault.put(probe_id="c", case_id="CASE-C", data=ALIVE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=30))
    ctx = {a: binding("a", "CASE-A", "probe"), b: binding("b", "CASE-B", "probe")}

    # The copies, before any purge: index file and its WAL, a dump, the object store.
    index = settings.index_path
    assert Path(f"{index}-wal").stat().st_size > 0  # the keys are in the WAL right now
    (copies / "index").mkdir(parents=True)
    for suffix in ("", "-wal"):
        shutil.copy2(f"{index}{suffix}", copies / "index" / f"intake.db{suffix}")
    (copies / "vault.sql").write_text(dump(index))
    shutil.copytree(settings.root / "objects", copies / "objects")
    from_copy = read_index(copies / "index" / "intake.db")
    from_dump = keys_in_dump((copies / "vault.sql").read_text())
    assert from_copy.keys() == from_dump.keys() == {a, b, c}
    blobs = {ref: (copies / "objects" / f"probe/{ref.split('/')[-1]}.bin").read_bytes()
             for ref in (a, b)}

    # 1. Case A closes: a is purged at the next sweep, hours before its expiry.
    clock, sink = FakeClock(DAY1 + timedelta(hours=2)), EventSink()
    purger = Purger(vault, lambda: {"CASE-A": case("CASE-A", "closed")}, sink, clock)
    assert [e.probe_id for e in await purger.sweep()] == ["a"]
    assert a not in read_index(index)  # the live index: its key is gone, WAL too
    # ...but the pre-purge dump and the epoch key still open a's ciphertext copy: the
    # hole that epochs close. (So the final checks below are not vacuous.)
    live_keys = candidates(haul(state))
    dek = unwrap_with(live_keys, from_dump[a], ctx[a])
    assert dek is not None and decrypt_copy([dek], blobs[a], ctx[a]) == IMAGE

    # 2. b expires and is purged; its epoch (day 1) is over only after day 1 + grace.
    clock.now = DAY1 + timedelta(hours=21)
    assert [e.probe_id for e in await purger.sweep()] == ["b"]
    clock.now = DAY1 + timedelta(hours=24, minutes=59)
    await purger.sweep()
    assert len(list(settings.kek_epochs_dir.iterdir())) == 2  # grace: still there

    # 3. The sweep after day 1 + grace destroys the day-1 epoch key; c's epoch stays.
    clock.now = DAY1 + timedelta(hours=25)
    await purger.sweep()
    assert [p.name for p in settings.kek_epochs_dir.iterdir()] == \
        [f"epoch-{int((DAY1 + timedelta(days=1)).timestamp())}-86400.kek"]
    assert vault.get(c) == ALIVE

    # Now: every byte of the attacker's copies and of the host's state, as key material.
    keys = candidates(haul(copies, state))
    for ref in (a, b):
        for wrapped in (from_copy[ref], from_dump[ref]):
            assert unwrap_with(keys, wrapped, ctx[ref]) is None, ref
        assert decrypt_copy(keys, blobs[ref], ctx[ref]) is None, ref
    # And the vault itself, reopened over the attacker's copy of the index, refuses.
    stolen = open_vault(VaultSettings(state_dir=state, dir=copies / "index",
                                      kek_backend="epoch"))
    for ref in (a, b):
        try:
            stolen.open_blob(ref, blobs[ref])
        except Exception as exc:
            assert "destroyed" in str(exc), exc
        else:
            raise AssertionError(f"{ref} decrypted from a pre-purge copy")
    assert b"clear-image-marker" not in haul(copies, state)


async def test_with_the_single_local_kek_a_dump_decrypts_forever(tmp_path: Path) -> None:
    """Why epochs: the same copies, purged, under the single local key-encryption key."""
    state, copies = tmp_path / "state", tmp_path / "attacker"
    settings = VaultSettings(state_dir=state, kek_backend="local")
    vault = open_vault(settings)
    ref = vault.put(probe_id="a", case_id="CASE-A", data=IMAGE, created_at=DAY1,
                    expires_at=DAY1 + timedelta(hours=1))
    copies.mkdir()
    (copies / "vault.sql").write_text(dump(settings.index_path))
    blob = vault.read_ciphertext(ref)
    purger = Purger(vault, dict, EventSink(), FakeClock(DAY1 + timedelta(days=365)))
    assert len(await purger.sweep()) == 1
    ctx = binding("a", "CASE-A", "probe")
    dek = unwrap_with([settings.kek_path.read_bytes()],
                      keys_in_dump((copies / "vault.sql").read_text())[ref], ctx)
    assert dek is not None and decrypt_copy([dek], blob, ctx) == IMAGE
