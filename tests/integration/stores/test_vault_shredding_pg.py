"""Crypto-shredding with the vault index on PostgreSQL (issue 17, item 5; docs/security.md
"Crypto-shredding"): a `pg_dump` taken before the purge, plus a copy of the ciphertext,
opens the image while the epoch key exists, and nothing does once the purger destroyed
it: no 32-byte string in the dump, the copies or the host's state unwraps the dumped key
or opens the ciphertext copy, and the vault refuses it. The database's own leftovers (WAL,
dead tuples, base backups) hold the same wrapped key as the dump, so the same holds."""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from services.intake.purge import Purger
from services.vault import PgVaultIndex, VaultError, VaultSettings, binding, open_vault
from tests.integration.stores.test_vault_index_contract import empty_vault, pg_index
from tests.pg import PgServer
from tests.unit.fakes import EventSink, FakeClock
from tests.unit.test_vault_shredding import (
    ALIVE,
    DAY1,
    IMAGE,
    candidates,
    decrypt_copy,
    haul,
    unwrap_with,
)


def pg_dump(server: PgServer) -> str:
    """The dump a backup job would keep: the whole database, as the owner, plain SQL."""
    binary = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))[-1]  # the server's
    return subprocess.run(
        [binary, "--no-password", f"--dbname={server.url('owner')}"], check=True,
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PGPASSWORD": server.password("owner")}).stdout


def keys_in_dump(text: str) -> dict[str, bytes]:
    """ref -> wrapped_key of every row of vault_objects in the dump's COPY block."""
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("COPY public.vault_objects ("):
            columns = line.split("(", 1)[1].split(")", 1)[0].split(", ")
            break
    else:
        raise AssertionError("no vault_objects in the dump")
    found = {}
    for line in lines:
        if line == "\\.":
            break
        row = dict(zip(columns, line.split("\t"), strict=True))
        if row["wrapped_key"] != "\\N":
            found[row["ref"]] = bytes.fromhex(row["wrapped_key"].removeprefix("\\\\x"))
    return found


@pytest.fixture
def index(pg_migrated: PgServer) -> Iterator[PgVaultIndex]:
    empty_vault(pg_migrated)
    opened = pg_index(pg_migrated)
    yield opened
    opened.close()


async def test_a_pg_dump_taken_before_the_purge_cannot_decrypt_after_the_epoch(
        pg_migrated: PgServer, index: PgVaultIndex, tmp_path: Path) -> None:
    state, copies = tmp_path / "state", tmp_path / "attacker"
    settings = VaultSettings(state_dir=state, kek_backend="epoch", kek_epoch_hours=24,
                             kek_epoch_grace_hours=1)
    vault = open_vault(settings, index)
    # a expires on day 1 (its epoch); c on day 2 (the next epoch), still stored at the end.
    a = vault.put(probe_id="a", case_id="CASE-A", data=IMAGE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=10))
    c = vault.put(probe_id="c", case_id="CASE-C", data=ALIVE, created_at=DAY1,
                  expires_at=DAY1 + timedelta(hours=30))
    ctx = binding("a", "CASE-A", "probe")

    # The copies, before the purge: a pg_dump and the ciphertext.
    copies.mkdir()
    dumped = pg_dump(pg_migrated)
    (copies / "frs.sql").write_text(dumped)
    (copies / "a.bin").write_bytes(blob := vault.read_ciphertext(a))
    from_dump = keys_in_dump(dumped)
    assert from_dump.keys() == {a, c}
    assert from_dump[a] == index.wrapped_key(a)[1]

    # 1. a expires and is purged: the live row holds no key any more.
    clock, sink = FakeClock(DAY1 + timedelta(hours=11)), EventSink()
    purger = Purger(vault, dict, sink, clock)
    assert [e.probe_id for e in await purger.sweep()] == ["a"]
    assert index.wrapped_key(a) == ("epoch", None)
    # ...but while the epoch key exists, the dump's wrapped key and that key (on the host)
    # open the ciphertext copy: the hole epochs close (so the checks below are not vacuous).
    dek = unwrap_with(candidates(haul(state)), from_dump[a], ctx)
    assert dek is not None and decrypt_copy([dek], blob, ctx) == IMAGE
    assert vault.keys.unwrap(from_dump[a], ctx) == dek

    # 2. Time moves past the end of day 1 plus the grace: the sweep destroys its epoch key;
    # c's epoch (day 2) stays, and so does c.
    clock.now = DAY1 + timedelta(hours=25)
    await purger.sweep()
    assert [p.name for p in settings.kek_epochs_dir.iterdir()] == \
        [f"epoch-{int((DAY1 + timedelta(days=1)).timestamp())}-86400.kek"]
    assert vault.get(c) == ALIVE

    # Every byte of the dump, the copies and the host's state, as key material: nothing.
    keys = candidates(haul(copies, state) + from_dump[c])
    assert unwrap_with(keys, from_dump[a], ctx) is None
    assert decrypt_copy(keys, blob, ctx) is None
    with pytest.raises(VaultError, match="was destroyed"):
        vault.keys.unwrap(from_dump[a], ctx)
    assert b"clear-image-marker" not in haul(copies, state)
