"""python -m services.audit: run until SIGTERM, then drain and commit."""

from __future__ import annotations

from contextlib import AsyncExitStack

from services.audit.app import AuditSettings, build_app
from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher


async def main(settings: AuditSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    processors, background = build_app(settings, publisher, stack)
    await run_service(settings, processors, stack, background)


if __name__ == "__main__":
    settings = AuditSettings()
    main_entry(settings, main(settings))
