"""python -m services.results: run until SIGTERM, then drain and commit."""

from __future__ import annotations

from contextlib import AsyncExitStack

from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher, start_registries
from services.results.app import ResultsSettings, build_all, start_channels


async def main(settings: ResultsSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    registries = await start_registries(settings, stack)
    processors, jobs = build_all(settings, publisher, registries, stack)
    await start_channels(settings, publisher, registries, stack)
    await run_service(settings, processors, stack, background=jobs)


if __name__ == "__main__":
    settings = ResultsSettings()
    main_entry(settings, main(settings))
