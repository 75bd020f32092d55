"""python -m services.dispatch: run until SIGTERM, then drain and commit."""

from __future__ import annotations

from contextlib import AsyncExitStack

from services.dispatch.app import DispatchSettings, build
from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher, start_registries


async def main(settings: DispatchSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    registries = await start_registries(settings, stack)
    app = build(settings, publisher, registries, stack)
    await run_service(settings, app.processors, stack, app.background)


if __name__ == "__main__":
    settings = DispatchSettings()
    main_entry(settings, main(settings))
