"""TTL purge with crypto-shredding (REQ-TTL).

The purger works only from the expiries stored in the vault index, never from in-memory
timers, so a restart loses nothing. Each sweep:
1. moves the expiry of every live object of a closed case (cases registry) to now;
2. for each object past expiry: marks it purging, deletes the ciphertext, destroys the
   wrapped data key, publishes ImagePurged (and waits for the broker's ack), marks it
   announced. Every step is recorded, so a sweep cut short by a crash is finished by
   the next one: at worst one ImagePurged is published twice, never zero times. Every
   step is a conditional write in the index, and the announcement is claimed there, so
   instances purging the same object at once announce it once.
3. sets a gauge of objects still past expiry (zero when the purger keeps up);
4. destroys the vault's epoch key-encryption keys that are over and wrap no stored
   object's key (services/vault/epochs.py): copies of the index taken before a purge
   (dumps, backups, WAL) hold wrapped keys that nothing can unwrap from then on.

"Past expiry" is judged by the broker's clock (services/kit/clock.py), never by the local
one: a local clock running fast would purge early, one running slow would keep images too
long. The purger takes the lower bound of the broker's time, so nothing is purged before
its expiry, and measures how far the local clock is off (gauge, warning)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from prometheus_client import Counter, Gauge

from schemas.events import CaseRecord, Event, ImagePurged, PurgeReason
from services.kit.app import Job
from services.kit.clock import BrokerClock
from services.vault import Vault, VaultEntry

log = logging.getLogger("frs.intake.purge")


@dataclass(frozen=True)
class PurgeMetrics:
    objects: Gauge
    past_expiry: Gauge
    purged: Counter
    sweep_failures: Counter
    sweeps_skipped: Counter
    clock_skew: Gauge


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
        sweeps_skipped=Counter("frs_intake_purge_sweeps_skipped_total",
                               "Purge sweeps skipped for want of a recent sample of the "
                               "broker's clock (retried next sweep)."),
        clock_skew=Gauge("frs_intake_clock_skew_seconds",
                         "Local clock minus the broker's clock, seconds (positive: fast)."),
    )


class Purger:
    """``clock`` is the local clock. With ``trusted`` (the service always passes the
    broker's clock) expiry is judged by ``trusted`` alone and ``clock`` is only measured
    against it; without it (unit tests, tools) ``clock`` is taken as true time."""

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
        trusted: BrokerClock | None = None,
        skew_warn_s: float = 5.0,
    ) -> None:
        self.vault = vault
        self.cases = cases
        self.publish = publish
        self.clock = clock
        self.interval_s = interval_s
        self.gauge_interval_s = gauge_interval_s
        self.fault_kill_mid_purge = fault_kill_mid_purge
        self.trusted = trusted
        self.skew_warn_s = skew_warn_s
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

    async def trusted_now(self) -> datetime | None:
        """The time to judge expiry by, or None: skip this sweep.

        Without a recent broker sample the sweep is skipped rather than run on the local
        clock: a skipped sweep is retried at the next interval (and the broker being out
        of reach, the purges could not be announced anyway), while an early purge cannot
        be undone. A sample up to ``max_age_s`` old still serves: the monotonic clock
        carries it forward within known bounds."""
        if self.trusted is None:
            return self.clock()
        await self.trusted.refresh()
        if self.trusted.last is None:
            self.metrics.sweeps_skipped.inc()
            log.warning("purge sweep skipped: the broker's clock was never sampled")
            return None
        if not self.trusted.fresh():
            # The lower bound stays valid however old the sample (the monotonic clock
            # carries it forward), so images are still destroyed on time while the broker
            # is out of reach; only their announcements wait for it.
            age = self.trusted.age()
            log.warning("purging on an old sample of the broker's clock",
                        extra={"sample_age_s": None if age is None else round(age, 1)})
        lower, upper = self.trusted.bounds()
        skew = (self.clock() - (lower + (upper - lower) / 2)).total_seconds()
        self.metrics.clock_skew.set(skew)
        if abs(skew) > self.skew_warn_s:
            log.warning("local clock disagrees with the broker's",
                        extra={"skew_s": round(skew, 3), "warn_above_s": self.skew_warn_s})
        return lower

    async def sweep(self) -> list[ImagePurged]:
        now = await self.trusted_now()
        if now is None:
            return []
        moved = self.close_cases(now)
        index = self.vault.index
        due = index.due(now)
        self.metrics.past_expiry.set(index.count_past_expiry(now))
        # Destroy first, every due object, each on its own: an object that will not go
        # (a store refusing one delete) or a broker out of reach must not hold back the
        # rest. Announcements follow; an unannounced purge is announced by a later sweep.
        shredded: list[VaultEntry] = []
        for entry in due:
            reason = entry.purge_reason or PurgeReason.EXPIRED.value
            try:
                shredded.append(self.vault.purge(entry.ref, reason, now, checkpoint=False))
            except Exception as exc:
                self.metrics.sweep_failures.inc()
                log.warning("purge failed", extra={"ref": entry.ref,
                                                   "error": type(exc).__name__})
                continue
            self._shredded += 1
            if self.fault_kill_mid_purge and self._shredded >= self.fault_kill_mid_purge:
                # Fault injection for restart tests: shredded, not yet announced.
                log.warning("fault injection: SIGKILL mid-sweep", extra={"ref": entry.ref})
                os.kill(os.getpid(), signal.SIGKILL)
        if shredded and not index.checkpoint():
            log.warning("purges not announced: the vault index is still being read, its "
                        "log not yet truncated", extra={"purged": len(shredded)})
            shredded = []
        announced: list[ImagePurged] = []
        for done in shredded:
            if done.state != "purged" or done.purged_at is None:
                continue
            event = ImagePurged(
                probe_id=done.probe_id, vault_ref=done.ref, object_kind=done.kind,
                reason=PurgeReason(done.purge_reason or PurgeReason.EXPIRED.value),
                expires_at=done.expires_at, purged_at=done.purged_at,
            )
            # Claimed first: of two instances that both saw it purged, one announces.
            with index.announcing(done.ref) as ours:
                if ours:
                    await self.publish([event])
            if not ours:
                continue
            self.metrics.purged.labels(event.reason.value).inc()
            log.info("image purged", extra={"probe_id": done.probe_id,
                                            "reason": event.reason.value})
            announced.append(event)
        self.refresh_gauges()
        self.destroy_epochs(now)
        if due or moved:
            log.info("purge sweep done", extra={"purged": len(announced),
                                                "case_closed_moved": moved})
        return announced

    def destroy_epochs(self, now: datetime) -> None:
        """After the purges: a key epoch still holding an object is kept (that object's
        purge is behind, and the past-expiry gauge shows it), so order does not matter
        for safety, only for how soon the key goes."""
        try:
            destroyed = self.vault.destroy_expired_epochs(now)
        except Exception as exc:
            self.metrics.sweep_failures.inc()
            log.warning("epoch keys not destroyed (retried next sweep)",
                        extra={"error": type(exc).__name__})
            return
        if destroyed:
            log.info("key epochs destroyed", extra={"epochs": destroyed})

    def refresh_gauges(self) -> None:
        """Between sweeps too: an object that expires now is visible to operators now,
        not at the next sweep (and a purger that keeps failing stays visible)."""
        index = self.vault.index
        if self.trusted is None:
            self.metrics.past_expiry.set(index.count_past_expiry(self.clock()))
        elif self.trusted.last is not None:
            # The lower bound stays valid however old the sample: no broker call here.
            self.metrics.past_expiry.set(index.count_past_expiry(self.trusted.now()))
        self.metrics.objects.set(index.count_stored())

    async def tick(self) -> None:
        """One sweep; storage or broker trouble keeps the state for the next one."""
        try:
            await self.sweep()
        except Exception:
            self.metrics.sweep_failures.inc()
            raise

    async def gauges(self) -> None:
        self.refresh_gauges()

    def jobs(self) -> list[Job]:
        """The sweep every ``interval_s``, the gauges every ``gauge_interval_s``."""
        return [Job("purge sweep", self.interval_s, self.tick),
                Job("vault gauges", self.gauge_interval_s, self.gauges)]
