"""The PostgreSQL twins of results' inbound stores (store.py), shared by every instance
of the service (migration 0004, the results role):

- ``PgNonceStore``: accepted webhook calls (``webhook_nonces``) and reply mails
  (``mail_replies``); a claim is one ``INSERT ... ON CONFLICT``, so of two instances
  claiming the same signature at once exactly one wins.
- ``PgRequestRefs``: request_ref -> (probe, provider). The tracker writes them here (its
  own state is still SQLite, see app.py) and the webhook and the inbox read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

# The tables of migration 0004, by the names store.NonceStore uses for its SQLite tables.
NONCE_TABLES = {"nonces": "webhook_nonces", "mail_replies": "mail_replies"}
# Expired claims deleted per claim: pruning keeps pace without one call paying for all.
_PRUNE_BATCH = 64


class PgNonceStore:
    def __init__(self, pool: AsyncConnectionPool, table: str = "nonces") -> None:
        if table not in NONCE_TABLES:
            raise ValueError(f"bad table name {table!r}")
        self.pool = pool
        name = sql.Identifier(NONCE_TABLES[table])
        self._seen = sql.SQL("SELECT 1 FROM {} WHERE digest = %s AND seen_at >= %s").format(name)
        # Rows another claim is pruning are skipped, not waited for.
        self._prune = sql.SQL(
            "DELETE FROM {t} WHERE digest IN (SELECT digest FROM {t} WHERE seen_at < %s "
            "LIMIT %s FOR UPDATE SKIP LOCKED)").format(t=name)
        # New, or an expired claim of the same digest taken over; a live claim (even one
        # committed by another instance a moment ago) leaves no row changed.
        self._claim = sql.SQL(
            "INSERT INTO {t} AS n (digest, seen_at) VALUES (%s, %s) ON CONFLICT (digest) "
            "DO UPDATE SET seen_at = excluded.seen_at WHERE n.seen_at < %s").format(t=name)
        self._release = sql.SQL("DELETE FROM {} WHERE digest = %s").format(name)

    async def seen(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was claimed within the last ``keep_s`` seconds (read only)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._seen, (digest, now - keep_s))
            return await cur.fetchone() is not None

    async def claim(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was not claimed within ``keep_s``; records it durably."""
        async with self.pool.connection() as conn:
            await conn.execute(self._prune, (now - keep_s, _PRUNE_BATCH))
            await conn.commit()  # the claim waits for no lock of this prune's
            cur = await conn.execute(self._claim, (digest, now, now - keep_s))
            return cur.rowcount == 1

    async def release(self, digest: str) -> None:
        """Forget a claim whose call was not accepted, so the provider may retry it."""
        async with self.pool.connection() as conn:
            await conn.execute(self._release, (digest,))


class PgRequestRefs:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def lookup(self, request_ref: str) -> tuple[str, str] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT probe_id, provider_id FROM request_refs WHERE request_ref = %s",
                (request_ref,))
            row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row else None

    async def record(self, refs: list[tuple[str, str, str]]) -> None:
        """(request_ref, probe_id, provider_id) rows; one already known is kept as it is."""
        if not refs:
            return
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO request_refs (request_ref, probe_id, provider_id) "
                "VALUES (%s, %s, %s) ON CONFLICT (request_ref) DO NOTHING", refs)
