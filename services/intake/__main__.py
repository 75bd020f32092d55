"""python -m services.intake: run until SIGTERM, then drain and commit."""

from __future__ import annotations

from contextlib import AsyncExitStack

from services.intake.app import IntakeSettings, build, build_purger, open_vault
from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher, start_registries


async def main(settings: IntakeSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    registries = await start_registries(settings, stack)
    vault = open_vault(settings, stack)
    processors = build(settings, publisher, registries, stack, vault)
    # The purger runs beside the processors: it works from stored expiries only.
    purger = build_purger(settings, publisher, registries, vault[0])
    await run_service(settings, processors, stack, background=[purger.run])


if __name__ == "__main__":
    settings = IntakeSettings()
    main_entry(settings, main(settings))
