"""Fakes for the ports that handler tests inject: a clock the test moves, a sink for
published events, provider transports with scripted behaviour, and the vault over files
in a test's tmp_path. No network, no broker; new handler tests take theirs from here."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from schemas.events import Event
from services.dispatch.transports.base import SendRequest, SendResult
from services.vault import FileObjectStore, LocalKek, SqliteVaultIndex, Vault, open_db

# --- time -------------------------------------------------------------------------------


class FakeClock:
    """A wall clock that stands still until the test sets ``now`` or calls ``at``."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        """Move to ``seconds`` after the start."""
        self.now = self.start + timedelta(seconds=seconds)


async def no_sleep(_s: float) -> None:
    """The injected sleep of retries and backoff: none."""
    return None


# --- publishing -------------------------------------------------------------------------


class EventSink:
    """The publish port: keeps what it is given; fails once ``fail_after`` events are in,
    as a broker that goes away would."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.events: list[Event] = []
        self.fail_after = fail_after

    async def __call__(self, events: Sequence[Event]) -> None:
        if self.fail_after is not None and len(self.events) >= self.fail_after:
            raise ConnectionError("broker went away")
        self.events.extend(events)


# --- the vault --------------------------------------------------------------------------


def tmp_vault(root: Path) -> Vault:
    """The real vault on files under ``root`` (a tmp_path): index, objects, local KEK."""
    return Vault(SqliteVaultIndex(open_db(root / "intake.db")), FileObjectStore(root / "objects"),
                 LocalKek(root / "kek"))


def index_db(vault: Vault) -> sqlite3.Connection:
    """The SQLite file under a ``tmp_vault`` (the outcome log shares it)."""
    assert isinstance(vault.index, SqliteVaultIndex)
    return vault.index.conn


# --- provider transports (dispatch) -----------------------------------------------------


@dataclass
class ScriptedTransport:
    """Each send takes the next step of ``script``: None succeeds, an exception is raised;
    the last step repeats."""

    script: list[Exception | None]
    idempotent_resend: bool = True
    calls: int = 0

    async def send(self, request: SendRequest) -> SendResult:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if step is not None:
            raise step
        return SendResult()

    async def close(self) -> None:
        return None


class HangingTransport:
    """A vendor that holds every send until the test sets ``release``."""

    idempotent_resend = False

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, request: SendRequest) -> SendResult:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return SendResult()

    async def close(self) -> None:
        return None


class BrokenTransport:
    """Raises what no transport maps (aiohttp's text() on a body that is not UTF-8)."""

    idempotent_resend = True

    async def send(self, request: SendRequest) -> SendResult:
        b"\xff".decode("utf-8")
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None
