"""A purger whose clock runs 10 minutes fast or slow (injected clock), on a real vault and
the real broker: nothing may be purged before its expiry (in true time), nothing left
past expiry plus grace. The checker judges by true time, not by the times the purger
writes into its own ImagePurged events (a skewed clock would vouch for itself).

The purger is built as the intake builds it: the skewed local clock plus the broker's clock
(LogAppendTime samples on frs.clock). The broker runs on this machine, so its clock is true
time; the local clock the purger is handed is the one that lies."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from schemas.catalog import PROBE_EVENTS
from schemas.envelope import Envelope
from schemas.events import ImagePurged
from schemas.types import utcnow
from services.intake.purge import Purger
from services.kit.clock import BrokerClock, kafka_stamp
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.vault import (
    probe_ref,
)
from tests.integration.intake_support import open_vault

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SKEW = timedelta(minutes=10)
GRACE = timedelta(minutes=2)
# Expiries around true now, in minutes: some long past, some just past, some to come.
OFFSETS = (-30, -15, -9, -5, -3, -1, 1, 3, 5, 9, 15, 30)


def violations(expiries: dict[str, datetime], purged: set[str],
               now: datetime) -> dict[str, list[str]]:
    """True-time check: purged before expiry, or still stored past expiry plus grace."""
    return {
        "purged_early": sorted(p for p in purged if expiries[p] > now),
        "past_expiry": sorted(p for p, e in expiries.items()
                              if p not in purged and e + GRACE < now),
    }


def test_violations_check_can_fail() -> None:
    now = utcnow()
    expiries = {"a": now + timedelta(minutes=5), "b": now - timedelta(minutes=5)}
    assert violations(expiries, {"a"}, now) == {"purged_early": ["a"], "past_expiry": ["b"]}
    assert violations(expiries, {"b"}, now) == {"purged_early": [], "past_expiry": []}


@pytest.mark.parametrize("skew", [SKEW, -SKEW], ids=["fast", "slow"])
async def test_purger_with_a_skewed_clock_keeps_true_time(
    kafka_bootstrap: str, tmp_path: Path, skew: timedelta
) -> None:
    vault = open_vault(tmp_path)
    run = uuid.uuid4().hex[:8]
    now = utcnow()
    expiries: dict[str, datetime] = {}
    for i, minutes in enumerate(OFFSETS):
        probe = f"prb-{run}-{i}"
        expiries[probe] = now + timedelta(minutes=minutes)
        vault.put(probe_id=probe, case_id="CASE-1", data=b"\xff\xd8 sealed test bytes",
                  created_at=now - timedelta(hours=1), expires_at=expiries[probe])
    async with Publisher(kafka_bootstrap, "/chaos/purger") as pub:
        trusted = BrokerClock(kafka_stamp(pub, "intake"))
        purger = Purger(vault, dict, pub.publish, lambda: utcnow() + skew, trusted=trusted)
        await purger.sweep()
    true_now = utcnow()
    announced = {d.event.probe_id for _r, d in await read_topic(kafka_bootstrap,
                                                                [PROBE_EVENTS.name])
                 if isinstance(d, Envelope) and isinstance(d.event, ImagePurged)
                 and d.event.probe_id in expiries}
    stored = {p for p in expiries if (e := vault.index.get(probe_ref(p))) is not None
              and e.state == "stored"}
    # What the bus says and what the vault holds agree.
    assert announced == set(expiries) - stored
    found = violations(expiries, announced, true_now)
    assert found == {"purged_early": [], "past_expiry": []}, found
    # The purger saw its local clock for what it is.
    measured = REGISTRY.get_sample_value("frs_intake_clock_skew_seconds")
    assert measured == pytest.approx(skew.total_seconds(), abs=5)
