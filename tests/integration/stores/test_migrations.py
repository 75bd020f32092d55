"""Schema migrations on a real server: applied once by the owner, idempotent, refused to a
service role; a service refuses a schema other than its build's in one line; each service
role reaches only its own tables (least privilege, like the Kafka ACLs)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import psycopg
import pytest

from services.kit import migrate as migrations
from services.kit.migrate import MigrationError, available, latest, migrate, status
from services.kit.state import PostgresState, SchemaMismatch, open_state, parse_state_url
from tests.integration.stores.conftest import conninfo
from tests.integration.stores.test_audit_store_contract import AUDIT_TABLES
from tests.pg import ROOT, SERVICE_ROLES, PgServer

# Each table and the one service role that may use it.
OWNERS = {"request_outcomes": "intake", "request_reuses": "intake",
          "exigent_reviews": "intake", "webhook_nonces": "results",
          "sends": "dispatch",
          "mail_replies": "results", "request_refs": "results",
          "tracker_probes": "results"}
# The vault index: intake writes it; dispatch may read it, only read (it unwraps keys).
OWNERS["vault_objects"] = "intake"
READERS = {"vault_objects": {"dispatch"}}
# The audit log and the invariants' state (migration 0008): the audit role's alone.
OWNERS |= dict.fromkeys(AUDIT_TABLES, "audit")
# Partition leases (migration 0009, services/kit/fencing.py): each role its own table.
OWNERS |= {f"{role}_leases": role for role in ("intake", "dispatch", "results")}
READERS |= {table: {"auditor"} for table in AUDIT_TABLES[:3]}  # the log alone
# The audit queue and sequencer lease (migration 0010, in AUDIT_TABLES): frs status and
# the auditors may see who sequences.
READERS["audit_sequencer_lease"] = {"auditor"}


def test_migration_files_are_numbered_and_grant_what_they_make() -> None:
    assert [m.version for m in available()] == list(range(1, latest() + 1))
    made = {t for m in available()
            for t in re.findall(r"CREATE TABLE (\w+)", m.sql)}
    assert made == set(OWNERS)


async def test_migrate_is_idempotent_and_status_current(pg_migrated: PgServer) -> None:
    async with await psycopg.AsyncConnection.connect(**conninfo(pg_migrated, "owner")) as conn:
        assert await migrate(conn) == []  # the session fixture applied everything
        found = await status(conn)
        assert (found.version, found.current, found.pending) == (latest(), True, [])


async def test_a_service_role_cannot_migrate(pg_migrated: PgServer) -> None:
    async with await psycopg.AsyncConnection.connect(**conninfo(pg_migrated, "results")) as c:
        with pytest.raises(MigrationError, match="runs as the schema's owner, not results"):
            await migrate(c)


async def test_an_edited_migration_is_refused(pg_migrated: PgServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    edited = (*available()[:-1], migrations.Migration(latest(), available()[-1].name,
                                                      available()[-1].sql + "\n-- edited"))
    monkeypatch.setattr(migrations, "available", lambda: edited)
    async with await psycopg.AsyncConnection.connect(**conninfo(pg_migrated, "owner")) as conn:
        with pytest.raises(MigrationError, match="was edited after it was applied"):
            await migrate(conn)


@pytest.mark.parametrize("build", ["older", "newer"])
async def test_a_service_refuses_a_schema_it_was_not_built_for(
        build: str, pg_migrated: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    have = latest()
    known = available()[:-1] if build == "older" else (
        *available(), migrations.Migration(have + 1, "future", "SELECT 1;"))
    monkeypatch.setattr(migrations, "available", lambda: known)
    url = parse_state_url(pg_migrated.url("intake"), tmp_path)
    password = Path(pg_migrated.settings("intake")["FRS_STATE_PASSWORD_FILE"])
    async with AsyncExitStack() as stack:
        state = open_state(url, password, stack, name="intake")
        assert isinstance(state, PostgresState)
        wanted = f"database schema is at {have}, this build needs {len(known)}: " \
                 "run frs db migrate"
        with pytest.raises(SchemaMismatch) as caught:
            await state.ready()
        assert str(caught.value) == wanted
        await state.pool.close()
    async with AsyncExitStack() as stack:
        state = open_state(url, password, stack, name="intake")
        assert isinstance(state, PostgresState)
        with caplog.at_level(logging.ERROR, "frs.state"), pytest.raises(SystemExit):
            await state.preflight()
        assert [r.getMessage() for r in caplog.records] == [wanted]


async def test_the_build_schema_lets_a_service_start(pg_migrated: PgServer,
                                                     tmp_path: Path) -> None:
    url = parse_state_url(pg_migrated.url("dispatch"), tmp_path)
    password = Path(pg_migrated.settings("dispatch")["FRS_STATE_PASSWORD_FILE"])
    async with AsyncExitStack() as stack:
        state = open_state(url, password, stack, name="dispatch")
        assert isinstance(state, PostgresState)
        await state.ready()


def test_each_role_reaches_only_its_own_tables(pg_migrated: PgServer) -> None:
    with psycopg.connect(**conninfo(pg_migrated, "owner")) as conn:
        for role in SERVICE_ROLES:
            for table, owner in OWNERS.items():
                for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE",
                                  "REFERENCES", "TRIGGER"):
                    row = conn.execute("SELECT has_table_privilege(%s, %s, %s)",
                                       (role, table, privilege)).fetchone()
                    expected = role == owner and privilege in (
                        "SELECT", "INSERT", "UPDATE", "DELETE")
                    expected |= privilege == "SELECT" and role in READERS.get(table, ())
                    assert row == (expected,), (role, table, privilege)
            row = conn.execute("SELECT has_table_privilege(%s, 'schema_migrations', 'SELECT'),"
                               " has_table_privilege(%s, 'schema_migrations', 'INSERT')",
                               (role, role)).fetchone()
            assert row == (True, False), role


@pytest.mark.parametrize(("role", "table"), [
    ("results", "request_outcomes"), ("intake", "webhook_nonces"),
    ("dispatch", "exigent_reviews"), ("audit", "request_refs"),
    ("results", "vault_objects")])
def test_a_service_role_is_refused_on_another_services_table(
        pg_migrated: PgServer, role: str, table: str) -> None:
    with psycopg.connect(**conninfo(pg_migrated, role)) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match=f"permission denied for table {table}"):
        conn.execute(psycopg.sql.SQL("SELECT * FROM {}").format(psycopg.sql.Identifier(table)))


def test_dispatch_may_read_the_vault_index_and_nothing_more(pg_migrated: PgServer) -> None:
    with psycopg.connect(**conninfo(pg_migrated, "dispatch")) as conn:
        conn.execute("SELECT kek_id, wrapped_key FROM vault_objects WHERE ref = 'x'")
        for write in ("UPDATE vault_objects SET wrapped_key = NULL",
                      "DELETE FROM vault_objects"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match="permission denied for table vault_objects"):
                conn.execute(write.encode())
            conn.rollback()


def test_frs_db_commands(pg_migrated: PgServer, tmp_path: Path) -> None:
    def frs(role: str, *args: str) -> subprocess.CompletedProcess[str]:
        env_file = pg_migrated.state / "env" / f"{role}.env"
        return subprocess.run([sys.executable, "-m", "services.cli", "--as", str(env_file),
                               "db", *args], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, env={**os.environ, "FRS_STATE_DIR": str(tmp_path)})

    again = frs("owner", "migrate", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) | {"url": ""} == {
        "backend": "postgresql", "url": "", "from": latest(), "to": latest(), "applied": []}
    current = frs("results", "status", "--json")
    assert current.returncode == 0 and json.loads(current.stdout)["current"] is True
    refused = frs("intake", "migrate")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("frs: frs db migrate runs as the schema's owner, not "
                                      "intake: use the owner's settings (deploy/postgres/pg.sh "
                                      "env owner)")
    assert pg_migrated.password("intake") not in refused.stderr + refused.stdout
