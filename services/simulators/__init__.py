"""Provider simulators for tests, benchmarks and ``deploy/up.sh``: an HTTPS vendor and an
SMTP provider inbox. Never imported by service code."""


async def until_signalled() -> None:
    """Run a simulator process until SIGTERM or SIGINT (how tests and up.sh stop it)."""
    import asyncio
    import contextlib
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
