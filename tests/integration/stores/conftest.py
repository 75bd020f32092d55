"""The PostgreSQL server of the store tests, one per session (tests/pg.py): deploy/test.sh's
when it started one, else started here. When pg.sh cannot start a server the PostgreSQL
tests are skipped with its reason, except under deploy/test.sh (FRS_TEST_PG_REQUIRED)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.kit.migrate import migrate
from services.kit.state import PostgresState, parse_state_url
from tests.pg import PgServer, existing_server, must_run, start_server, stop_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = existing_server()
    if server is not None:
        yield server
        return
    try:
        server = start_server()
    except (subprocess.CalledProcessError, OSError) as exc:
        reason = getattr(exc, "stderr", None) or str(exc)
        if must_run():
            pytest.fail(f"pg.sh could not start PostgreSQL: {reason.strip()}")
        pytest.skip(f"pg.sh could not start PostgreSQL: {reason.strip()}")
    try:
        yield server
    finally:
        stop_server(server)


def conninfo(server: PgServer, role: str) -> dict[str, Any]:
    """psycopg.connect keywords of ``role`` (a service, or owner) on the test server."""
    return {"conninfo": server.url(role), "password": server.password(role),
            "connect_timeout": 5}


@pytest.fixture(scope="session")
def pg_migrated(pg_server: PgServer) -> PgServer:
    """The server with this build's schema applied (as the owner, like frs db migrate)."""
    return apply_schema(pg_server)


def apply_schema(server: PgServer) -> PgServer:
    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(**conninfo(server, "owner")) as conn:
            await migrate(conn)

    # Its own loop in a thread: it may be first asked for from inside a running test loop.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, apply()).result()
    return server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each contract test runs once per implementation of its port."""
    return str(request.param)


async def empty_tables(server: PgServer) -> None:
    """Every store table emptied (as the owner), so each test starts from nothing."""
    async with await psycopg.AsyncConnection.connect(**conninfo(server, "owner")) as conn:
        cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                 "AND tablename <> 'schema_migrations'")
        tables = [psycopg.sql.Identifier(row[0]) for row in await cur.fetchall()]
        if tables:
            await conn.execute(psycopg.sql.SQL("TRUNCATE {}").format(
                psycopg.sql.SQL(", ").join(tables)))


async def shared_state(request: pytest.FixtureRequest, role: str,
                       max_size: int = 4) -> PostgresState:
    """The state ``role``'s service opens on FRS_STATE_URL (pool made, connected, schema
    checked), on empty tables. The caller closes it."""
    server: PgServer = request.getfixturevalue("pg_migrated")
    await empty_tables(server)
    state = PostgresState(parse_state_url(server.url(role), Path(".")), server.password(role),
                          name=role, max_size=max_size)
    await state.ready()
    return state
