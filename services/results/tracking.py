"""Per-probe tracking as pure state transitions: which providers a probe expects, which
answered, failed or never answered, whether an examiner must review, which deletion
receipts are owed. ``apply`` takes the state and one event and returns the new state and
the events to emit; ``due`` finds deadlines that have passed. No I/O here: the store
(``store.py``) keeps the state durable and the app wires both to the bus.

Settlement rule: a probe settles once its cleared provider list is known (PolicyCleared)
and every provider on it is final (answered, failed or no response), and, when review is
required and there is at least one candidate, once the examiner's ReviewCompleted is in.
It settles exactly once: ``settled`` is part of the durable state."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import (
    CandidatesReceived,
    DeletionConfirmed,
    DeletionOverdue,
    DispatchFailed,
    Event,
    NoResponse,
    PolicyCleared,
    ProbeSettled,
    ProviderDispatched,
    ProviderRecord,
    ReviewCompleted,
    ReviewRequested,
)

ProviderStatus = Literal["expected", "answered", "failed", "no_response"]
DeletionStatus = Literal["none", "pending", "confirmed", "overdue"]
FINAL: frozenset[str] = frozenset({"answered", "failed", "no_response"})

# Not ProbeSubmitted: the clearance's review_required already holds the request's own
# (the policy gate ORs it in), so the tracker need not read every intake outcome and purge.
TrackedEvent = (
    PolicyCleared | ProviderDispatched | DispatchFailed | CandidatesReceived
    | NoResponse | ReviewCompleted | DeletionConfirmed | DeletionOverdue
)
TRACKED_TYPES: tuple[type[Event], ...] = (
    PolicyCleared, ProviderDispatched, DispatchFailed, CandidatesReceived,
    NoResponse, ReviewCompleted, DeletionConfirmed, DeletionOverdue,
)


class ProviderTrack(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: ProviderStatus = "expected"
    request_ref: str | None = None
    response_due_at: datetime | None = None
    deletion_due_at: datetime | None = None
    deletion: DeletionStatus = "none"
    candidates: int = 0


class ProbeState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probe_id: str
    cleared: list[str] | None = None
    providers: dict[str, ProviderTrack] = Field(default_factory=dict)
    review_reasons: list[str] = Field(default_factory=list)
    review: Literal["none", "requested", "completed"] = "none"
    settled: bool = False

    def open_deadlines(self) -> dict[str, datetime]:
        """Deadlines still open, by ``deadline_key`` of the event each would emit."""
        out: dict[str, datetime] = {}
        for pid, t in self.providers.items():
            if t.status == "expected" and t.response_due_at is not None:
                out[f"{NoResponse.TYPE}/{pid}"] = t.response_due_at
            if t.deletion == "pending" and t.deletion_due_at is not None:
                out[f"{DeletionOverdue.TYPE}/{pid}"] = t.deletion_due_at
        return out

    def next_due(self, acted: Collection[str] = ()) -> datetime | None:
        """Earliest deadline still open (and not in ``acted``), for the store's index."""
        dues = [at for key, at in self.open_deadlines().items() if key not in acted]
        return min(dues) if dues else None


# How close to a provider's response deadline an answer must not be applied on arrival:
# the deadline job's tick (1 s) and clock skew between hosts, with room.
DEADLINE_MARGIN = timedelta(seconds=5)


def applies_on_arrival(state: ProbeState, provider_id: str, now: datetime) -> bool:
    """Whether an answer's candidates may be applied as the answer arrives, ahead of what
    is already on frs.results.events. Not once the provider's response deadline is near
    or past: the deadline job may have sent its NoResponse there already, and the two
    must then be applied in that topic's order (its first one wins), so the candidates
    wait for their read-back. An answer on time and in time takes the fast path."""
    track = state.providers.get(provider_id)
    if track is None or track.status != "expected" or track.response_due_at is None:
        return True
    return now < track.response_due_at - DEADLINE_MARGIN


def deadline_key(event: NoResponse | DeletionOverdue) -> str:
    """Which deadline an event of ``due`` reports: a sweep acts on each key once."""
    return f"{event.TYPE}/{event.provider_id}"


def _track(state: ProbeState, provider_id: str) -> ProviderTrack:
    return state.providers.setdefault(provider_id, ProviderTrack())


def _flag(state: ProbeState, reason: str) -> None:
    if reason not in state.review_reasons:
        state.review_reasons.append(reason)


def apply(
    state: ProbeState, event: TrackedEvent, provider: ProviderRecord | None, now: datetime
) -> tuple[ProbeState, list[Event]]:
    """One transition. Idempotent: a redelivered event changes nothing and emits nothing."""
    state = state.model_copy(deep=True)
    if isinstance(event, PolicyCleared):
        state.cleared = sorted({c.provider_id for c in event.cleared})
        for pid in state.cleared:
            _track(state, pid)
        if event.review_required:
            _flag(state, "policy")
    elif isinstance(event, ProviderDispatched):
        track = _track(state, event.provider_id)
        track.request_ref = event.request_ref
        track.response_due_at = event.response_due_at
        track.deletion_due_at = event.deletion_due_at
        if track.deletion == "none":
            track.deletion = "pending"  # the photo left: a deletion receipt is owed
        if provider is not None and provider.requires_review:
            _flag(state, f"provider:{event.provider_id}")
    elif isinstance(event, DispatchFailed):
        track = _track(state, event.provider_id)
        if track.status == "expected":
            track.status = "failed"
    elif isinstance(event, CandidatesReceived):
        track = _track(state, event.provider_id)
        if track.status == "expected":
            track.status = "answered"
            track.candidates = event.list_size
    elif isinstance(event, NoResponse):
        track = _track(state, event.provider_id)
        if track.status == "expected":
            track.status = "no_response"
    elif isinstance(event, ReviewCompleted):
        state.review = "completed"
    elif isinstance(event, DeletionConfirmed):
        _track(state, event.provider_id).deletion = "confirmed"
    elif isinstance(event, DeletionOverdue):
        track = _track(state, event.provider_id)
        if track.deletion == "pending":
            track.deletion = "overdue"
    return state, _settle(state, now)


def _settle(state: ProbeState, now: datetime) -> list[Event]:
    if state.settled or state.cleared is None:
        return []
    if any(t.status not in FINAL for t in state.providers.values()):
        return []
    has_candidates = any(t.candidates > 0 for t in state.providers.values())
    if state.review_reasons and has_candidates and state.review != "completed":
        if state.review == "none":
            state.review = "requested"
            return [ReviewRequested(probe_id=state.probe_id,
                                    reason=",".join(state.review_reasons)[:256],
                                    requested_at=now)]
        return []
    state.settled = True
    by = {s: sorted(p for p, t in state.providers.items() if t.status == s)
          for s in ("answered", "failed", "no_response")}
    return [ProbeSettled(probe_id=state.probe_id, answered=by["answered"],
                         failed=by["failed"], no_response=by["no_response"], settled_at=now)]


def due(
    state: ProbeState, now: datetime, suspend: bool
) -> list[NoResponse | DeletionOverdue]:
    """Deadlines that passed: NoResponse for silent providers, DeletionOverdue for
    missing receipts. The tracker consumes these back to change its state."""
    out: list[NoResponse | DeletionOverdue] = []
    for pid, t in sorted(state.providers.items()):
        if t.status == "expected" and t.response_due_at is not None and t.response_due_at <= now:
            out.append(NoResponse(probe_id=state.probe_id, provider_id=pid,
                                  deadline=t.response_due_at))
        if t.deletion == "pending" and t.deletion_due_at is not None and t.deletion_due_at <= now:
            out.append(DeletionOverdue(probe_id=state.probe_id, provider_id=pid,
                                       due_at=t.deletion_due_at, provider_suspended=suspend))
    return out
