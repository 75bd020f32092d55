"""Where a service's shared state lives, from ``FRS_STATE_URL`` (the same in every service):
``sqlite:///DIR`` keeps the SQLite files of one host in the state dir (the default), and
``postgresql://ROLE@HOST:PORT/DB`` puts them in one database that instances on many hosts
share, each service as its own role (deploy/postgres/pg.sh makes the roles and prints
each URL). The password is never in the URL: it is read from ``FRS_STATE_PASSWORD_FILE``,
a file only its owner may read. psycopg is imported only when PostgreSQL is used."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from services.kit.private_files import read_private

if TYPE_CHECKING:
    from contextlib import AsyncExitStack

    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("frs.state")

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_TLS_MODES = frozenset({"require", "verify-ca", "verify-full"})


@dataclass(frozen=True)
class StateUrl:
    """A parsed ``FRS_STATE_URL``: SQLite in ``sqlite_dir``, or a PostgreSQL conninfo
    (without a password)."""

    backend: str  # "sqlite" or "postgresql"
    sqlite_dir: Path | None = None
    conninfo: str = ""

    @property
    def postgres(self) -> bool:
        return self.backend == "postgresql"

    def shown(self) -> str:
        """For logs and errors."""
        return f"sqlite:///{self.sqlite_dir}" if self.sqlite_dir is not None else self.conninfo


def parse_state_url(url: str | None, state_dir: Path, *, local_mode: bool = True) -> StateUrl:
    """The URL checked, or ValueError saying what to set instead."""
    if url is None or url in ("", "sqlite:", "sqlite://"):
        return StateUrl("sqlite", sqlite_dir=state_dir)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path:
            raise ValueError(f"FRS_STATE_URL {url!r}: want sqlite:///DIR (three slashes)")
        # The files of every SQLite store live under the state dir (their own settings
        # name them there); one directory, so the URL cannot point elsewhere.
        if Path(parts.path).resolve() != state_dir.resolve():
            raise ValueError(f"FRS_STATE_URL {url!r} names a directory other than "
                             f"FRS_STATE_DIR ({state_dir}): set FRS_STATE_DIR={parts.path}")
        return StateUrl("sqlite", sqlite_dir=state_dir)
    if parts.scheme in ("postgresql", "postgres"):
        if parts.password is not None:
            raise ValueError("FRS_STATE_URL must not carry a password: put it in a 0600 file "
                             "named by FRS_STATE_PASSWORD_FILE")
        if not parts.username or not parts.hostname or not parts.path.strip("/"):
            raise ValueError(f"FRS_STATE_URL {url!r}: want postgresql://ROLE@HOST:PORT/DB")
        if not local_mode and parts.hostname not in _LOOPBACK \
                and not any(f"sslmode={mode}" in parts.query for mode in _TLS_MODES):
            # Outside local mode state crosses the network only encrypted.
            raise ValueError("FRS_STATE_URL to another host needs ?sslmode=verify-full (or "
                             "require) outside local mode")
        return StateUrl("postgresql", conninfo=url)
    raise ValueError(f"FRS_STATE_URL {url!r}: want sqlite:///DIR or postgresql://ROLE@HOST/DB")


class SchemaMismatch(RuntimeError):
    """The database's schema is not the one this build was written for."""


def read_password(path: Path | None) -> str | None:
    """The role's password from its private file (refused when others may read it)."""
    return None if path is None else read_private(path).decode().strip()


# An instance frozen inside a transaction (SIGSTOP, a VM paused) holds its row locks, and
# every other instance waiting on them, until the server ends the transaction: after this
# long idle in it. No transaction here waits on anything slower than a publish.
IDLE_IN_TRANSACTION_S = 30


def pool_kwargs(password: str | None, *, name: str, timeout_s: float) -> dict[str, Any]:
    """Connection keywords of a service's pool: named (pg_stat_activity shows who), a
    bounded connect, a bounded idle transaction, and the role's password when it has
    one."""
    kwargs: dict[str, Any] = {
        "application_name": f"frs-{name}", "connect_timeout": max(1, int(timeout_s)),
        "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S}s"}
    if password is not None:
        kwargs["password"] = password
    return kwargs


class PostgresState:
    """One service's pool on the shared database. Made (not connected) while the app is
    wired; ``ready`` connects and checks the schema version before anything runs."""

    def __init__(self, url: StateUrl, password: str | None, *, name: str,
                 max_size: int = 8, timeout_s: float = 10.0) -> None:
        from psycopg_pool import AsyncConnectionPool

        kwargs = pool_kwargs(password, name=name, timeout_s=timeout_s)
        self.url = url
        self.timeout_s = timeout_s
        self.pool: AsyncConnectionPool = AsyncConnectionPool(
            url.conninfo, kwargs=kwargs, min_size=1, max_size=max_size, open=False,
            name=f"frs-{name}", timeout=timeout_s)

    async def ready(self) -> None:
        """Connect, then refuse a schema other than this build's (SchemaMismatch)."""
        from services.kit.migrate import status

        await self.pool.open(wait=True, timeout=self.timeout_s)
        async with self.pool.connection() as conn:
            found = await status(conn)
        if found.version != found.latest:
            raise SchemaMismatch(f"database schema is at {found.version}, this build needs "
                                 f"{found.latest}: run frs db migrate")

    async def preflight(self) -> None:
        """``ready`` as a service's start check: a failure stops the start in one line."""
        try:
            await self.ready()
        except SchemaMismatch as exc:
            log.error(str(exc))
            raise SystemExit(1) from None
        except Exception as exc:  # the pool's timeout, a refused password, no server
            log.error(f"cannot use the shared state at {self.url.shown()}: "
                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            raise SystemExit(1) from None

    async def close(self) -> None:
        await self.pool.close()


@dataclass(frozen=True)
class SqliteState:
    """Today's stores: SQLite files under ``dir`` (the state dir), one host."""

    dir: Path


State = SqliteState | PostgresState


def open_state(url: StateUrl, password_file: Path | None, stack: AsyncExitStack, *,
               name: str, max_size: int = 8) -> State:
    """The state a service's stores use; a pool is closed by ``stack``."""
    if not url.postgres:
        assert url.sqlite_dir is not None
        return SqliteState(url.sqlite_dir)
    state = PostgresState(url, read_password(password_file), name=name, max_size=max_size)
    stack.push_async_callback(state.close)
    return state
