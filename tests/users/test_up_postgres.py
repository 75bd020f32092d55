"""``deploy/up.sh --store postgres --demo`` as a user runs it: the sample probe settles and
``frs audit verify`` passes with every service's state in PostgreSQL and the vault's
ciphertexts in the S3-compatible server, and no service leaves a file in the state dir
but its keys. The state remembers its store: the same state on SQLite is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port_block
from tests.pg import private_tmpdir

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "deploy" / "up.sh"
pytestmark = pytest.mark.users
# What up.sh itself keeps beside the services' state: the servers' data, the logs, the
# demo vendor's files, the sample photo, which store the state is on, and the pid file of
# each process it started.
SERVERS = {"kafka", "postgres", "s3", "logs", "demo", "sample.jpg", "store"}


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[subprocess.CompletedProcess[str], Path]]:
    # The PostgreSQL server's OS user must reach its data dir: not under pytest's 0700 tmp.
    base = private_tmpdir("frs-up-pg-")
    web = free_port_block(2)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FRS_", "VIRTUAL_ENV", "PYTHON"))}
    env |= {"FRS_UP_STATE": str(base / "state"), "FRS_PROFILE_DIR": str(base / "profiles"),
           "FRS_KAFKA_PORT": str(free_port_block(3)), "FRS_PG_PORT": str(free_port_block(1)),
           "FRS_S3PROXY_PORT": str(free_port_block(1)), "FRS_DEMO_VENDOR_PORT": str(web),
           "FRS_DEMO_WEBHOOK_PORT": str(web + 1), "FRS_AUDIT_CHECKPOINT_INTERVAL_S": "1"}
    try:
        done = subprocess.run([str(UP), "--store", "postgres", "--demo"], cwd=base, env=env,
                              capture_output=True, text=True, timeout=900)
        yield done, base / "state"
        refused = subprocess.run([str(UP), "--demo"], cwd=base, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "is on postgres, this run asks for sqlite" in refused.stderr, refused.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_demo_settles_and_verifies_on_postgres(
        run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, state = run
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "frs.probe.settled.v1" in out and "starting PostgreSQL" in out
    assert (state / "store").read_text().strip() == "postgres"


def test_no_state_file_but_keys_on_postgres(
        run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, state = run
    assert done.returncode == 0
    left = sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file()
                  and p.relative_to(state).parts[0] not in SERVERS | {"keys"}
                  and not (p.parent == state and p.suffix == ".pid"))
    assert left == [], f"state files beside the shared store: {left}"


def test_the_state_is_in_the_database(
        run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, state = run
    assert done.returncode == 0
    settings = dict(line.split("=", 1) for line in
                    (state / "postgres" / "env" / "owner.env").read_text().splitlines())
    # Stopped with up.sh: start it again to look, then stop it as up.sh did.
    env = {**os.environ, "FRS_PG_STATE": str(state / "postgres"),
           "FRS_PG_PORT": settings["FRS_STATE_URL"].split(":")[-1].split("/")[0]}
    pg = ROOT / "deploy" / "postgres" / "pg.sh"
    subprocess.run([str(pg), "start"], env=env, check=True, capture_output=True, timeout=300)
    try:
        password = Path(settings["FRS_STATE_PASSWORD_FILE"]).read_text().strip()
        with psycopg.connect(settings["FRS_STATE_URL"], password=password) as conn:
            counts = {table: conn.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(table))
            ).fetchone() for table in (
                "request_outcomes", "vault_objects", "sends", "request_refs",
                "tracker_probes", "audit_leaves", "audit_checkpoints")}
    finally:
        subprocess.run([str(pg), "stop"], env=env, check=False, capture_output=True,
                       timeout=120)
    assert all(row is not None and row[0] >= 1 for row in counts.values()), counts
