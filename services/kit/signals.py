"""Signals a handler may raise to the processor loop. Handlers import this module, so it
imports no Kafka client."""

from __future__ import annotations


class NotYet(Exception):
    """The record is valid but cannot be handled yet: something it needs is unavailable
    for now (intake: the vault is down; dispatch, at stop: another live instance holds the
    claim). Retried without limit while the processor runs, never sent to the DLQ; at stop
    the batch is left uncommitted, so the next owner handles it again."""


def store_unavailable(exc: BaseException) -> bool:
    """A failure of the state store itself, not of the record: PostgreSQL gone or
    restarting (psycopg's OperationalError: refused, shut down, connection lost), SQLite
    locked by another writer. The processor waits it out like ``NotYet``: a PostgreSQL
    restart once dead-lettered a valid clearance after four quick retries. psycopg is only
    looked up, never imported: if it is not loaded, no error of it can be raised."""
    import sqlite3
    import sys

    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)
