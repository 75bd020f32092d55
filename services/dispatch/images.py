"""Where dispatch reads the probe image: the ``ImageSource`` port.

The real implementation is the vault (services/vault):
``VaultImageSource`` adapts its synchronous ``Vault.get(ref)`` (decrypts the sanitized
probe; raises ``ObjectPurged`` / ``UnknownObject``) to this port; ``app.build_image_source``
opens it with ``services.vault.open_vault(settings.vault)``. The test
source below serves one test photo, in local mode only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from services.kit.cost import step


class ImageGone(Exception):
    """The image was purged (or never stored): nothing may be sent."""


# An image this close to its expiry is not sent: the send must start before the purge can
# (the purger acts only past expiry), even if the event loop stalls between check and send.
SEND_MARGIN = timedelta(seconds=2)


class ImageSource(Protocol):
    async def get(self, vault_ref: str) -> bytes: ...

    async def send_window(self, vault_ref: str) -> float:
        """Seconds the image may still leave for (0: purged, or too close to its expiry).
        Checked before every attempt, which must end within it: a retry never sends an
        image the purger has destroyed or is due to destroy."""
        ...


class StaticImageSource:
    """Tests and benchmarks: every probe is the same test photo (never a real probe)."""

    def __init__(self, image: bytes, gone: frozenset[str] = frozenset()) -> None:
        self._image = image
        self._gone = gone

    @classmethod
    def from_file(cls, path: Path) -> StaticImageSource:
        return cls(path.read_bytes())

    async def get(self, vault_ref: str) -> bytes:
        if vault_ref in self._gone:
            raise ImageGone(vault_ref)
        return self._image

    async def send_window(self, vault_ref: str) -> float:
        return 0.0 if vault_ref in self._gone else float("inf")


class VaultImageSource:
    """The vault behind the port. Its SQLite connection belongs to the thread that opened
    it, so the vault is opened, read and closed on one worker thread of its own (which
    also keeps object-store and KMS calls off the event loop)."""

    def __init__(self, open_vault: Callable[[], Any], gone: tuple[type[Exception], ...],
                 close_vault: Callable[[], object] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault")
        self._vault = self._pool.submit(open_vault).result()
        self._gone = gone
        self._close_vault = close_vault

    async def get(self, vault_ref: str) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            image: bytes = await loop.run_in_executor(self._pool, self._read, vault_ref)
        except self._gone as exc:
            raise ImageGone(type(exc).__name__) from None
        return image

    def _read(self, vault_ref: str) -> bytes:
        with step("vault"):  # on the vault's own thread: its CPU only
            image: bytes = self._vault.get(vault_ref)
            return image

    async def send_window(self, vault_ref: str) -> float:
        def check() -> float:
            entry = self._vault.index.get(vault_ref)
            if entry is None or entry.state != "stored":
                return 0.0
            left: float = (entry.expires_at - datetime.now(UTC) - SEND_MARGIN).total_seconds()
            return max(0.0, left)

        window: float = await asyncio.get_running_loop().run_in_executor(self._pool, check)
        return window

    def close(self) -> None:
        if self._close_vault is not None:
            self._pool.submit(self._close_vault).result()
        self._pool.shutdown()
