"""Results service: ``build(settings)`` declares its route, its deadline job and its
inbound channels (HTTPS webhook, SMTP inbox, each when configured).

One route, ``frs-results-tracker``: it normalizes ProviderAnswered (every inbound channel)
into CandidatesReceived or ProviderResponseRejected and tracks each probe (dispatches,
failures, answers, reviews, deletion receipts) in its ``Tracker`` (SQLite, or PostgreSQL
with FRS_STATE_URL) committed before its offsets, and settles probes. An answer's
candidates and the settlement they complete leave in one produce request: normalizing in
the tracker saves each probe a consumer's delivery, a produce request and a hop (the
normalizer's group ``frs-results`` did it apart until issue 21; the tracker starts where
that group stopped on ``frs.provider.responses``). Near or past the provider's response
deadline an answer's candidates are applied on their read-back instead, in order with the
deadline job's NoResponse on ``frs.results.events``.
The deadline job emits NoResponse and DeletionOverdue (and, when configured, a
ProviderSuspensionRequested: results may suspend a provider, nothing else about it).

Why the kit's Processor and SQLite rather than faust (tried first on the pinned broker):
see services/results/README.md."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer
from prometheus_client import Counter, Gauge

from schemas.catalog import (
    DISPATCH_EVENTS,
    POLICY_DECISIONS,
    PROVIDER_RESPONSES,
    RESULTS_EVENTS,
)
from schemas.envelope import Envelope
from schemas.events import (
    CandidatesReceived,
    DeletionOverdue,
    Event,
    ProviderAnswered,
    ProviderRecord,
    ProviderSuspensionRequested,
    SuspensionReason,
)
from schemas.types import utcnow
from services.kit.app import Context, Job, Server, ServiceApp, Wiring
from services.kit.fencing import PgLeases
from services.kit.kafka import client_options
from services.kit.publisher import Publisher
from services.kit.reader import all_partitions
from services.kit.registry import Registries
from services.kit.routing import Route, dlq_for
from services.kit.state import PostgresState, open_state
from services.results import handlers, tracking
from services.results.mailbox import start_mailbox
from services.results.pg_store import PgNonceStore, PgRequestRefs, PgTracker
from services.results.settings import ResultsSettings
from services.results.store import Arrivals, Nonces, RefLookup, Tracker, TrackerStore
from services.results.webhook import start_webhook

log = logging.getLogger("frs.results")

REVIEWS_PENDING = Gauge("frs_results_reviews_pending",
                        "Probes waiting for a trained examiner's review.")
DELETIONS_OVERDUE = Gauge("frs_results_deletion_receipts_overdue",
                          "Provider deletion receipts past their deadline and still missing.")
DEADLINES_MISSED = Counter("frs_results_deadlines_missed_total",
                           "NoResponse and DeletionOverdue events emitted, by type.", ["type"])

TRACKED_TOPICS = (POLICY_DECISIONS, DISPATCH_EVENTS, RESULTS_EVENTS, PROVIDER_RESPONSES)
# The group that normalized provider answers before the tracker did (upgrade: where the
# tracker starts on their topic); retired (services/kit/routing.RETIRED_GROUPS).
FORMER_NORMALIZER = "frs-results"
# Every tracked event is keyed by its probe id: with as many partitions in each topic, the
# kit's assignor (services/kit/assignor.py) gives one instance partition i of all four, so
# one instance (one tracker) holds all of a probe's events and no two write its state at
# once (round robin, aiokafka's default, splits them). A group still on round robin or
# range is stopped whole, not rolled, to switch: aiokafka cannot offer two assignors.
if len({t.partitions for t in TRACKED_TOPICS}) != 1:
    raise RuntimeError("the tracker's topics must have as many partitions each")




def build(settings: ResultsSettings) -> ServiceApp:
    def wire(ctx: Context) -> Wiring:
        ports = handlers.ResultsPorts(registries=ctx.registries, clock=utcnow)
        # FRS_STATE_URL: on PostgreSQL the tracker, the inbound channels' nonces and the
        # request refs (written by the tracker, read by the channels) are shared by every
        # instance, and no state file is made under FRS_STATE_DIR.
        shared = open_state(settings.state(), settings.state_password_file, ctx.stack,
                            name="results")
        store: Tracker
        inbound: dict[str, tuple[Nonces, RefLookup] | None] = {"nonces": None,
                                                               "mail_replies": None}
        if isinstance(shared, PostgresState):
            store = PgTracker(shared.pool)
            refs = PgRequestRefs(shared.pool)
            inbound = {table: (PgNonceStore(shared.pool, table), refs) for table in inbound}
        else:
            store = TrackerStore(settings.tracker_path())
        ctx.stack.callback(store.close)

        # A probe's records on different topics are handled concurrently (one key per
        # partition): each read-apply-write of its state is one at a time.
        busy: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        arrivals = Arrivals()  # the webhook waits on the commits of its refs

        async def track(event: Any, _env: Envelope) -> list[Event]:
            return await advance(event)

        async def answered(event: ProviderAnswered, _env: Envelope) -> list[Event]:
            # The candidates are applied here, unless their deadline is near (then on their
            # read-back); reading them back after that is a repeat.
            return await handlers.on_provider_answered_tracked(event, ports, on_arrival)

        async def on_arrival(made: CandidatesReceived) -> list[Event]:
            return await advance(made, on_arrival=True)

        async def advance(event: Any, on_arrival: bool = False) -> list[Event]:
            lock = busy.get(event.probe_id)
            if lock is None:
                lock = busy[event.probe_id] = asyncio.Lock()
            async with lock:
                state = await store.get(event.probe_id)
                if on_arrival and not tracking.applies_on_arrival(
                        state, event.provider_id, utcnow()):
                    return []  # left to the read-back, in order with a NoResponse
                pid = getattr(event, "provider_id", None)
                provider = ctx.registries.providers.get(pid) if pid else None
                new, out = tracking.apply(state, event, provider, utcnow())
                if new != state:
                    await store.put(new)  # committed in before_commit, after `out` is acked
                    arrivals.written(t.request_ref for t in new.providers.values()
                                     if t.request_ref is not None)
            return out

        async def durable() -> None:
            await store.commit()
            arrivals.committed()

        tracker = Route(
            "results", "frs-results-tracker", tuple(t.name for t in TRACKED_TOPICS),
            {**dict.fromkeys(tracking.TRACKED_TYPES, track), ProviderAnswered: answered},
            dlq_for("results"),
            before_commit=durable,
            # A batch's states are committed under the leases of its partitions: a stale
            # instance's commit is refused (services/kit/fencing.py).
            leases=PgLeases(shared.pool, "results") if isinstance(shared, PostgresState)
            else None,
            offsets_from={PROVIDER_RESPONSES.name: FORMER_NORMALIZER},
        )
        deadlines = DeadlineWatch(settings, store, ctx.registries, ctx.publisher)

        async def armed() -> None:
            await deadlines.arm(tracker.group_id, tracker.topics)

        servers = []
        if settings.webhook_cert_file is not None:
            servers.append(Server("webhook", lambda stack: _start(
                partial(start_webhook, arrivals=arrivals), settings, ctx, stack,
                inbound["nonces"])))
        if settings.smime_cert_file is not None:
            servers.append(Server("smtp inbox", lambda stack: _start(
                start_mailbox, settings, ctx, stack, inbound["mail_replies"])))
        return Wiring(routes=[tracker],
                      jobs=[Job("deadlines", settings.tick_s, deadlines.tick, ready=armed)],
                      servers=servers,
                      preflight=[shared.preflight] if isinstance(shared, PostgresState)
                      else [])

    return ServiceApp(settings, wire)


async def _start(start: Any, settings: ResultsSettings, ctx: Context,
                 stack: AsyncExitStack, stores: tuple[Nonces, RefLookup] | None) -> None:
    await start(settings, ctx.publisher, ctx.registries, stack, stores)


async def backlog_done(bootstrap: str, group: str, topics: Sequence[str],
                       poll_s: float = 0.5) -> None:
    """Wait until ``group`` has committed everything that was in ``topics`` when called.

    Until then the tracker's state is incomplete (a receipt may still be in the backlog),
    and a deadline fired from it could wrongly suspend a provider. (A partition ending in
    a transaction marker never reaches its end offset by commits: the caller bounds the
    wait.)"""
    consumer = AIOKafkaConsumer(**client_options(bootstrap=bootstrap), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await all_partitions(consumer, topics)
        end = await consumer.end_offsets(parts)
        pending = [tp for tp in parts if end[tp] > 0]
        while pending:
            pending = [tp for tp in pending if (await consumer.committed(tp) or 0) < end[tp]]
            if pending:
                await asyncio.sleep(poll_s)
    finally:
        await consumer.stop()


class DeadlineWatch:
    """Emits NoResponse / DeletionOverdue for passed deadlines. The tracker consumes them
    back (that is what settles the provider). Each deadline is reported once: the store
    hands each due probe to one sweep (on PostgreSQL, of all instances) with the
    deadlines already reported, and records those this one reports. After a crash between
    the send and that record, or a restart on SQLite, a deadline may be reported again;
    the tracker ignores the repeat. It is armed once the tracker has caught up with the
    backlog."""

    def __init__(self, settings: ResultsSettings, store: Tracker,
                 registries: Registries, publisher: Publisher) -> None:
        self.settings = settings
        self.store = store
        self.registries = registries
        self.publisher = publisher

    async def arm(self, group: str, topics: Sequence[str]) -> None:
        try:
            await asyncio.wait_for(backlog_done(self.settings.kafka_bootstrap, group, topics),
                                   self.settings.timer_arm_max_wait_s)
        except TimeoutError:
            log.warning("deadline timer armed before the tracker caught up",
                        extra={"waited_s": self.settings.timer_arm_max_wait_s})
        log.info("deadline timer armed", extra={"group": group})

    async def tick(self) -> None:
        reviews, overdue = await self.store.open_counts()
        REVIEWS_PENDING.set(reviews)
        DELETIONS_OVERDUE.set(overdue)
        now = utcnow()

        async def report(state: tracking.ProbeState, acted: frozenset[str]) -> list[str]:
            due = [e for e in tracking.due(state, now, self.settings.suspend_on_deletion_overdue)
                   if tracking.deadline_key(e) not in acted]
            out: list[Event] = []
            for event in due:
                if isinstance(event, DeletionOverdue) and event.provider_suspended:
                    suspension = _suspension(self.registries.providers.get(event.provider_id),
                                             event)
                    out += [event, suspension] if suspension is not None else [
                        event.model_copy(update={"provider_suspended": False})]
                else:
                    out.append(event)
            await self.publisher.publish(out)  # a failure: the next tick retries
            for event in due:
                DEADLINES_MISSED.labels(event.TYPE).inc()
                log.info("deadline passed", extra={"type": event.TYPE,
                                                   "provider": event.provider_id})
            return [tracking.deadline_key(e) for e in due]

        await self.store.act_on_due(now, report)


def _suspension(provider: ProviderRecord | None, overdue: DeletionOverdue
                ) -> ProviderSuspensionRequested | None:
    if provider is None:
        return None
    # REQ-DELETION-RECEIPT: every registry view applies it as a suspension at once, so
    # policy denies and dispatch refuses the provider until the operator re-activates it.
    return ProviderSuspensionRequested(provider_id=provider.provider_id,
                                       reason=SuspensionReason.DELETION_OVERDUE,
                                       probe_id=overdue.probe_id, requested_at=utcnow())
