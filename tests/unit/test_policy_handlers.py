"""The policy handlers with in-memory registries and a fixed clock (no I/O but SQLite
in a temp dir for the review flags)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from schemas.decisions import key_id_for, unverified
from schemas.envelope import decode, encode
from schemas.events import (
    ExigentReviewOverdue,
    PolicyCleared,
    PolicyDenied,
    SupervisorReviewRecorded,
)
from schemas.types import MINIMAL_FIELDS
from services.intake.policy.engine import POLICY_DIR, PolicyEngine
from services.intake.policy.handlers import (
    PolicyPorts,
    ReviewPorts,
    on_decision_for_review,
    on_probe_submitted,
    on_supervisor_review,
    outcome,
    overdue_reviews,
    replay,
)
from services.intake.policy.reviews import ReviewStore
from services.kit.registry import Registries
from tests.factories import POLICY_KEY, trusted
from tests.unit.policy_fixtures import (
    NOW,
    PAST,
    agent,
    case,
    probe,
    provider,
    quality,
    state_provider,
)


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load()


def registries(*providers: object) -> Registries:
    reg = Registries()
    reg.apply(case(), 3)
    reg.apply(agent(), 5)
    reg.apply(agent(agent_id="sup-1", role="supervisor", supervisor_id=None), 6)
    for i, p in enumerate(providers or (provider(), state_provider())):
        reg.apply(p, 10 + i)  # type: ignore[arg-type]
    return reg


def ports(engine: PolicyEngine, reg: Registries) -> PolicyPorts:
    return PolicyPorts(registries=reg, clock=lambda: NOW, engine=engine, signing_key=POLICY_KEY)


async def test_cleared_lists_minimal_fields_and_denials(engine: PolicyEngine) -> None:
    reg = registries()
    [event] = await on_probe_submitted(probe(), ports(engine, reg))
    assert isinstance(event, PolicyCleared)
    assert [(c.provider_id, c.fields) for c in event.cleared] == [
        ("fed-ngi", list(MINIMAL_FIELDS))]
    assert set(MINIMAL_FIELDS) == {"photo", "agent_id", "request_ref"}
    assert [(d.provider_id, [r.rule_id for r in d.rules]) for d in event.denied] == [
        ("va-state", ["REQ-NEXUS"])]
    assert "nexus" in event.denied[0].rules[0].message
    assert event.policy_digest == engine.digest
    assert event.registry_versions.model_dump() == {"cases": 3, "agents": 6, "providers": 11,
                                                    "suspensions": -1}
    assert event.exigent is False and event.bypassed_rules == []
    assert event.inputs is not None and event.inputs.evaluated_at == NOW
    assert [p.provider_id for p in event.inputs.providers] == ["fed-ngi", "va-state"]


async def test_denied_when_no_provider_clears(engine: PolicyEngine) -> None:
    reg = registries(provider(status="suspended"), state_provider())
    [event] = await on_probe_submitted(probe(roi_refs=[]), ports(engine, reg))
    assert isinstance(event, PolicyDenied)
    rules = {d.provider_id: [r.rule_id for r in d.rules] for d in event.denied}
    assert rules == {"fed-ngi": ["REQ-LAST-RESORT", "REQ-PROVIDER"],
                     "va-state": ["REQ-LAST-RESORT", "REQ-NEXUS"]}
    assert all(r.message for d in event.denied for r in d.rules)


async def test_denied_when_registry_has_no_provider(engine: PolicyEngine) -> None:
    reg = Registries()
    reg.apply(case())
    [event] = await on_probe_submitted(probe(), ports(engine, reg))
    assert isinstance(event, PolicyDenied)
    assert event.denied[0].provider_id == "none"
    assert event.denied[0].rules[0].rule_id == "REQ-PROVIDER"


async def test_quality_report_reaches_the_policy(engine: PolicyEngine) -> None:
    [event] = await on_probe_submitted(probe(quality=quality(False)),
                                       ports(engine, registries(provider())))
    assert isinstance(event, PolicyDenied)
    assert [r.rule_id for r in event.denied[0].rules] == ["REQ-QUALITY"]


async def test_exigent_clearance_is_flagged_with_bypassed_rules(engine: PolicyEngine) -> None:
    [event] = await on_probe_submitted(
        probe(roi_refs=[], exigent=True, exigent_justification="imminent harm to a child",
              exigent_bypass=["REQ-LAST-RESORT", "REQ-PROVIDER"]),
        ports(engine, registries(provider())))
    assert isinstance(event, PolicyCleared)
    assert event.exigent is True
    assert event.bypassed_rules == ["REQ-LAST-RESORT"]


async def test_exigent_without_justification_is_denied(engine: PolicyEngine) -> None:
    [event] = await on_probe_submitted(probe(exigent=True),
                                       ports(engine, registries(provider())))
    assert isinstance(event, PolicyDenied)
    assert [r.rule_id for r in event.denied[0].rules] == ["REQ-EXIGENT"]


async def test_replay_from_the_encoded_event_gives_the_same_result(
        engine: PolicyEngine) -> None:
    reg = registries(provider(), state_provider(), provider(
        provider_id="old", attestation_valid_until=PAST))
    for p in (probe(), probe(probe_id="prb-2", roi_refs=[]), probe(
            probe_id="prb-3", nexus=["VA"], exigent=True, exigent_justification="why",
            exigent_bypass=["REQ-LAST-RESORT"], roi_refs=[])):
        [event] = await on_probe_submitted(p, ports(engine, reg))
        # Every decision leaves signed, over all of it: the wire copy verifies.
        assert isinstance(event, PolicyCleared | PolicyDenied) and event.signature
        record = encode(event, "/frs/policy")
        recorded = decode(record.headers, record.key, record.value).event
        assert isinstance(recorded, (PolicyCleared, PolicyDenied))
        assert unverified(recorded, {key_id_for(POLICY_KEY.public_key()): trusted()}) is None
        # The registries move on after the decision; replay must not read them.
        reg.apply(provider(status="suspended"), 99)
        replayed = replay(engine, recorded)
        assert outcome(replayed) == outcome(recorded)
        assert replayed.policy_digest == recorded.policy_digest
        assert replayed.registry_versions == recorded.registry_versions
        reg.apply(provider(), 100)


async def test_replay_with_a_changed_policy_differs(engine: PolicyEngine,
                                                    tmp_path: Path) -> None:
    [event] = await on_probe_submitted(probe(), ports(engine, registries(provider())))
    assert isinstance(event, PolicyCleared)
    policies = (POLICY_DIR / "policies.cedar").read_text()
    # A stricter policy: federal providers now need a nexus as well.
    stricter = policies.replace('resource.kind == "state_local" ||',
                                'resource.kind == "federal" || resource.kind == "state_local" ||')
    assert stricter != policies
    (tmp_path / "policies.cedar").write_text(stricter)
    (tmp_path / "frs.cedarschema").write_bytes((POLICY_DIR / "frs.cedarschema").read_bytes())
    changed = PolicyEngine.load(tmp_path)
    assert changed.digest != engine.digest
    replayed = replay(changed, event)
    assert isinstance(replayed, PolicyDenied)
    assert replayed.policy_digest != event.policy_digest


# --- exigent reviews ---------------------------------------------------------------


@pytest.fixture
def review_ports(tmp_path: Path) -> ReviewPorts:
    return ReviewPorts(store=ReviewStore(tmp_path / "reviews.sqlite"),
                       registries=registries(), clock=lambda: NOW,
                       review_window=timedelta(hours=24))


async def _exigent_clearance(engine: PolicyEngine, probe_id: str) -> PolicyCleared:
    [event] = await on_probe_submitted(
        probe(probe_id=probe_id, exigent=True, exigent_justification="imminent harm"),
        ports(engine, registries(provider())))
    assert isinstance(event, PolicyCleared) and event.exigent
    return event


async def test_review_flag_overdue_then_reviewed(engine: PolicyEngine,
                                                 review_ports: ReviewPorts) -> None:
    store = review_ports.store
    await on_decision_for_review(await _exigent_clearance(engine, "prb-a"), review_ports)
    await on_decision_for_review(await _exigent_clearance(engine, "prb-b"), review_ports)
    # A normal clearance is not flagged.
    [normal] = await on_probe_submitted(probe(probe_id="prb-c"),
                                        ports(engine, registries(provider())))
    assert isinstance(normal, PolicyCleared)
    await on_decision_for_review(normal, review_ports)
    assert await store.pending_count() == 2
    assert await overdue_reviews(store, NOW + timedelta(hours=23)) == []

    await on_supervisor_review(SupervisorReviewRecorded(
        probe_id="prb-a", supervisor_id="sup-1", approved=True, reviewed_at=NOW), review_ports)
    overdue = await overdue_reviews(store, NOW + timedelta(hours=25))
    assert overdue == [ExigentReviewOverdue(probe_id="prb-b",
                                            due_at=NOW + timedelta(hours=24))]
    await store.mark_reported("prb-b", NOW + timedelta(hours=25))
    assert await overdue_reviews(store, NOW + timedelta(hours=26)) == []  # reported once
    assert await store.pending_count() == 1
    status = await store.status("prb-a")
    assert status is not None and status["approved"] is True


async def test_gate_flags_its_exigent_clearances_itself(engine: PolicyEngine,
                                                      review_ports: ReviewPorts) -> None:
    # The gate flags before it sends (the reviews route reads no decision back).
    gate = PolicyPorts(registries=registries(provider()), clock=lambda: NOW, engine=engine,
                       signing_key=POLICY_KEY, reviews=review_ports)
    [exigent] = await on_probe_submitted(
        probe(probe_id="prb-e", exigent=True, exigent_justification="imminent harm"), gate)
    [normal] = await on_probe_submitted(probe(probe_id="prb-n"), gate)
    [denied] = await on_probe_submitted(probe(probe_id="prb-d", roi_refs=[], exigent=True,
                                              exigent_justification="imminent harm"), gate)
    assert isinstance(exigent, PolicyCleared) and exigent.exigent
    assert isinstance(normal, PolicyCleared) and not normal.exigent
    assert await review_ports.store.pending_count() == 1
    assert await review_ports.store.status("prb-n") is None
    claimed = await review_ports.store.claim_overdue(NOW + timedelta(hours=25),
                                                     timedelta(minutes=1))
    assert claimed == [("prb-e", NOW + timedelta(hours=24))]
    assert isinstance(denied, PolicyDenied)  # no bypass named: nothing cleared, no flag


async def test_review_by_a_non_supervisor_does_not_count(engine: PolicyEngine,
                                                         review_ports: ReviewPorts) -> None:
    await on_decision_for_review(await _exigent_clearance(engine, "prb-x"), review_ports)
    for who in ("agent-7", "nobody"):
        await on_supervisor_review(SupervisorReviewRecorded(
            probe_id="prb-x", supervisor_id=who, approved=True, reviewed_at=NOW),
            review_ports)
    assert await review_ports.store.pending_count() == 1


async def test_review_flags_survive_a_restart(engine: PolicyEngine, tmp_path: Path) -> None:
    path = tmp_path / "reviews.sqlite"
    first = ReviewPorts(store=ReviewStore(path), registries=registries(), clock=lambda: NOW,
                        review_window=timedelta(hours=1))
    await on_decision_for_review(await _exigent_clearance(engine, "prb-r"), first)
    assert isinstance(first.store, ReviewStore)
    first.store.close()
    again = ReviewStore(path)
    claimed = await again.claim_overdue(NOW + timedelta(hours=2), timedelta(minutes=1))
    assert [p for p, _ in claimed] == ["prb-r"]


async def test_inputs_cross_check_against_registry_history(engine: PolicyEngine) -> None:
    from services.intake.policy.handlers import check_inputs_against_registries

    history = [(0, case()), (0, agent()), (0, provider()), (1, state_provider()),
               (1, agent(training_valid_until=PAST))]
    reg = Registries()
    for offset, record in history:
        reg.apply(record, offset)
    [event] = await on_probe_submitted(probe(), ports(engine, reg))
    assert event.inputs is not None  # type: ignore[attr-defined]
    inputs, versions = event.inputs, event.registry_versions  # type: ignore[attr-defined]
    # Later updates (past the recorded versions) do not count against the snapshot.
    later = [*history, (2, provider(status="suspended")), (5, case(status="closed"))]
    assert check_inputs_against_registries(inputs, versions, later) == {
        "case:CASE-1": "match", "agent:agent-7": "match",
        "provider:fed-ngi": "match", "provider:va-state": "match"}
    # A doctored snapshot is caught; so is a provider it left out.
    doctored = inputs.model_copy(update={"providers": [provider(status="suspended")]})
    assert check_inputs_against_registries(doctored, versions, later) == {
        "case:CASE-1": "match", "agent:agent-7": "match",
        "provider:fed-ngi": "mismatch", "provider:va-state": "omitted"}
    # Compacted away: the topic keeps only a newer record of the case.
    compacted = [r for r in later if not (r[0] == 0 and r[1] == case())]
    assert check_inputs_against_registries(inputs, versions, compacted)[
        "case:CASE-1"] == "compacted"
