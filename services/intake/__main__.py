"""python -m services.intake: run until SIGTERM, then drain and commit."""

from __future__ import annotations

from contextlib import AsyncExitStack

from services.intake.app import IntakeSettings, build
from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher, start_registries


async def main(settings: IntakeSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    registries = await start_registries(settings, stack)
    await run_service(settings, build(settings, publisher, registries, stack), stack)


if __name__ == "__main__":
    settings = IntakeSettings()
    main_entry(settings, main(settings))
