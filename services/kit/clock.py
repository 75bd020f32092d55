"""A trusted clock: the Kafka broker's, read from the LogAppendTime it stamps on a record.

The clock topic (``frs.clock``, ``message.timestamp.type=LogAppendTime``) makes the broker
overwrite every record's timestamp with its own time when it appends it, and the produce
response carries that time back (aiokafka: ``RecordMetadata.timestamp`` with
``timestamp_type == 1``). The broker stamped the record at some instant between our send and
its ack, so at any later monotonic instant ``t`` the broker's time lies in

    [stamp + (t - acked) * (1 - DRIFT),  stamp + 1 ms + (t - sent) * (1 + DRIFT)]

``time.monotonic()`` carries the sample forward: a step of the local wall clock changes
nothing, and DRIFT covers the rate error of the monotonic clock itself (the kernel slews it
by at most 500 ppm). Whoever must never act early (the purger) takes the lower bound.

A topic left at CreateTime would hand our own timestamp back as the broker's: a sample is
refused unless the broker says it stamped the record itself."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.catalog import BROKER_CLOCK
from services.kit.publisher import Publisher

log = logging.getLogger("frs.clock")

LOG_APPEND_TIME = 1  # RecordMetadata.timestamp_type when the broker set the timestamp
DRIFT = 500e-6  # largest frequency correction the kernel applies to the monotonic clock

# Write one record to the clock topic and return the broker's append time, ms since epoch.
Stamp = Callable[[], Awaitable[int]]


class ClockUnavailable(RuntimeError):
    """No usable sample of the broker's clock (never taken, refused, or too old)."""


@dataclass(frozen=True)
class ClockSample:
    broker_ms: int  # the broker's LogAppendTime (truncated to the millisecond)
    sent: float  # monotonic, just before the send
    acked: float  # monotonic, just after the ack

    def bounds(self, at: float) -> tuple[datetime, datetime]:
        """The broker's time at monotonic instant ``at`` lies within these."""
        stamp = datetime.fromtimestamp(self.broker_ms / 1000, UTC)
        lower = stamp + timedelta(seconds=max(0.0, at - self.acked) * (1 - DRIFT))
        upper = stamp + timedelta(milliseconds=1,
                                  seconds=max(0.0, at - self.sent) * (1 + DRIFT))
        return lower, upper


def kafka_stamp(publisher: Publisher, service: str, topic: str = BROKER_CLOCK.name) -> Stamp:
    """A Stamp over the service's own idempotent producer (acks=all). The record holds the
    service's name only: nothing personal, nothing secret."""
    key = service.encode()
    value = json.dumps({"service": service}).encode()

    async def stamp() -> int:
        meta = await (await publisher.send_raw(topic, key, value, []))
        if meta.timestamp_type != LOG_APPEND_TIME or meta.timestamp is None:
            raise ClockUnavailable(f"{topic} did not return the broker's LogAppendTime; "
                                   "run `frs topics create` to fix its configuration")
        return int(meta.timestamp)

    return stamp


class BrokerClock:
    """Samples the broker's clock at most every ``resample_s``; reads are extrapolated from
    the last sample with the monotonic clock, so they cost nothing and never block."""

    def __init__(self, stamp: Stamp, *, resample_s: float = 30.0, max_age_s: float = 300.0,
                 timeout_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._stamp = stamp
        self.resample_s = resample_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._monotonic = monotonic
        self.last: ClockSample | None = None

    async def sample(self) -> ClockSample:
        """Take a sample now; ClockUnavailable when the broker does not answer in time."""
        sent = self._monotonic()
        try:
            broker_ms = await asyncio.wait_for(self._stamp(), self.timeout_s)
        except ClockUnavailable:
            raise
        except Exception as exc:  # timeout, refused, unreachable: all mean "no sample"
            raise ClockUnavailable(f"no broker clock sample: {type(exc).__name__}") from exc
        self.last = ClockSample(broker_ms, sent, self._monotonic())
        return self.last

    async def refresh(self) -> bool:
        """Resample when the last sample is older than ``resample_s``. A failure is logged
        and leaves the last sample in place (it stays valid, only less precise)."""
        age = self.age()
        if age is not None and age < self.resample_s:
            return True
        try:
            await self.sample()
        except ClockUnavailable as exc:
            log.warning("broker clock sample failed", extra={"error": str(exc)[:200],
                                                             "sample_age_s": age})
            return False
        return True

    def age(self) -> float | None:
        return None if self.last is None else self._monotonic() - self.last.acked

    def fresh(self) -> bool:
        age = self.age()
        return age is not None and age <= self.max_age_s

    def bounds(self) -> tuple[datetime, datetime]:
        if self.last is None:
            raise ClockUnavailable("the broker's clock has not been sampled")
        return self.last.bounds(self._monotonic())

    def now(self) -> datetime:
        """The lower bound: the broker's time is surely at least this."""
        return self.bounds()[0]
