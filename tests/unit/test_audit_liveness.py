"""The liveness invariant (clearance_without_end) with time injected: every provider a
PolicyCleared lists reaches an end, and its probe settles, by the answer deadline plus
the audit's grace; otherwise one ComplianceViolation per probe and provider."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.envelope import decode, encode
from schemas.events import (
    Candidate,
    CandidatesReceived,
    ClearedProvider,
    ComplianceViolation,
    DecisionInputs,
    DispatchFailed,
    DispatchFailure,
    Event,
    ImagePurged,
    Invariant,
    NoResponse,
    PolicyCleared,
    PolicyRequest,
    ProbeSettled,
    ProviderDispatched,
    ProviderRecord,
    PurgeReason,
    RegistryVersions,
    ReviewRequested,
)
from schemas.types import OutboundField, Purpose, Transport
from services.audit import handlers
from services.audit.app import CompleteUntil
from services.audit.invariants import LIVENESS_GRACE_S, Invariants, InvariantSettings
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from tests.unit.fakes import FakeClock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
D = "0" * 64
GRACE = 30.0
FIELDS = [OutboundField.PHOTO, OutboundField.AGENT_ID, OutboundField.REQUEST_REF]
LIVENESS = Invariant.CLEARANCE_WITHOUT_END


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def cleared(pid: str, *providers: str, inputs: list[ProviderRecord] | None = None
            ) -> PolicyCleared:
    decision = None if inputs is None else DecisionInputs(
        request=PolicyRequest(agent_id="a-1", case_id="C-1", purpose=Purpose.FINANCIAL_FRAUD,
                              roi_refs=["ROI-1"], nexus=[], unedited_attestation=True),
        evaluated_at=T0, providers=inputs)
    return PolicyCleared(probe_id=pid, case_id="C-1",
                         cleared=[ClearedProvider(provider_id=p, transport=Transport.HTTPS,
                                                  fields=FIELDS) for p in providers],
                         policy_digest=D, registry_versions=RegistryVersions(), decided_at=T0,
                         inputs=decision)


def dispatched(pid: str, provider: str, due_s: float) -> ProviderDispatched:
    return ProviderDispatched(probe_id=pid, provider_id=provider, dispatch_id=f"d-{pid}",
                              transport=Transport.HTTPS, fields_sent=FIELDS,
                              request_ref="ref", sent_at=T0, response_due_at=at(due_s),
                              deletion_due_at=at(86400))


def answered(pid: str, provider: str) -> CandidatesReceived:
    return CandidatesReceived(probe_id=pid, provider_id=provider, channel="webhook",
                              candidates=[Candidate(rank=1, score=0.9, score_scale="0-1",
                                                    gallery="g", candidate_ref="c-1")],
                              threshold=0.0, list_size=1, algorithm="a", algorithm_version="1",
                              received_at=at(5))


def settled(pid: str, answered: list[str] | None = None, failed: list[str] | None = None,
            no_response: list[str] | None = None) -> ProbeSettled:
    return ProbeSettled(probe_id=pid, answered=answered or [], failed=failed or [],
                        no_response=no_response or [], settled_at=at(6))


def registry(provider: str, deadline_s: int) -> ProviderRecord:
    return ProviderRecord(provider_id=provider, name=provider.upper(), kind="federal",
                          transport=Transport.HTTPS, endpoint="https://x",
                          response_deadline_s=deadline_s, updated_at=T0)


class Rig:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.clock = FakeClock(T0)
        self.open()

    def open(self) -> None:
        self.store = AuditStore(self.directory)
        self.inv = Invariants(self.store, InvariantSettings(30, 60, liveness_grace_s=GRACE),
                              self.clock)

    def restart(self) -> None:
        self.store.close()
        self.open()

    def feed(self, *events: Event) -> list[str]:
        """Each event as the audit service gets it; returns their CloudEvent ids."""
        ids = []
        for event in events:
            rec = encode(event, "/frs/test", time=T0)
            env = decode(rec.headers, rec.key, rec.value)
            out = asyncio.run(handlers.on_record(
                "frs.t", 0, self.store.size, rec.value, env,
                handlers.AuditPorts(self.store, self.inv), rec.headers))
            assert not [v for v in out if isinstance(v, ComplianceViolation)
                        and v.invariant == LIVENESS], "liveness is judged on the timer only"
            ids.append(env.id)
        self.store.commit()
        return ids

    def tick(self, seconds: float) -> list[ComplianceViolation]:
        self.clock.at(seconds)
        out = [v for v in self.inv.tick() if v.invariant == LIVENESS]
        self.store.commit()
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "audit")


def test_answered_but_never_settled_is_a_violation_once(rig: Rig) -> None:
    """The reported bug: the tracker counted the probe answered and never settled it."""
    (clearance, *_) = rig.feed(cleared("p1", "fed-ngi"), dispatched("p1", "fed-ngi", 60),
                               answered("p1", "fed-ngi"))
    rig.feed(cleared("ok", "fed-ngi"), dispatched("ok", "fed-ngi", 60),
             answered("ok", "fed-ngi"), settled("ok", answered=["fed-ngi"]))
    assert rig.tick(60 + GRACE - 1) == []
    (v,) = rig.tick(60 + GRACE)
    assert (v.probe_id, v.offending_event_id) == ("p1", f"{clearance}/fed-ngi")
    assert "fed-ngi ended (answered) but the probe did not settle" in v.detail
    assert v.detected_at == at(60 + GRACE)
    assert rig.tick(60 + GRACE + 1) == []
    # Restarted on the same store: the obligation is remembered as reported.
    rig.restart()
    assert rig.tick(3600) == []


def test_a_silent_provider_without_no_response_is_a_violation(rig: Rig) -> None:
    rig.feed(cleared("p1", "fed-ngi"), dispatched("p1", "fed-ngi", 60))
    (v,) = rig.tick(60 + GRACE)
    assert "no answer, NoResponse or DispatchFailed" in v.detail


@pytest.mark.parametrize("end", ["no_response", "failed", "settled_first", "review"])
def test_every_end_discharges_the_obligation(rig: Rig, end: str) -> None:
    events: list[Event] = [cleared("p1", "fed-ngi"), dispatched("p1", "fed-ngi", 60)]
    if end == "no_response":
        events += [NoResponse(probe_id="p1", provider_id="fed-ngi", deadline=at(60)),
                   settled("p1", no_response=["fed-ngi"])]
    elif end == "failed":
        events = [cleared("p1", "fed-ngi"),
                  DispatchFailed(probe_id="p1", provider_id="fed-ngi",
                                 reason=DispatchFailure.SUSPENDED, detail="x", failed_at=T0),
                  settled("p1", failed=["fed-ngi"])]
    elif end == "settled_first":  # topics interleave: the settlement is consumed first
        events = [settled("p1", answered=["fed-ngi"]), *events]
    else:  # the examiner's pace is not the machine's liveness
        events += [answered("p1", "fed-ngi"),
                   ReviewRequested(probe_id="p1", reason="policy", requested_at=at(7))]
    rig.feed(*events)
    assert rig.tick(86400) == []


def test_an_end_of_the_provider_alone_still_owes_the_settlement(rig: Rig) -> None:
    rig.feed(cleared("p1", "fed-ngi"),
             DispatchFailed(probe_id="p1", provider_id="fed-ngi",
                            reason=DispatchFailure.RETRIES_EXHAUSTED, detail="x", failed_at=T0))
    (v,) = rig.tick(3600 + GRACE)  # no dispatch: the registry's default deadline
    assert "ended (failed) but the probe did not settle" in v.detail


def test_a_purge_before_dispatch_is_no_end(rig: Rig) -> None:
    # Dispatch must still say DispatchFailed(image_purged); silence is a stall.
    rig.feed(registry("fed-ngi", 60), cleared("p1", "fed-ngi"),
             ImagePurged(probe_id="p1", vault_ref="v/p1", reason=PurgeReason.CASE_CLOSED,
                         expires_at=at(3600), purged_at=at(1)))
    (v,) = rig.tick(60 + GRACE)
    assert v.probe_id == "p1"


def test_each_provider_waits_for_its_own_deadline_and_the_last_for_settlement(
        rig: Rig) -> None:
    (clearance,) = rig.feed(cleared("p1", "fast", "slow"))
    rig.feed(dispatched("p1", "fast", 60), dispatched("p1", "slow", 600),
             answered("p1", "fast"))
    assert rig.tick(60 + GRACE + 1) == []  # fast answered; slow's deadline is still open
    found = rig.tick(600 + GRACE)
    assert sorted(v.offending_event_id for v in found) == [f"{clearance}/fast",
                                                           f"{clearance}/slow"]


def test_the_dispatch_deadline_overrides_the_clearance_estimate(rig: Rig) -> None:
    rig.feed(registry("fed-ngi", 60), cleared("p1", "fed-ngi"))
    # Retries sent it late: the tracker times NoResponse from the dispatch's deadline.
    rig.feed(dispatched("p1", "fed-ngi", 500))
    assert rig.tick(60 + GRACE + 1) == []
    assert len(rig.tick(500 + GRACE)) == 1


@pytest.mark.parametrize(("source", "due_s"), [("inputs", 45), ("registry", 120),
                                               ("unknown", 3600)])
def test_the_deadline_before_dispatch_comes_from_the_bus(rig: Rig, source: str,
                                                         due_s: int) -> None:
    """The decision's inputs first, then the providers registry topic, then the
    registry's default: never another service's settings."""
    rig.feed(registry("fed-ngi", 120))
    inputs = [registry("fed-ngi", 45)] if source == "inputs" else None
    provider = "elsewhere" if source == "unknown" else "fed-ngi"
    rig.feed(cleared("p1", provider, inputs=inputs))
    assert rig.tick(due_s + GRACE - 1) == []
    assert len(rig.tick(due_s + GRACE)) == 1


def test_a_dispatch_without_clearance_is_not_this_rules_business(rig: Rig) -> None:
    rig.feed(dispatched("p1", "fed-ngi", 60))
    assert rig.tick(86400) == []


def test_the_grace_is_a_documented_audit_setting() -> None:
    field = AuditSettings.model_fields["liveness_grace_s"]
    assert field.default == LIVENESS_GRACE_S == InvariantSettings(1, 1).liveness_grace_s
    assert field.description
    assert AuditSettings(liveness_grace_s=7).invariant_settings().liveness_grace_s == 7


class FakeMarks:
    """Marks are numbers; the consumer has read up to ``read``; ``None`` when the ends
    cannot be had (no assignment yet, the broker slow)."""

    def __init__(self) -> None:
        self.read = 0
        self.committed = 0
        self.next: int | None = None

    async def mark(self) -> object:
        return self.next

    async def reached(self, mark: object) -> bool:
        assert isinstance(mark, int)
        return mark <= self.read

    async def committed_past(self, mark: object) -> bool:
        """The group's commits (every instance's share, durable) lag this one's reads."""
        assert isinstance(mark, int)
        return mark <= self.committed


def test_liveness_is_judged_only_as_of_a_time_the_log_is_complete_until() -> None:
    marks, clock = FakeMarks(), FakeClock(T0)
    complete = CompleteUntil(marks, clock)

    def advance(seconds: float) -> datetime | None:
        clock.at(seconds)
        asyncio.run(complete.advance())
        return complete.take()

    assert advance(1) is None  # no ends to be had: nothing is known complete
    marks.next = 10
    assert advance(2) is None  # ends taken at 2s; not read up to them yet
    marks.next = 20
    assert advance(3) is None  # still behind: the 2s mark stays, no new one
    marks.read = 15
    assert advance(4) == at(2)  # read past the ends taken at 2s (not at 4s)
    assert complete.take() is None  # judged once
    marks.read = 20
    assert advance(5) == at(4)  # the mark taken when the last one was reached


def test_a_lagging_audit_takes_no_unread_settlement_for_a_missing_one(rig: Rig) -> None:
    """Catching up: the clearance is read, its settlement (published in time, another
    topic) is not yet. Judged as of when the log was complete, nothing is overdue."""
    rig.feed(cleared("p1", "fed-ngi"), dispatched("p1", "fed-ngi", 60),
             answered("p1", "fed-ngi"))
    rig.clock.at(86400)  # the audit's clock, a day on
    assert rig.inv.liveness(complete_until=at(10)) == []
    rig.feed(settled("p1", answered=["fed-ngi"]))
    assert rig.inv.liveness(complete_until=at(86400)) == []


def test_with_many_instances_complete_means_committed_by_the_group() -> None:
    """On PostgreSQL each audit instance reads a share; what this one has read says
    nothing of the others' shares: the group's committed offsets do."""
    marks, clock = FakeMarks(), FakeClock(T0)
    complete = CompleteUntil(marks, clock, by_group=True)

    def advance(seconds: float) -> datetime | None:
        clock.at(seconds)
        asyncio.run(complete.advance())
        return complete.take()

    marks.next = 10
    assert advance(1) is None
    marks.read = 50  # this instance is far ahead; another's share is not committed yet
    assert advance(2) is None
    marks.committed = 10
    assert advance(3) == at(1)
    # Taken but not judged (the queue not sequenced to its end): judged on a later tick,
    # and a newer time that came meanwhile wins over it.
    complete.put_back(at(1))
    assert complete.take() == at(1)
    marks.next, marks.committed = 30, 30
    assert advance(4) == at(3)
    complete.put_back(at(3))
    assert advance(5) == at(4)


def test_a_dispatch_is_judged_for_its_clearance_as_of_complete_not_the_clock(
        rig: Rig) -> None:
    """A lagging audit (its decisions partition read by a restarted instance, half a
    minute behind the dispatch topic) must not flag a dispatch whose clearance it has not
    read yet: the rule waits until the log is complete past the dispatch."""
    rig.feed(dispatched("p1", "fed-ngi", 60))  # seen at T0 (the rig's clock)
    rig.clock.at(600)  # the clock is far past the 30 s grace
    found = [v.invariant for v in rig.inv.deadline_rules(at(20))]
    assert Invariant.DISPATCH_WITHOUT_CLEARANCE not in found  # complete only until 20 s
    rig.feed(cleared("p1", "fed-ngi"))  # read at last
    assert rig.inv.deadline_rules(at(600)) == []
    # With no clearance at all it is still caught, once the log is complete past the grace.
    rig.clock.at(0)
    rig.feed(dispatched("p2", "fed-ngi", 60))
    assert rig.inv.deadline_rules(at(29)) == []
    assert [v.invariant for v in rig.inv.deadline_rules(at(31))] == [
        Invariant.DISPATCH_WITHOUT_CLEARANCE]
