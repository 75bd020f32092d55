"""The vault index on PostgreSQL (migration 0005, ``vault_objects``): the twin of
``SqliteVaultIndex`` for many instances on many hosts. The intake role writes it (puts,
purges); the dispatch role may only read it (it unwraps keys to open the images it sends).

Synchronous on purpose (psycopg's ``ConnectionPool``): ``Vault`` is a synchronous API,
called on dispatch's vault thread and by the intake as the SQLite index is, so a blocking
pool keeps one ``Vault`` for both backends instead of an async twin of every caller.

Every transition is one conditional ``UPDATE`` (or ``INSERT … ON CONFLICT … WHERE``), its
own transaction: under PostgreSQL's row locks the second of two instances waits for the
first and then finds the row moved on, so it changes nothing (``rowcount`` 0). The
announcement is claimed with ``FOR UPDATE SKIP LOCKED`` and held until the ImagePurged
is published: one instance announces, and a crash before the broker's ack rolls the
claim back for the next sweep.

Destroyed keys live on in dead tuples until VACUUM, in the WAL and in any dump or base
backup; none of that is reachable from here, which is why the keys are wrapped under
epoch keys kept outside the database (docs/security.md): ``checkpoint()`` has nothing to
truncate and says so."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.kit.state import pool_kwargs
from services.vault.core import ObjectPurged, UnknownObject, VaultEntry

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

_COLUMNS = ("ref, probe_id, case_id, kind, object_name, created_at, expires_at, state, "
            "purge_reason, purged_at")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _entry(row: tuple[Any, ...]) -> VaultEntry:
    return VaultEntry(row[0], row[1], row[2], row[3], row[4], row[5].astimezone(UTC),
                      row[6].astimezone(UTC), row[7], row[8], _utc(row[9]))


class PgVaultIndex:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    @classmethod
    def connect(cls, conninfo: str, password: str | None, *, name: str,
                max_size: int = 4, timeout_s: float = 10.0) -> PgVaultIndex:
        """A pool of its own on the service's FRS_STATE_URL (the service's role)."""
        from psycopg_pool import ConnectionPool

        return cls(ConnectionPool(conninfo, kwargs=pool_kwargs(password, name=name,
                                                               timeout_s=timeout_s),
                                  min_size=1, max_size=max_size, open=True,
                                  name=f"frs-{name}", timeout=timeout_s))

    def close(self) -> None:
        self.pool.close()

    def _one(self, query: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self.pool.connection() as conn:
            return conn.execute(query.encode(), args).fetchone()

    def _write(self, query: str, args: tuple[Any, ...]) -> int:
        with self.pool.connection() as conn:
            return conn.execute(query.encode(), args).rowcount

    def upsert(self, entry: VaultEntry, kek_id: str, wrapped_key: bytes) -> None:
        """A new object, or a re-key of one still stored; never a purged one back."""
        written = self._write(
            "INSERT INTO vault_objects AS v (ref, probe_id, case_id, kind, object_name, kek_id,"
            " wrapped_key, created_at, expires_at, state, purge_reason, purged_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL)"
            " ON CONFLICT (ref) DO UPDATE SET kek_id = excluded.kek_id,"
            " wrapped_key = excluded.wrapped_key, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at WHERE v.state = 'stored'",
            (entry.ref, entry.probe_id, entry.case_id, entry.kind, entry.object_name, kek_id,
             wrapped_key, entry.created_at, entry.expires_at, entry.state))
        if written == 0:
            raise ObjectPurged("the object was purged; it is not stored again")

    def get(self, ref: str) -> VaultEntry | None:
        row = self._one(f"SELECT {_COLUMNS} FROM vault_objects WHERE ref = %s", (ref,))
        return None if row is None else _entry(row)

    def wrapped_key(self, ref: str) -> tuple[str, bytes | None]:
        row = self._one("SELECT kek_id, wrapped_key FROM vault_objects WHERE ref = %s", (ref,))
        if row is None:
            raise UnknownObject("no object is indexed under that reference")
        return str(row[0]), None if row[1] is None else bytes(row[1])

    def expire_case(self, case_id: str, now: datetime) -> int:
        return self._write(
            "UPDATE vault_objects SET expires_at = %s, purge_reason = 'case_closed'"
            " WHERE case_id = %s AND state = 'stored' AND expires_at > %s",
            (now, case_id, now))

    def live_case_ids(self) -> list[str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                b"SELECT DISTINCT case_id FROM vault_objects WHERE state = 'stored'").fetchall()
        return [r[0] for r in rows]

    def due(self, now: datetime, limit: int = 1000) -> list[VaultEntry]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM vault_objects WHERE"
                " (state = 'stored' AND expires_at <= %s) OR state IN ('purging', 'purged')"
                " ORDER BY expires_at LIMIT %s".encode(), (now, limit)).fetchall()
        return [_entry(r) for r in rows]

    def count_past_expiry(self, now: datetime) -> int:
        row = self._one("SELECT count(*) FROM vault_objects WHERE state IN ('stored', "
                        "'purging') AND expires_at <= %s", (now,))
        assert row is not None
        return int(row[0])

    def count_stored(self) -> int:
        row = self._one("SELECT count(*) FROM vault_objects WHERE state IN ('stored', "
                        "'purging')", ())
        assert row is not None
        return int(row[0])

    def mark_purging(self, ref: str, reason: str) -> bool:
        return self._write(
            "UPDATE vault_objects SET state = 'purging',"
            " purge_reason = COALESCE(purge_reason, %s) WHERE ref = %s AND state = 'stored'",
            (reason, ref)) == 1

    def shred(self, ref: str, now: datetime, *, checkpoint: bool = True) -> bool:
        return self._write(
            "UPDATE vault_objects SET wrapped_key = NULL, state = 'purged', purged_at = %s"
            " WHERE ref = %s AND state IN ('stored', 'purging')", (now, ref)) == 1

    def live_wrapped_keys(self, expiring_before: datetime | None = None) -> list[bytes]:
        """As ``SqliteVaultIndex.live_wrapped_keys``."""
        query = "SELECT wrapped_key FROM vault_objects WHERE wrapped_key IS NOT NULL"
        args: tuple[datetime, ...] = ()
        if expiring_before is not None:
            query, args = query + " AND expires_at < %s", (expiring_before,)
        with self.pool.connection() as conn:
            return [bytes(r[0]) for r in conn.execute(query.encode(), args).fetchall()]

    def checkpoint(self) -> bool:
        """Always True: PostgreSQL's WAL, dead tuples and backups are the server's and
        cannot be truncated from here; a destroyed key's old copies there become noise
        when its epoch key is destroyed (docs/security.md), so the announcement of a
        purge does not wait on them."""
        return True

    @contextmanager
    def announcing(self, ref: str) -> Iterator[bool]:
        # The claim and the mark are one transaction held across the publish: another
        # instance skips the locked row (and then finds it announced); a publish that
        # fails rolls the claim back, so the purge is announced by a later sweep.
        with self.pool.connection() as conn:
            ours = conn.execute(
                b"UPDATE vault_objects SET state = 'announced' WHERE ref = (SELECT ref FROM"
                b" vault_objects WHERE ref = %s AND state = 'purged' FOR UPDATE SKIP LOCKED)",
                (ref,)).rowcount == 1
            yield ours

    def mark_announced(self, ref: str) -> bool:
        return self._write("UPDATE vault_objects SET state = 'announced' WHERE ref = %s"
                           " AND state = 'purged'", (ref,)) == 1
