"""The one module of test helpers that wait or find ports: `wait_for` (and its async twin),
the waits built on it (log lines, records on topics, a consumer group's commits), the
metrics port a service logged, free ports."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from schemas.envelope import DecodeError, Envelope

if TYPE_CHECKING:  # Kafka is imported only by the waits that read it: conftest stays light
    from aiokafka import TopicPartition

    from services.kit.routing import RawRecord

T = TypeVar("T")
# What a wait was for, said when it times out: a text, or a function of the state then.
What = str | Callable[[], str]


def _timed_out(what: What, timeout: float) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout:g}s waiting for {text}")


def wait_for(check: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.2,
             what: What = "the condition") -> T:
    """Call ``check`` every ``interval`` seconds until it returns something true and return
    that; after ``timeout`` seconds fail with an AssertionError that says ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)


async def wait_for_async(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.2,
    what: What = "the condition",
) -> T:
    """`wait_for` inside an event loop: ``check`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)


# --- logs ---------------------------------------------------------------------------------

def log_text(path: Path) -> str:
    """The log so far ('' before the process has written it)."""
    return path.read_text(errors="replace") if path.exists() else ""


async def wait_log(path: Path, text: str, *,
                   timeout: float = 60.0,  # noqa: ASYNC109 - a polling deadline
                   interval: float = 0.2) -> str:
    """Until ``text`` is in the log at ``path``; returns the log."""
    def logged() -> str:
        log = log_text(path)
        return log if text in log else ""
    return await wait_for_async(logged, timeout=timeout, interval=interval,
                                what=lambda: f"{text!r} in {path}:\n{log_text(path)[-3000:]}")


def metrics_port(log: Path) -> int:
    """The /metrics port a service logged at its latest start (it binds port 0 in tests)."""
    for line in reversed(log_text(log).splitlines()):
        if '"service started"' in line:
            return int(json.loads(line)["metrics_port"])
    raise AssertionError(f"no metrics port in {log}")


# --- topics and consumer groups -----------------------------------------------------------

Found = list[tuple["RawRecord", Envelope | DecodeError]]


async def wait_records(
    bootstrap: str,
    topics: Sequence[str],
    predicate: Callable[[RawRecord, Envelope | DecodeError], bool],
    count: int = 1,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
) -> Found:
    """Read the topics until at least ``count`` records match, or fail after ``timeout``."""
    from services.kit.reader import read_topic

    found: Found = []

    async def enough() -> Found:
        nonlocal found
        found = [(r, d) for r, d in await read_topic(bootstrap, topics) if predicate(r, d)]
        return found if len(found) >= count else []

    return await wait_for_async(
        enough, timeout=timeout, interval=0.3,
        what=lambda: f"{count} matching records on {list(topics)}; saw {len(found)}")


def subject_is(subject: str) -> Callable[[RawRecord, Envelope | DecodeError], bool]:
    return lambda _r, d: isinstance(d, Envelope) and d.subject == subject


def events_of(found: Found) -> list[Envelope]:
    return [d for _r, d in found if isinstance(d, Envelope)]


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    from aiokafka import AIOKafkaConsumer

    from services.kit.reader import all_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await all_partitions(consumer, topics)
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def wait_committed(bootstrap: str, group: str, topics: Sequence[str],
                         timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a polling deadline
    """Until ``group`` has committed every partition of ``topics`` up to its end now."""
    from aiokafka.admin import AIOKafkaAdminClient

    ends = await end_offsets(bootstrap, topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    behind: list[TopicPartition] = []

    async def caught_up() -> bool:
        nonlocal behind
        committed = await admin.list_consumer_group_offsets(group)
        behind = [tp for tp, end in ends.items()
                  if end > 0 and (tp not in committed or committed[tp].offset < end)]
        return not behind

    try:
        await wait_for_async(caught_up, timeout=timeout, interval=0.5,
                             what=lambda: f"{group} to commit the end of {behind}")
    finally:
        await admin.close()


# --- ports --------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    """A port free now, from the kernel (for servers a test starts at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(size: int = 2) -> int:
    """A base port with ``size`` consecutive free ports, drawn below the kernel's ephemeral
    range: a broker binds them seconds later, and an ephemeral port can meanwhile become
    the local end of some outgoing connection (a cluster node once failed to bind so)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(10000, low - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def free_port_pair() -> int:
    """A port p with p+1 also free (the broker's controller listens on p+1)."""
    return free_port_block(2)
