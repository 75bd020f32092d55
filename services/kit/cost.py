"""Where a probe's CPU goes: CPU seconds per step, counted by the services themselves.

``frs_step_cpu_seconds_total{step}`` is one counter per process with a fixed set of step
names (``STEPS``), so its cardinality is bounded. A step is timed with the calling
thread's CPU clock (``time.thread_time``) around a synchronous section: other asyncio
tasks cannot run inside it, so none of their CPU is counted into the step. Steps nest: a
step inside another counts only its own time, the outer one the rest (exclusive time),
so a section can be timed where it is written without double counting.

What no step covers is the process's CPU minus the sum of the steps ("other": the event
loop, aiokafka's fetch and produce tasks, logging, ...): ``frs bench pipeline`` works it
out from the process tree's CPU. Work done in another process (intake's image workers) is
timed there with ``collect()`` and handed back to be added with ``add_all``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

from prometheus_client import Counter

# Fixed names: the label's whole value set. "envelope": CloudEvent decode and model
# validation of an incoming record; "produce": encoding our outputs (the Kafka client's
# own work is "other"); "state": store reads and writes (SQLite statements with their
# fsyncs, PostgreSQL calls); "vault": the image store (encrypt, object write, index).
STEPS = ("decrypt", "decode", "detect", "reencode", "vault", "policy", "envelope",
         "produce", "state", "commit")

_local = threading.local()


@cache
def step_cpu() -> Counter:
    return Counter("frs_step_cpu_seconds_total",
                   "CPU seconds spent in each step of the work (thread CPU time of "
                   "synchronous sections, nested steps excluded), by step.", ["step"])


@cache
def _children() -> dict[str, Any]:
    # Every step exported from the start, at 0; looked up once (labels() takes a lock).
    return {name: step_cpu().labels(name) for name in STEPS}


def _frames() -> list[step]:
    frames: list[step] | None = getattr(_local, "frames", None)
    if frames is None:
        frames = _local.frames = []
    return frames


class step:
    """Count the CPU of the enclosed synchronous section into ``name``. Never put an
    ``await`` inside: the thread's CPU meanwhile would be other tasks'. A class, not a
    generator: it runs dozens of times per probe (about 2 us each)."""

    __slots__ = ("name", "nested", "start")

    def __init__(self, name: str) -> None:
        if name not in STEPS:
            raise ValueError(f"unknown step {name!r}")
        self.name = name
        self.nested = 0.0  # CPU of steps inside this one

    def __enter__(self) -> None:
        _frames().append(self)
        self.start = time.thread_time()

    def __exit__(self, *exc: object) -> None:
        spent = time.thread_time() - self.start
        frames = _frames()
        frames.pop()
        if frames:
            frames[-1].nested += spent
        _count(self.name, max(0.0, spent - self.nested))


def _count(name: str, seconds: float) -> None:
    tally: dict[str, float] | None = getattr(_local, "tally", None)
    if tally is not None:
        tally[name] = tally.get(name, 0.0) + seconds
    else:
        _children()[name].inc(seconds)


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Steps inside go into the returned dict instead of the counter: for work that runs
    in another process and reports its CPU back (``add_all`` there)."""
    outer = getattr(_local, "tally", None)
    tally: dict[str, float] = {}
    _local.tally = tally
    try:
        yield tally
    finally:
        _local.tally = outer


def add_all(spent: Mapping[str, float]) -> None:
    """Add CPU seconds measured elsewhere (another process), by step."""
    for name, seconds in spent.items():
        if name in STEPS and seconds > 0:
            _count(name, seconds)
