"""Oversight rules as plain functions over typed events and table state; no Kafka, no faust.

Two steps, as the app runs them:
- ``observe`` (keyed by probe, like every input topic): one event and the probe's facts so
  far (``ProbeFacts``, the probes table) give the probe's new facts and the observations
  the event makes about a subject: an agent, an original-image digest, a provider, a probe.
- ``judge`` (keyed by subject, after the app repartitions the observations): one
  observation and the subject's state (``SubjectState``, the subjects table) give its new
  state and the ``UsageAlert``s of every rule whose window went over its threshold.

Windows are computed here from event times (tumbling: one window per time; hopping: every
window of ``size`` starting on a multiple of ``step`` that holds the time), so a replay from
the topics (``frs oversight replay``) finds the same windows and the same alert ids.
Redelivery is harmless: an observation already in a subject's state changes nothing, and a
rule fires at most once per window (and not again in a window overlapping one it fired in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import (
    DeletionOverdue,
    Event,
    PolicyCleared,
    PolicyDenied,
    ProbeSubmitted,
    ProviderDispatched,
    ReviewCompleted,
    ReviewRequested,
    UsageAlert,
    UsageReason,
    UsageRule,
    usage_alert_id,
)

SubjectKind = Literal["agent", "image_digest", "provider", "probe"]
ObservationKind = Literal["search", "exigent", "submission", "denial", "send", "overdue",
                          "review_due"]
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)
MAX_EVIDENCE = 100


@dataclass(frozen=True)
class Limits:
    """The thresholds of every rule (from OversightSettings.limits())."""

    searches_per_hour: int = 20
    searches_per_day: int = 100
    distinct_cases: int = 5
    distinct_cases_window_s: int = 86400
    shopping_window_s: int = 3 * 86400
    provider_fanout: dict[str, int] | None = None
    provider_fanout_default: int = 3
    exigent_per_week: int = 3
    review_deadline_s: int = 3 * 86400
    deletion_overdue_share: float = 0.1
    deletion_overdue_min: int = 3

    def fanout_for(self, purpose: str | None) -> int:
        return (self.provider_fanout or {}).get(purpose or "", self.provider_fanout_default)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Observation(_Frozen):
    """What one event says about one subject (ids, digests, times; never an image)."""

    kind: ObservationKind
    subject_kind: SubjectKind
    subject: str
    event_id: str
    probe_id: str
    at: datetime
    case_id: str | None = None
    purpose: str | None = None
    nexus: tuple[str, ...] = ()
    provider_id: str | None = None

    @property
    def key(self) -> str:
        """The subjects table's key, and the repartition key."""
        return f"{self.subject_kind}:{self.subject}"

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.event_id}"


class ProbeFacts(_Frozen):
    """One probe as the oversight service knows it (the probes table's value)."""

    probe_id: str
    agent_id: str | None = None
    case_id: str | None = None
    purpose: str | None = None
    nexus: tuple[str, ...] = ()
    digest: str | None = None  # received_sha256: the original image's digest
    submission_id: str | None = None
    submitted_at: datetime | None = None
    denial_id: str | None = None
    denied_at: datetime | None = None
    # per provider: when it was sent and the ProviderDispatched id; and the DeletionOverdue
    # id (kept until its send is known: the topics are read in no set order)
    sends: dict[str, tuple[datetime, str]] = Field(default_factory=dict)
    overdue: dict[str, str] = Field(default_factory=dict)
    review_id: str | None = None
    review_requested_at: datetime | None = None
    review_completed_at: datetime | None = None


class Alerted(_Frozen):
    rule: UsageRule
    start: datetime
    end: datetime


class SubjectState(_Frozen):
    """A subject's observations still inside some window, and the windows it alerted in."""

    observations: tuple[Observation, ...] = ()
    alerted: tuple[Alerted, ...] = ()


# --- observe: probe-keyed -----------------------------------------------------------


def observe(event_id: str, event: Event, facts: ProbeFacts | None
            ) -> tuple[ProbeFacts | None, list[Observation]]:
    """The probe's facts after ``event`` and what the event says about subjects."""
    if isinstance(event, ProbeSubmitted):
        return _submitted(event_id, event, facts)
    if isinstance(event, PolicyDenied):
        known = facts or ProbeFacts(probe_id=event.probe_id)
        known = known.model_copy(update={"denial_id": event_id, "denied_at": event.decided_at})
        return known, _denial(known)
    if isinstance(event, PolicyCleared):
        agent = event.claim.agent_id if event.claim else facts.agent_id if facts else None
        if not event.exigent or agent is None:
            return facts, []
        return facts, [Observation(kind="exigent", subject_kind="agent", subject=agent,
                                   event_id=event_id, probe_id=event.probe_id,
                                   at=event.decided_at, case_id=event.case_id)]
    if isinstance(event, ProviderDispatched):
        return _dispatched(event_id, event, facts)
    if isinstance(event, DeletionOverdue):
        known = facts or ProbeFacts(probe_id=event.probe_id)
        known = known.model_copy(update={"overdue": {**known.overdue,
                                                     event.provider_id: event_id}})
        return known, _overdue(known, event.provider_id)
    if isinstance(event, ReviewRequested):
        known = facts or ProbeFacts(probe_id=event.probe_id)
        if known.review_requested_at is not None:
            return known, []  # the first request starts the deadline
        return known.model_copy(update={"review_id": event_id,
                                        "review_requested_at": event.requested_at}), []
    if isinstance(event, ReviewCompleted):
        known = facts or ProbeFacts(probe_id=event.probe_id)
        if known.review_completed_at is not None:
            return known, []
        return known.model_copy(update={"review_completed_at": event.completed_at}), []
    return facts, []


def _submitted(event_id: str, event: ProbeSubmitted, facts: ProbeFacts | None
               ) -> tuple[ProbeFacts, list[Observation]]:
    known = (facts or ProbeFacts(probe_id=event.probe_id)).model_copy(update={
        "agent_id": event.agent_id, "case_id": event.case_id, "purpose": str(event.purpose),
        "nexus": tuple(sorted(event.nexus)), "digest": event.received_sha256,
        "submission_id": event_id, "submitted_at": event.submitted_at})
    said = [
        Observation(kind="search", subject_kind="agent", subject=event.agent_id,
                    event_id=event_id, probe_id=event.probe_id, at=event.submitted_at,
                    case_id=event.case_id, purpose=known.purpose),
        Observation(kind="submission", subject_kind="image_digest",
                    subject=event.received_sha256, event_id=event_id,
                    probe_id=event.probe_id, at=event.submitted_at, case_id=event.case_id,
                    purpose=known.purpose, nexus=known.nexus),
    ]
    # What was consumed before the submission (other topics) is said now.
    return known, said + _denial(known) + [
        _digest_send(known, provider) for provider in sorted(known.sends)]


def _denial(known: ProbeFacts) -> list[Observation]:
    if known.denial_id is None or known.denied_at is None or known.digest is None:
        return []
    return [Observation(kind="denial", subject_kind="image_digest", subject=known.digest,
                        event_id=known.denial_id, probe_id=known.probe_id, at=known.denied_at,
                        case_id=known.case_id, purpose=known.purpose, nexus=known.nexus)]


def _dispatched(event_id: str, event: ProviderDispatched, facts: ProbeFacts | None
                ) -> tuple[ProbeFacts, list[Observation]]:
    known = facts or ProbeFacts(probe_id=event.probe_id)
    provider = event.provider_id
    known = known.model_copy(update={"sends": {**known.sends,
                                               provider: (event.sent_at, event_id)}})
    said = [Observation(kind="send", subject_kind="provider", subject=provider,
                        event_id=event_id, probe_id=event.probe_id, at=event.sent_at,
                        provider_id=provider)]
    if known.digest is not None:
        said.append(_digest_send(known, provider))
    return known, said + _overdue(known, provider)


def _digest_send(known: ProbeFacts, provider: str) -> Observation:
    assert known.digest is not None
    sent_at, event_id = known.sends[provider]
    return Observation(kind="send", subject_kind="image_digest", subject=known.digest,
                       event_id=event_id, probe_id=known.probe_id, at=sent_at,
                       purpose=known.purpose, provider_id=provider)


def _overdue(known: ProbeFacts, provider: str) -> list[Observation]:
    """An overdue receipt counts in the day its probe was sent to the provider."""
    if provider not in known.overdue or provider not in known.sends:
        return []
    return [Observation(kind="overdue", subject_kind="provider", subject=provider,
                        event_id=known.overdue[provider], probe_id=known.probe_id,
                        at=known.sends[provider][0], provider_id=provider)]


def review_due(facts: ProbeFacts, now: datetime, limits: Limits) -> Observation | None:
    """A review request with no review by its deadline, once ``now`` is past it (the app's
    timer asks with the wall clock, the replay with the time it runs)."""
    if facts.review_requested_at is None or facts.review_id is None:
        return None
    due = facts.review_requested_at + timedelta(seconds=limits.review_deadline_s)
    done = facts.review_completed_at
    if now < due or (done is not None and done <= due):
        return None
    return Observation(kind="review_due", subject_kind="probe", subject=facts.probe_id,
                       event_id=facts.review_id, probe_id=facts.probe_id,
                       at=facts.review_requested_at, case_id=facts.case_id)


# --- windows ------------------------------------------------------------------------

Window = tuple[datetime, datetime]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tumbling(at: datetime, size: timedelta) -> list[Window]:
    start = _EPOCH + size * ((at - _EPOCH) // size)
    return [(start, start + size)]


def hopping(at: datetime, size: timedelta, step: timedelta) -> list[Window]:
    """Every window [s, s + size) with s a multiple of ``step`` that holds ``at``, oldest
    first."""
    last = _EPOCH + step * ((at - _EPOCH) // step)
    starts = [last - step * k for k in range(size // step)]
    return [(s, s + size) for s in reversed(starts) if s <= at < s + size]


# --- judge: subject-keyed -----------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    rule: UsageRule
    reason: UsageReason
    window: Window
    count: int
    threshold: float
    evidence: Sequence[Observation]
    total: int | None = None


Rule = Callable[[Observation, Sequence[Observation], Limits], list[Hit]]


def _inside(seen: Sequence[Observation], kind: str, window: Window) -> list[Observation]:
    return sorted((o for o in seen if o.kind == kind and window[0] <= o.at < window[1]),
                  key=lambda o: (o.at, o.event_id))


def _over(rule: UsageRule, reason: UsageReason, kind: str, windows: list[Window],
          seen: Sequence[Observation], threshold: float,
          measure: Callable[[list[Observation]], int]) -> list[Hit]:
    hits = []
    for window in windows:
        members = _inside(seen, kind, window)
        value = measure(members)
        if value > threshold:
            hits.append(Hit(rule, reason, window, value, threshold, members))
    return hits


def searches_per_hour(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    return _over(UsageRule.SEARCHES_PER_HOUR, UsageReason.COUNT_OVER_LIMIT, "search",
                 tumbling(obs.at, HOUR), seen, lim.searches_per_hour, len)


def searches_per_day(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    return _over(UsageRule.SEARCHES_PER_DAY, UsageReason.COUNT_OVER_LIMIT, "search",
                 hopping(obs.at, DAY, HOUR), seen, lim.searches_per_day, len)


def distinct_cases(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    size = timedelta(seconds=lim.distinct_cases_window_s)
    return _over(UsageRule.DISTINCT_CASES, UsageReason.DISTINCT_OVER_LIMIT, "search",
                 hopping(obs.at, size, size / 24), seen, lim.distinct_cases,
                 lambda members: len({o.case_id for o in members}))


def exigent_per_week(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    return _over(UsageRule.EXIGENT_PER_WEEK, UsageReason.COUNT_OVER_LIMIT, "exigent",
                 tumbling(obs.at, WEEK), seen, lim.exigent_per_week, len)


def provider_fanout(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    return _over(UsageRule.PROVIDER_FANOUT, UsageReason.DISTINCT_OVER_LIMIT, "send",
                 hopping(obs.at, DAY, HOUR), seen, lim.fanout_for(obs.purpose),
                 lambda members: len({o.provider_id for o in members}))


def purpose_shopping(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    """The same original image submitted again after a denial of it, within the window,
    under another purpose, case or nexus."""
    size = timedelta(seconds=lim.shopping_window_s)
    hits = []
    for denial in sorted((o for o in seen if o.kind == "denial"), key=lambda o: o.at):
        window = (denial.at, denial.at + size)
        again = [s for s in _inside(seen, "submission", window)
                 if s.probe_id != denial.probe_id and s.at > denial.at
                 and (s.purpose, s.case_id, s.nexus) != (denial.purpose, denial.case_id,
                                                         denial.nexus)]
        if again:
            hits.append(Hit(UsageRule.PURPOSE_SHOPPING, UsageReason.RESUBMITTED_AFTER_DENIAL,
                            window, len(again), 0, [denial, *again]))
    return hits


def review_missing(obs: Observation, seen: Sequence[Observation], lim: Limits) -> list[Hit]:
    window = (obs.at, obs.at + timedelta(seconds=lim.review_deadline_s))
    return [Hit(UsageRule.REVIEW_MISSING, UsageReason.REVIEW_PAST_DEADLINE, window, 1, 0,
                [obs])]


def deletion_overdue_share(obs: Observation, seen: Sequence[Observation], lim: Limits
                           ) -> list[Hit]:
    """Per provider and day of sending: overdue receipts over a share of the sends."""
    hits = []
    for window in tumbling(obs.at, DAY):
        overdue = _inside(seen, "overdue", window)
        if len(overdue) < lim.deletion_overdue_min:
            continue  # the usual case: no need to count the sends
        sends = sum(1 for o in seen if o.kind == "send" and window[0] <= o.at < window[1])
        if sends and len(overdue) / sends > lim.deletion_overdue_share:
            hits.append(Hit(UsageRule.DELETION_OVERDUE_SHARE, UsageReason.SHARE_OVER_LIMIT,
                            window, len(overdue), lim.deletion_overdue_share, overdue,
                            total=sends))
    return hits


# Which rules an observation can move, by subject and kind.
RULES: dict[tuple[SubjectKind, ObservationKind], tuple[Rule, ...]] = {
    ("agent", "search"): (searches_per_hour, searches_per_day, distinct_cases),
    ("agent", "exigent"): (exigent_per_week,),
    ("image_digest", "submission"): (purpose_shopping,),
    ("image_digest", "denial"): (purpose_shopping,),
    ("image_digest", "send"): (provider_fanout,),
    ("provider", "send"): (deletion_overdue_share,),
    ("provider", "overdue"): (deletion_overdue_share,),
    ("probe", "review_due"): (review_missing,),
}
RULE_NAMES: dict[Rule, UsageRule] = {
    searches_per_hour: UsageRule.SEARCHES_PER_HOUR,
    searches_per_day: UsageRule.SEARCHES_PER_DAY,
    distinct_cases: UsageRule.DISTINCT_CASES,
    exigent_per_week: UsageRule.EXIGENT_PER_WEEK,
    purpose_shopping: UsageRule.PURPOSE_SHOPPING,
    provider_fanout: UsageRule.PROVIDER_FANOUT,
    deletion_overdue_share: UsageRule.DELETION_OVERDUE_SHARE,
    review_missing: UsageRule.REVIEW_MISSING,
}


def _horizons(lim: Limits) -> dict[str, timedelta]:
    """How long an observation of each kind can still count in some window of its rules."""
    return {
        "search": max(DAY, timedelta(seconds=lim.distinct_cases_window_s)),
        "exigent": WEEK,
        "submission": timedelta(seconds=lim.shopping_window_s),
        "denial": timedelta(seconds=lim.shopping_window_s),
        # an overdue receipt counts in the day of its send, and comes a deadline later
        "send": 3 * DAY,
        "overdue": 3 * DAY,
        "review_due": timedelta(0),
    }


def _overlaps(alerted: Sequence[Alerted], rule: UsageRule, window: Window) -> bool:
    return any(a.rule == rule and a.start < window[1] and window[0] < a.end for a in alerted)


class RuleFailed(Exception):
    """A rule raised: the app sends the observation's event to the DLQ with this reason."""

    def __init__(self, rule: UsageRule, cause: BaseException) -> None:
        super().__init__(f"rule {rule.value} failed: {type(cause).__name__}")
        self.rule = rule


def judge(obs: Observation, state: SubjectState | None, lim: Limits
          ) -> tuple[SubjectState, list[UsageAlert]]:
    """The subject's state with ``obs``, and the alerts of the windows it put over."""
    state = state or SubjectState()
    if any(o.event_id == obs.event_id and o.kind == obs.kind for o in state.observations):
        return state, []  # a redelivered observation
    newest = max([obs.at, *(o.at for o in state.observations)])
    oldest = {kind: newest - span for kind, span in _horizons(lim).items()}
    seen = tuple(o for o in (*state.observations, obs) if o.at >= oldest[o.kind])
    alerted = [a for a in state.alerted if a.end >= newest - 2 * WEEK]
    alerts: list[UsageAlert] = []
    for rule in RULES.get((obs.subject_kind, obs.kind), ()):
        try:
            hits = rule(obs, seen, lim)
        except Exception as exc:
            raise RuleFailed(RULE_NAMES[rule], exc) from exc
        for hit in hits:
            if _overlaps(alerted, hit.rule, hit.window):
                continue
            alerted.append(Alerted(rule=hit.rule, start=hit.window[0], end=hit.window[1]))
            alerts.append(_alert(obs, hit))
    return SubjectState(observations=seen, alerted=tuple(alerted)), alerts


def _alert(obs: Observation, hit: Hit) -> UsageAlert:
    evidence = list(hit.evidence)[:MAX_EVIDENCE]
    start, end = hit.window
    return UsageAlert(
        alert_id=usage_alert_id(hit.rule, obs.subject, start, end), rule=hit.rule,
        reason=hit.reason, subject_kind=obs.subject_kind, subject=obs.subject,
        window_start=start, window_end=end, count=hit.count, total=hit.total,
        threshold=hit.threshold, evidence_ids=[o.event_id for o in evidence],
        probe_ids=list(dict.fromkeys(o.probe_id for o in evidence)), observed_at=obs.at)


class MemoryTables:
    """The app's two tables as dicts: what the rules make of a sequence of events without
    faust (``frs oversight replay``, the bench's baseline checks, unit tests)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.probes: dict[str, ProbeFacts] = {}
        self.subjects: dict[str, SubjectState] = {}
        self.reviews_flagged: set[str] = set()

    def feed(self, event_id: str, event: Event) -> list[UsageAlert]:
        probe_id = getattr(event, "probe_id", None)
        if probe_id is None:
            return []
        facts, said = observe(event_id, event, self.probes.get(probe_id))
        if facts is not None:
            self.probes[probe_id] = facts
        return [alert for obs in said for alert in self.judge(obs)]

    def judge(self, obs: Observation) -> list[UsageAlert]:
        state, alerts = judge(obs, self.subjects.get(obs.key), self.limits)
        self.subjects[obs.key] = state
        return alerts

    def due(self, now: datetime) -> list[UsageAlert]:
        alerts = []
        for facts in list(self.probes.values()):
            obs = review_due(facts, now, self.limits)
            if obs is not None and facts.probe_id not in self.reviews_flagged:
                self.reviews_flagged.add(facts.probe_id)
                alerts += self.judge(obs)
        return alerts
