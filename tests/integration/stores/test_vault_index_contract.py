"""The VaultIndex port (services/vault/core.py), one contract for both implementations:
SqliteVaultIndex (the intake's file) and PgVaultIndex (PostgreSQL, the intake role); then
the wiring: on FRS_STATE_URL=postgresql://… the intake and dispatch open the shared index,
make no SQLite file under the state dir, and dispatch reads what intake wrote."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from services.dispatch.app import build_image_source
from services.dispatch.settings import DispatchSettings
from services.intake.app import open_vault as open_intake_vault
from services.intake.settings import IntakeSettings
from services.kit.state import parse_state_url
from services.vault import (
    FileObjectStore,
    LocalKek,
    ObjectPurged,
    PgVaultIndex,
    SqliteVaultIndex,
    UnknownObject,
    Vault,
    VaultEntry,
    VaultIndex,
    VaultSettings,
    open_db,
    open_index,
    probe_ref,
)
from tests.integration.stores.conftest import conninfo
from tests.pg import PgServer

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def empty_vault(server: PgServer) -> None:
    with psycopg.connect(**conninfo(server, "owner")) as conn:
        conn.execute("TRUNCATE vault_objects")


def pg_index(server: PgServer, role: str = "intake", max_size: int = 2) -> PgVaultIndex:
    return PgVaultIndex.connect(server.url(role), server.password(role), name=f"test-{role}",
                                max_size=max_size)


@pytest.fixture
def index(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VaultIndex]:
    opened: VaultIndex
    if backend == "sqlite":
        opened = SqliteVaultIndex(open_db(tmp_path / "intake.db"))
    else:
        server: PgServer = request.getfixturevalue("pg_migrated")
        empty_vault(server)
        opened = pg_index(server)
    yield opened
    opened.close()


def entry(probe_id: str, *, case_id: str = "CASE-1", expires: datetime = T0 + HOUR
          ) -> VaultEntry:
    return VaultEntry(probe_ref(probe_id), probe_id, case_id, "probe", f"probe/{probe_id}",
                      T0, expires, "stored", None, None)


def test_an_object_comes_back_as_indexed(index: VaultIndex) -> None:
    assert index.get("vault:probe/nope") is None
    with pytest.raises(UnknownObject):
        index.wrapped_key("vault:probe/nope")
    index.upsert(entry("a"), "epoch", b"\x00wrapped-a\xff")
    assert index.get(probe_ref("a")) == entry("a")
    assert index.wrapped_key(probe_ref("a")) == ("epoch", b"\x00wrapped-a\xff")
    assert index.count_stored() == 1


def test_a_stored_object_is_rekeyed_by_a_second_put(index: VaultIndex) -> None:
    index.upsert(entry("a"), "epoch", b"first")
    index.upsert(entry("a", expires=T0 + 2 * HOUR), "local:x", b"second")
    assert index.wrapped_key(probe_ref("a")) == ("local:x", b"second")
    found = index.get(probe_ref("a"))
    assert found is not None and found.expires_at == T0 + 2 * HOUR
    assert index.count_stored() == 1


def test_each_purge_transition_happens_once(index: VaultIndex) -> None:
    ref = probe_ref("a")
    index.upsert(entry("a"), "epoch", b"key")
    assert index.mark_purging(ref, "expired") is True
    assert index.mark_purging(ref, "case_closed") is False
    assert index.get(ref) == VaultEntry(ref, "a", "CASE-1", "probe", "probe/a", T0, T0 + HOUR,
                                        "purging", "expired", None)
    assert index.shred(ref, T0 + 2 * HOUR) is True
    assert index.shred(ref, T0 + 3 * HOUR) is False
    found = index.get(ref)
    assert found is not None and (found.state, found.purged_at) == ("purged", T0 + 2 * HOUR)
    assert index.wrapped_key(ref) == ("epoch", None)
    assert index.mark_announced(ref) is True
    assert index.mark_announced(ref) is False
    assert index.mark_purging(ref, "expired") is False
    found = index.get(ref)
    assert found is not None and found.state == "announced"


@pytest.mark.parametrize("step", ["purging", "purged", "announced"])
def test_a_put_never_revives_a_purged_object(index: VaultIndex, step: str) -> None:
    ref = probe_ref("a")
    index.upsert(entry("a"), "epoch", b"key")
    index.mark_purging(ref, "expired")
    if step != "purging":
        index.shred(ref, T0 + HOUR)
    if step == "announced":
        index.mark_announced(ref)
    with pytest.raises(ObjectPurged):
        index.upsert(entry("a", expires=T0 + 9 * HOUR), "epoch", b"new key")
    found = index.get(ref)
    assert found is not None and (found.state, found.expires_at) == (step, T0 + HOUR)
    assert index.wrapped_key(ref)[1] == (b"key" if step == "purging" else None)


def test_a_closed_case_expires_its_stored_objects_now(index: VaultIndex) -> None:
    index.upsert(entry("a", case_id="C1", expires=T0 + 5 * HOUR), "epoch", b"a")
    soon = T0 + timedelta(minutes=20)  # before the close: stays
    index.upsert(entry("b", case_id="C1", expires=soon), "epoch", b"b")
    index.upsert(entry("c", case_id="C2", expires=T0 + 5 * HOUR), "epoch", b"c")
    index.upsert(entry("d", case_id="C3", expires=T0 + 5 * HOUR), "epoch", b"d")
    index.mark_purging(probe_ref("d"), "expired")
    assert sorted(index.live_case_ids()) == ["C1", "C2"]
    closed_at = T0 + timedelta(minutes=30)
    assert index.expire_case("C1", closed_at) == 1
    a = index.get(probe_ref("a"))
    assert a is not None and (a.expires_at, a.purge_reason) == (closed_at, "case_closed")
    b = index.get(probe_ref("b"))
    assert b is not None and (b.expires_at, b.purge_reason) == (soon, None)
    assert index.count_past_expiry(T0 + 2 * HOUR) == 2  # a and b; d's expiry is later
    assert index.count_stored() == 4


def test_due_lists_what_is_past_expiry_and_unfinished_purges(index: VaultIndex) -> None:
    for n, hours in enumerate((4, 1, 2, 3, 9)):
        index.upsert(entry(f"p{n}", expires=T0 + hours * HOUR), "epoch", b"k")
    index.mark_purging(probe_ref("p3"), "expired")  # a purge a crash cut short
    index.shred(probe_ref("p0"), T0)  # shredded, never announced
    index.mark_purging(probe_ref("p4"), "expired")
    index.shred(probe_ref("p4"), T0)
    index.mark_announced(probe_ref("p4"))  # done: never due again
    due = index.due(T0 + 2 * HOUR)
    assert [e.probe_id for e in due] == ["p1", "p2", "p3", "p0"]
    assert [e.probe_id for e in index.due(T0 + 2 * HOUR, limit=2)] == ["p1", "p2"]
    assert index.count_past_expiry(T0 + 2 * HOUR) == 2
    assert index.count_stored() == 3


def test_one_announcement_per_purge(index: VaultIndex) -> None:
    ref = probe_ref("a")
    index.upsert(entry("a"), "epoch", b"key")
    with index.announcing(ref) as ours:
        assert ours is False  # stored: nothing to announce
    index.shred(ref, T0)
    with pytest.raises(ConnectionError), index.announcing(ref) as ours:
        assert ours is True
        raise ConnectionError("broker went away")
    found = index.get(ref)
    assert found is not None and found.state == "purged"  # announced by a later sweep
    with index.announcing(ref) as ours:
        assert ours is True
    with index.announcing(ref) as again:
        assert again is False
    found = index.get(ref)
    assert found is not None and found.state == "announced"


def test_live_wrapped_keys_and_the_checkpoint(index: VaultIndex) -> None:
    index.upsert(entry("a", expires=T0 + HOUR), "epoch", b"ka")
    index.upsert(entry("b", expires=T0 + 3 * HOUR), "epoch", b"kb")
    index.upsert(entry("c", expires=T0 + 2 * HOUR), "epoch", b"kc")
    index.shred(probe_ref("c"), T0)
    assert sorted(index.live_wrapped_keys()) == [b"ka", b"kb"]
    assert index.live_wrapped_keys(T0 + 2 * HOUR) == [b"ka"]
    assert index.checkpoint() is True  # nobody reading the SQLite file; nothing on PG


def test_a_vault_over_the_index_puts_gets_and_purges(index: VaultIndex,
                                                     tmp_path: Path) -> None:
    vault = Vault(index, FileObjectStore(tmp_path / "objects"), LocalKek(tmp_path / "kek"))
    ref = vault.put(probe_id="a", case_id="C", data=b"\xff\xd8image", created_at=T0,
                    expires_at=T0 + HOUR)
    assert vault.get(ref) == b"\xff\xd8image"
    done = vault.purge(ref, "expired", T0 + HOUR)
    assert (done.state, done.purge_reason) == ("purged", "expired")
    with pytest.raises((ObjectPurged, UnknownObject)):  # gone, either way
        vault.get(ref)
    with pytest.raises(ObjectPurged):
        vault.put(probe_id="a", case_id="C", data=b"\xff\xd8again", created_at=T0,
                  expires_at=T0 + HOUR)


# --- wiring on FRS_STATE_URL=postgresql://… ----------------------------------------------


def password_file(server: PgServer, role: str) -> Path:
    return Path(server.settings(role)["FRS_STATE_PASSWORD_FILE"])


def test_open_index_follows_the_state_url(pg_migrated: PgServer, tmp_path: Path) -> None:
    settings = VaultSettings(state_dir=tmp_path)
    local = open_index(settings, parse_state_url(None, tmp_path), name="t")
    assert isinstance(local, SqliteVaultIndex) and settings.index_path.exists()
    local.close()
    state = tmp_path / "pg-state"
    shared = open_index(VaultSettings(state_dir=state), parse_state_url(
        pg_migrated.url("intake"), state), password_file(pg_migrated, "intake"), name="t")
    assert isinstance(shared, PgVaultIndex)
    shared.close()
    assert not state.exists()


async def test_intake_and_dispatch_share_the_index_and_make_no_sqlite_file(
        pg_migrated: PgServer, tmp_path: Path) -> None:
    empty_vault(pg_migrated)
    state = tmp_path / "state"
    vault_settings = VaultSettings(state_dir=state, kek_backend="epoch")
    intake = IntakeSettings(state_dir=state, vault=vault_settings,
                            state_url=pg_migrated.url("intake"),
                            state_password_file=password_file(pg_migrated, "intake"))
    dispatch = DispatchSettings(state_dir=state, vault=vault_settings,
                                state_url=pg_migrated.url("dispatch"),
                                state_password_file=password_file(pg_migrated, "dispatch"))
    async with AsyncExitStack() as stack:
        vault, local_outcomes = open_intake_vault(intake, stack)
        assert local_outcomes is None and isinstance(vault.index, PgVaultIndex)
        now = datetime.now(UTC)
        ref = vault.put(probe_id="prb-wired", case_id="CASE-W", data=b"\xff\xd8wired",
                        created_at=now, expires_at=now + HOUR)
        source = build_image_source(dispatch, stack)
        assert await source.get(ref) == b"\xff\xd8wired"
        assert await source.send_window(ref) > 0
    # Keys and ciphertexts where they always were; no index file, no WAL, nothing else.
    files = sorted(p.relative_to(state).parts[:2] for p in state.rglob("*") if p.is_file())
    assert {f[:2] for f in files} <= {("keys", "vault-epochs"), ("vault", "objects")}, files
    assert not vault_settings.index_path.exists()
