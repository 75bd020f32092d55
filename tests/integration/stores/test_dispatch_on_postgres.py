"""Dispatch on FRS_STATE_URL=postgresql://…, on the real broker: two instances with state
dirs of their own (two hosts) share the ledger, so when the second joins mid-run and takes
partitions the first is still sending, it waits for the first's claims instead of sending
again; no ledger file is written under either state dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ServiceProcess
from tests.integration.stores.conftest import conninfo, empty_tables
from tests.integration.test_dispatch_service import (  # noqa: F401 - fixtures
    Rig,
    join_mid_run,
    rig,
    smime,
)
from tests.pg import PgServer

pytestmark = pytest.mark.integration


async def test_two_hosts_on_one_ledger_send_each_probe_once(
        rig: Rig, services: dict[str, ServiceProcess], tmp_path: Path,  # noqa: F811
        smime: tuple[str, Any, Any], pg_migrated: PgServer) -> None:  # noqa: F811
    await empty_tables(pg_migrated)
    n = 120
    states = [tmp_path / "host-a" / "state", tmp_path / "host-b" / "state"]
    on_postgres = {"FRS_STATE_URL": pg_migrated.url("dispatch"), "FRS_STATE_PASSWORD_FILE":
                   pg_migrated.settings("dispatch")["FRS_STATE_PASSWORD_FILE"]}
    second = ServiceProcess("dispatch", services["dispatch"].env, tmp_path / "host-b.log")
    await join_mid_run(rig, second, smime[0], n, (
        {**on_postgres, "FRS_DISPATCH_INSTANCE_ID": "host-a", "FRS_STATE_DIR": str(states[0])},
        {**on_postgres, "FRS_DISPATCH_INSTANCE_ID": "host-b", "FRS_STATE_DIR": str(states[1])}))
    # Every send is on record in the shared ledger, and neither host has a ledger file.
    with psycopg.connect(**conninfo(pg_migrated, "dispatch")) as conn:
        assert conn.execute("SELECT state, count(*) FROM sends GROUP BY state").fetchall() \
            == [("done", 2 * n)]
    for state_dir in states:
        assert not (state_dir / "dispatch" / "ledger.db").exists()
        assert not list(state_dir.rglob("*.db*")), sorted(state_dir.rglob("*"))
