"""TTL purge with crypto-shredding (REQ-TTL).

The purger works only from the expiries stored in the vault index, never from in-memory
timers, so a restart loses nothing. Each sweep:
1. moves the expiry of every live object of a closed case (cases registry) to now;
2. for each object past expiry: marks it purging, deletes the ciphertext, destroys the
   wrapped data key, publishes ImagePurged (and waits for the broker's ack), marks it
   announced. Every step is recorded, so a sweep cut short by a crash is finished by
   the next one: at worst one ImagePurged is published twice, never zero times.
3. sets a gauge of objects still past expiry (zero when the purger keeps up)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from prometheus_client import Counter, Gauge

from schemas.events import CaseRecord, Event, ImagePurged, PurgeReason
from services.intake.vault import Vault

log = logging.getLogger("frs.intake.purge")


@dataclass(frozen=True)
class PurgeMetrics:
    objects: Gauge
    past_expiry: Gauge
    purged: Counter
    sweep_failures: Counter


@cache
def purge_metrics() -> PurgeMetrics:
    return PurgeMetrics(
        objects=Gauge("frs_intake_vault_objects", "Vault objects holding an image (not purged)."),
        past_expiry=Gauge("frs_intake_vault_objects_past_expiry",
                          "Vault objects whose expiry has passed and are not yet purged."),
        purged=Counter("frs_intake_images_purged_total",
                       "Images purged (ciphertext deleted and data key destroyed), by reason.",
                       ["reason"]),
        sweep_failures=Counter("frs_intake_purge_sweep_failures_total",
                               "Purge sweeps that stopped on an error (retried next sweep)."),
    )


class Purger:
    def __init__(
        self,
        vault: Vault,
        cases: Callable[[], Mapping[str, CaseRecord]],
        publish: Callable[[Sequence[Event]], Awaitable[None]],
        clock: Callable[[], datetime],
        *,
        interval_s: float = 60.0,
        gauge_interval_s: float = 5.0,
        fault_kill_mid_purge: int = 0,
    ) -> None:
        self.vault = vault
        self.cases = cases
        self.publish = publish
        self.clock = clock
        self.interval_s = interval_s
        self.gauge_interval_s = gauge_interval_s
        self.fault_kill_mid_purge = fault_kill_mid_purge
        self.metrics = purge_metrics()
        self._shredded = 0

    def close_cases(self, now: datetime) -> int:
        """Expire now every live object of a case the registry shows closed."""
        cases = self.cases()
        moved = 0
        for case_id in self.vault.index.live_case_ids():
            record = cases.get(case_id)
            if record is not None and record.status == "closed":
                moved += self.vault.index.expire_case(case_id, now)
        return moved

    async def sweep(self) -> list[ImagePurged]:
        now = self.clock()
        moved = self.close_cases(now)
        index = self.vault.index
        due = index.due(now)
        self.metrics.past_expiry.set(index.count_past_expiry(now))
        announced: list[ImagePurged] = []
        for entry in due:
            reason = entry.purge_reason or PurgeReason.EXPIRED.value
            done = self.vault.purge(entry.ref, reason, now)
            self._shredded += 1
            if self.fault_kill_mid_purge and self._shredded >= self.fault_kill_mid_purge:
                # Fault injection for restart tests: shredded, not yet announced.
                log.warning("fault injection: SIGKILL mid-sweep", extra={"ref": entry.ref})
                os.kill(os.getpid(), signal.SIGKILL)
            assert done.purged_at is not None
            event = ImagePurged(
                probe_id=done.probe_id, vault_ref=done.ref, object_kind=done.kind,
                reason=PurgeReason(done.purge_reason or reason),
                expires_at=done.expires_at, purged_at=done.purged_at,
            )
            await self.publish([event])
            index.mark_announced(done.ref)
            self.metrics.purged.labels(event.reason.value).inc()
            log.info("image purged", extra={"probe_id": done.probe_id,
                                            "reason": event.reason.value})
            announced.append(event)
        self.refresh_gauges()
        if due or moved:
            log.info("purge sweep done", extra={"purged": len(announced),
                                                "case_closed_moved": moved})
        return announced

    def refresh_gauges(self) -> None:
        """Between sweeps too: an object that expires now is visible to operators now,
        not at the next sweep (and a purger that keeps failing stays visible)."""
        index = self.vault.index
        self.metrics.past_expiry.set(index.count_past_expiry(self.clock()))
        self.metrics.objects.set(index.count_stored())

    async def run(self) -> None:
        """Sweep now, then every ``interval_s``, until cancelled; gauges every
        ``gauge_interval_s``."""
        log.info("purger started", extra={"interval_s": self.interval_s})
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + self.interval_s
                try:
                    await self.sweep()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Storage or broker trouble: keep the state, try again next sweep.
                    self.metrics.sweep_failures.inc()
                    log.warning("purge sweep failed", extra={"error": type(exc).__name__})
            else:
                self.refresh_gauges()
            await asyncio.sleep(max(0.0, min(self.gauge_interval_s, next_sweep - loop.time())))
