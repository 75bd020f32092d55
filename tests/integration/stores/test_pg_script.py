"""deploy/postgres/pg.sh: a real server on 127.0.0.1 with SCRAM passwords, one role per
service, secrets 0600, and a stop that stops only the server it started."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.pg import SERVICE_ROLES, PgServer, start_server, stop_server


def connect(server: PgServer, role: str, password: str | None = None,
            dbname: str = "frs") -> psycopg.Connection[tuple[object, ...]]:
    user = "frs_owner" if role == "owner" else role
    return psycopg.connect(host="127.0.0.1", port=server.port, user=user, dbname=dbname,
                           password=server.password(role) if password is None else password,
                           connect_timeout=5)


def test_every_role_has_private_settings_and_logs_in(pg_server: PgServer) -> None:
    for role in (*SERVICE_ROLES, "owner"):
        settings = pg_server.settings(role)
        assert settings["FRS_STATE_URL"].startswith("postgresql://")
        assert "@127.0.0.1:" in settings["FRS_STATE_URL"]
        for path in (pg_server.state / "env" / f"{role}.env",
                     Path(settings["FRS_STATE_PASSWORD_FILE"])):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        with connect(pg_server, role) as conn:
            row = conn.execute("SELECT current_user, current_setting('password_encryption')"
                               ).fetchone()
            assert row is not None and row[1] == "scram-sha-256"
    assert stat.S_IMODE((pg_server.state / "secrets").stat().st_mode) == 0o700


def test_wrong_password_superuser_and_other_databases_are_refused(pg_server: PgServer
                                                                  ) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(pg_server, "intake", password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        psycopg.connect(host="127.0.0.1", port=pg_server.port, user="postgres",
                        dbname="frs", password="x", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="CONNECT privilege"):
        connect(pg_server, "intake", dbname="postgres")


def test_a_service_role_creates_nothing(pg_server: PgServer) -> None:
    with connect(pg_server, "results") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE mine (x int)")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TEMP TABLE mine (x int)")


def test_status_stop_start_keep_data_and_passwords(pg_server: PgServer) -> None:
    # A server of its own: stopping the session's one would break the other tests.
    try:
        server = start_server()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pg.sh start failed: {exc.stderr}")
    try:
        assert server.run("status").returncode == 0
        before = server.password("intake")
        with connect(server, "owner") as conn:
            conn.execute("CREATE TABLE kept (x int)")
        assert "stopped" in server.run("stop").stdout
        assert server.run("status", check=False).returncode == 3
        assert "not running" in server.run("stop").stdout  # nothing of ours to stop
        server.run("start")
        assert server.password("intake") == before
        with connect(server, "owner") as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
        # The session's server is untouched by this one's stops.
        assert pg_server.run("status").returncode == 0
    finally:
        stop_server(server)
