"""python -m services.intake: run until SIGTERM, then drain and commit."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

from services.intake.app import IntakeSettings, broker_clock, build, build_purger, open_vault
from services.kit.clock import ClockUnavailable
from services.kit.runtime import run_service
from services.kit.service import main_entry, start_publisher, start_registries

log = logging.getLogger("frs.intake")


async def main(settings: IntakeSettings) -> None:
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    registries = await start_registries(settings, stack)
    vault = open_vault(settings, stack)
    # Trusted time first: a clock topic that is missing, not LogAppendTime or not writable
    # stops the start here, with the reason, instead of leaving expiries to the local clock.
    clock = broker_clock(settings, publisher)
    try:
        await clock.sample()
    except ClockUnavailable as exc:
        log.error("cannot read the broker's clock", extra={"error": str(exc)[:300]})
        await stack.aclose()
        raise SystemExit(1) from None
    processors = build(settings, publisher, registries, stack, vault, admission_clock=clock.now)
    # The purger runs beside the processors: it works from stored expiries only.
    purger = build_purger(settings, publisher, registries, vault[0], clock)
    await run_service(settings, processors, stack, background=[purger.run])


if __name__ == "__main__":
    settings = IntakeSettings()
    main_entry(settings, main(settings))
