"""BrokerClock: bounds from one sample, extrapolation by the monotonic clock, resampling,
and the refusals (no sample, a failed or hung broker, a CreateTime topic). Fakes only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from services.kit.clock import DRIFT, BrokerClock, ClockSample, ClockUnavailable, kafka_stamp

BROKER_T = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
BROKER_MS = int(BROKER_T.timestamp() * 1000)


class Mono:
    """A monotonic clock the test moves; the fake broker advances it by the round trip."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeBroker:
    """Stamps at the middle of a ``rtt`` round trip, in its own time ``broker_ms``."""

    def __init__(self, mono: Mono, rtt: float = 0.2) -> None:
        self.mono, self.rtt = mono, rtt
        self.broker_ms = BROKER_MS
        self.calls = 0
        self.fail: Exception | None = None

    async def __call__(self) -> int:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        self.mono.t += self.rtt / 2
        stamped = self.broker_ms
        self.mono.t += self.rtt / 2
        return stamped


def seconds(d: timedelta) -> float:
    return d.total_seconds()


def test_bounds_of_one_sample_hold_the_broker_time_and_widen_with_age() -> None:
    sample = ClockSample(BROKER_MS, sent=10.0, acked=10.4)
    lower, upper = sample.bounds(10.4)
    assert lower == BROKER_T  # at the ack the broker has at least reached its stamp
    # RTT (with the drift allowance) + 1 ms of timestamp truncation
    assert seconds(upper - BROKER_T) == pytest.approx(0.4 * (1 + DRIFT) + 0.001, abs=2e-6)
    lower, upper = sample.bounds(110.4)  # 100 s later
    assert seconds(lower - BROKER_T) == pytest.approx(100 * (1 - DRIFT))
    assert seconds(upper - BROKER_T) == pytest.approx(100.4 * (1 + DRIFT) + 0.001)
    # True broker time when it stamped at mid-trip: always inside.
    true = BROKER_T + timedelta(seconds=100.2)
    assert lower <= true <= upper


async def test_now_is_the_lower_bound_extrapolated_by_the_monotonic_clock() -> None:
    mono = Mono()
    clock = BrokerClock(FakeBroker(mono, rtt=0.2), monotonic=mono)
    with pytest.raises(ClockUnavailable):
        clock.now()
    await clock.sample()
    assert clock.now() == BROKER_T
    mono.t += 60
    assert seconds(clock.now() - BROKER_T) == pytest.approx(60 * (1 - DRIFT))
    lower, upper = clock.bounds()
    assert seconds(upper - lower) == pytest.approx(0.2 * (1 + DRIFT) + 0.001 + 60 * 2 * DRIFT,
                                                  abs=2e-6)


async def test_no_early_answer_whatever_the_round_trip_time() -> None:
    """The lower bound never passes the broker's true time, however the trip splits."""
    mono = Mono()
    for rtt in (0.0, 0.05, 1.5):
        broker = FakeBroker(mono, rtt)
        clock = BrokerClock(broker, monotonic=mono)
        start = mono.t
        await clock.sample()
        true_at_ack = BROKER_T + timedelta(seconds=mono.t - (start + rtt / 2))
        assert clock.now() <= true_at_ack <= clock.bounds()[1]


async def test_refresh_resamples_only_when_due_and_keeps_the_last_on_failure() -> None:
    mono = Mono()
    broker = FakeBroker(mono)
    clock = BrokerClock(broker, resample_s=30, max_age_s=300, monotonic=mono)
    assert await clock.refresh() and broker.calls == 1
    mono.t += 10
    assert await clock.refresh() and broker.calls == 1  # not due
    mono.t += 25
    broker.broker_ms += 35_000
    assert await clock.refresh() and broker.calls == 2
    kept = clock.last
    broker.fail = ConnectionError("broker down")
    mono.t += 31
    assert not await clock.refresh()
    assert clock.last is kept and clock.fresh()  # 31 s old: still serves
    mono.t += 300
    assert not clock.fresh()  # too old for the purger; the bound itself stays valid
    assert clock.now() < BROKER_T + timedelta(seconds=35 + 331)


async def test_a_hung_broker_is_no_sample() -> None:
    async def hang() -> int:
        await asyncio.sleep(3600)
        return 0

    clock = BrokerClock(hang, timeout_s=0.05)
    with pytest.raises(ClockUnavailable):
        await clock.sample()
    assert clock.last is None and not clock.fresh()


class FakePublisher:
    def __init__(self, timestamp: int | None, timestamp_type: int) -> None:
        self.meta = SimpleNamespace(timestamp=timestamp, timestamp_type=timestamp_type)
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send_raw(self, topic: str, key: bytes | None, value: bytes | None,
                       headers: Any) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(self.meta)
        return fut


async def test_kafka_stamp_takes_log_append_time_and_sends_only_the_service_name() -> None:
    pub = FakePublisher(BROKER_MS, 1)
    stamp = kafka_stamp(pub, "intake")  # type: ignore[arg-type]
    assert await stamp() == BROKER_MS
    assert pub.sent == [("frs.clock", b"intake", b'{"service": "intake"}')]


async def test_kafka_stamp_refuses_a_create_time_topic() -> None:
    """A CreateTime topic hands back our own clock's time: that is no broker sample."""
    clock = BrokerClock(kafka_stamp(FakePublisher(BROKER_MS, 0), "intake"))  # type: ignore[arg-type]
    with pytest.raises(ClockUnavailable, match="LogAppendTime"):
        await clock.sample()
    assert clock.last is None
