"""Where dispatch reads the probe image: the ``ImageSource`` port.

The real implementation is the vault (services/intake/vault.py, written by the intake
issue): an adapter whose ``get(vault_ref)`` reads and decrypts the sanitized probe and
raises ``ImageGone`` once it has been purged. Until it lands, dispatch can run only with
the test source below, and only in local mode (see ``app.build_image_source``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ImageGone(Exception):
    """The image was purged (or never stored): nothing may be sent."""


class ImageSource(Protocol):
    async def get(self, vault_ref: str) -> bytes: ...


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
