"""The history checker on hand-made histories: it passes a clean run and fails each kind
of broken promise it is meant to catch."""

from __future__ import annotations

from datetime import timedelta
from itertools import count

from schemas.envelope import Envelope, decode, encode
from schemas.events import (
    Candidate,
    CandidatesReceived,
    ClearedProvider,
    ComplianceViolation,
    DeletionConfirmed,
    DeletionOverdue,
    DispatchFailed,
    DispatchFailure,
    EncryptedImage,
    Event,
    ImagePurged,
    Invariant,
    NoResponse,
    PolicyCleared,
    PolicyDenied,
    ProbeRejected,
    ProbeRequested,
    ProbeSettled,
    ProbeSubmitted,
    ProviderDenial,
    ProviderDispatched,
    PurgeReason,
    RegistryVersions,
    RejectReason,
    ReviewCompleted,
)
from schemas.types import ImageSource, OutboundField, Purpose, Transport, probe_id_for, utcnow
from services.kit.routing import RawRecord
from tests.chaos.history import Record, check, check_relay

NOW = utcnow()
DIGEST = "0" * 64
_offsets = count()


def rec(event: Event, cause: Envelope | None = None, topic: str = "t") -> Record:
    r = encode(event, "/test", causation_id=cause.id if cause else None)
    raw = RawRecord(topic, 0, next(_offsets), r.key, r.value, r.headers)
    return raw, decode(r.headers, r.key, r.value)


def env(r: Record) -> Envelope:
    assert isinstance(r[1], Envelope)
    return r[1]


def requested(request_id: str) -> Record:
    return rec(ProbeRequested(
        request_id=request_id, case_id="CASE-1", agent_id="agent-7",
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"], image_source=ImageSource.OTHER,
        unedited_attestation=True,
        image=EncryptedImage(key_id="k", ephemeral_public_key="a", nonce="b", ciphertext="c")))


def submitted(pid: str, cause: Record, ref: str = "vault/1",
              expires_in: timedelta = timedelta(hours=1)) -> Record:
    return rec(ProbeSubmitted(
        probe_id=pid, request_id="r", case_id="CASE-1", agent_id="agent-7",
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"], image_source=ImageSource.OTHER,
        nexus=[], exigent=False, unedited_attestation=True, vault_ref=ref, image_format="jpeg",
        received_sha256=DIGEST, sanitized_sha256=DIGEST, expires_at=NOW + expires_in,
        submitted_at=NOW), env(cause))


def cleared(pid: str, cause: Record, providers: tuple[str, ...] = ("p1", "p2")) -> Record:
    return rec(PolicyCleared(
        probe_id=pid, case_id="CASE-1",
        cleared=[ClearedProvider(provider_id=p, transport=Transport.HTTPS,
                                 fields=[OutboundField.PHOTO]) for p in providers],
        policy_digest=DIGEST, registry_versions=RegistryVersions(), decided_at=NOW), env(cause))


def dispatched(pid: str, provider: str, cause: Record, dispatch_id: str = "") -> Record:
    return rec(ProviderDispatched(
        probe_id=pid, provider_id=provider, dispatch_id=dispatch_id or f"{pid}:{provider}",
        transport=Transport.HTTPS, fields_sent=[OutboundField.PHOTO], request_ref="x",
        sent_at=NOW, response_due_at=NOW, deletion_due_at=NOW), env(cause))


def answered(pid: str, provider: str, cause: Record) -> Record:
    return rec(CandidatesReceived(
        probe_id=pid, provider_id=provider, channel="webhook", candidates=[], threshold=0.0,
        list_size=0, algorithm="a", algorithm_version="1", received_at=NOW), env(cause))


def failed(pid: str, provider: str, cause: Record) -> Record:
    return rec(DispatchFailed(probe_id=pid, provider_id=provider,
                              reason=DispatchFailure.RETRIES_EXHAUSTED, detail="x",
                              failed_at=NOW), env(cause))


def settled(pid: str, cause: Record, answered: list[str], failed: list[str] | None = None,
            no_response: list[str] | None = None) -> Record:
    return rec(ProbeSettled(probe_id=pid, answered=answered, failed=failed or [],
                            no_response=no_response or [], settled_at=NOW), env(cause))


def happy(request_id: str) -> list[Record]:
    pid = probe_id_for(request_id)
    r = requested(request_id)
    s = submitted(pid, r)
    c = cleared(pid, s)
    d1, d2 = dispatched(pid, "p1", c), dispatched(pid, "p2", c)
    a1 = answered(pid, "p1", d1)
    f2 = failed(pid, "p2", c)
    return [r, s, c, d1, d2, a1, f2, settled(pid, a1, ["p1"], ["p2"])]


def test_a_clean_history_passes() -> None:
    history = happy("req-1") + happy("req-2")
    report = check(history, expected_requests=["req-1", "req-2"])
    assert report.ok, report.problems
    assert report.stats["requests"] == 2
    assert set(report.outcomes.values()) == {"ProbeSettled"}


def test_a_redelivered_effect_is_one_effect() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    # Intake handled the same ProbeRequested twice: same type, same causation.
    history.append(submitted(pid, history[0]))
    report = check(history)
    assert report.ok, report.problems
    assert report.stats["redelivered_effects"] == 1


def test_a_lost_request_fails() -> None:
    report = check(happy("req-1"), expected_requests=["req-1", "req-lost"])
    assert report.kinds() == {"lost_request": 1}


def test_a_request_without_terminal_outcome_fails() -> None:
    report = check(happy("req-1")[:-1])
    assert report.kinds() == {"no_terminal_outcome": 1}


def test_two_terminal_outcomes_fail() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    history.append(rec(ProbeRejected(probe_id=pid, request_id="req-1",
                                     reason=RejectReason.NO_FACE, detail="x"), env(history[0])))
    # A second settlement derived from another input is a second effect too.
    history.append(settled(pid, history[-2], ["p1"], ["p2"]))
    report = check(history)
    assert report.kinds() == {"multiple_terminal_outcomes": 1}


def test_a_settlement_repeated_from_another_input_is_one_outcome() -> None:
    """The tracker's replay after a crash between the ack and its commit may derive the
    same settlement from its read-back of its own candidates: one outcome. A settlement
    saying something else is still a second one."""
    history = happy("req-1")
    first = env(history[-1])
    assert isinstance(first.event, ProbeSettled)
    again = first.event.model_copy(update={"settled_at": NOW + timedelta(seconds=3)})
    history.append(rec(again, env(history[0])))
    assert check(history).kinds() == {}
    other = first.event.model_copy(update={"answered": [], "failed": ["p1", "p2"]})
    history.append(rec(other, env(history[0])))
    assert check(history).kinds() == {"multiple_terminal_outcomes": 1}


def test_rejected_and_denied_are_terminal() -> None:
    r1, r2 = requested("req-a"), requested("req-b")
    p1, p2 = probe_id_for("req-a"), probe_id_for("req-b")
    s2 = submitted(p2, r2)
    history = [r1, rec(ProbeRejected(probe_id=p1, request_id="req-a",
                                     reason=RejectReason.NO_FACE, detail="x"), env(r1)),
               r2, s2, rec(PolicyDenied(probe_id=p2, case_id="CASE-1",
                                        denied=[ProviderDenial(provider_id="p1", rules=[])],
                                        policy_digest=DIGEST,
                                        registry_versions=RegistryVersions(),
                                        decided_at=NOW), env(s2))]
    report = check(history)
    assert report.ok, report.problems
    assert report.outcomes == {p1: "ProbeRejected", p2: "PolicyDenied"}


def test_settlement_must_agree_with_first_provider_outcomes() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    history[-1] = settled(pid, history[5], ["p1", "p2"])  # p2 failed, settled as answered
    report = check(history)
    assert report.kinds() == {"settlement_mismatch": 1}
    missing = happy("req-2")
    pid2 = probe_id_for("req-2")
    missing[-1] = settled(pid2, missing[5], ["p1"])  # p2 left out
    assert check(missing).kinds() == {"settlement_mismatch": 1}


def test_a_vendor_answering_twice_keeps_the_first_outcome() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    history.append(answered(pid, "p2", history[4]))  # after p2 had already failed
    history.append(rec(NoResponse(probe_id=pid, provider_id="p1", deadline=NOW),
                       env(history[3])))
    assert check(history).ok


def test_two_distinct_dispatches_to_one_provider_fail() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    history.append(dispatched(pid, "p1", history[1], dispatch_id="other"))
    assert check(history).kinds() == {"duplicate_dispatch": 1}


def test_duplicate_sends_counted_at_the_simulator_fail() -> None:
    pid = probe_id_for("req-1")
    report = check(happy("req-1"), sends={(pid, "p1"): 1, (pid, "p2"): 2})
    assert report.kinds() == {"duplicate_send": 1}
    assert report.stats["sends"] == 3


def test_audit_store_must_hold_every_record_exactly_once() -> None:
    history = happy("req-1")
    rows = [(r.topic, r.partition, r.offset, d.id if isinstance(d, Envelope) else None)
            for r, d in history]
    assert check(history, audit_positions=rows).ok
    assert check(history, audit_positions=rows[1:]).kinds() == {"audit_missing": 1}
    assert check(history, audit_positions=rows + rows[:1]).kinds() == {"audit_duplicate": 1}
    wrong = [(*rows[0][:3], "some-other-id"), *rows[1:]]
    assert check(history, audit_positions=wrong).kinds() == {"audit_mismatch": 1}


def test_image_past_expiry_and_early_purge_fail() -> None:
    pid = probe_id_for("req-1")
    r = requested("req-1")
    s = submitted(pid, r, expires_in=timedelta(minutes=-30))
    rj = rec(ProbeRejected(probe_id=pid, request_id="req-1", reason=RejectReason.NO_FACE,
                           detail="x"), env(s))
    assert check([r, s, rj], now=NOW).kinds() == {"image_past_expiry": 1}
    on_time = rec(ImagePurged(probe_id=pid, vault_ref="vault/1", reason=PurgeReason.EXPIRED,
                              expires_at=NOW - timedelta(minutes=30),
                              purged_at=NOW - timedelta(minutes=29)), None)
    assert check([r, s, rj, on_time], now=NOW).ok
    early = rec(ImagePurged(probe_id=pid, vault_ref="vault/1", reason=PurgeReason.EXPIRED,
                            expires_at=NOW - timedelta(minutes=30),
                            purged_at=NOW - timedelta(minutes=40)), None)
    assert check([r, s, rj, early], now=NOW).kinds() == {"purged_early": 1}
    assert check([r, s, rj, on_time], now=NOW,
                 vault_objects={"vault/1": NOW - timedelta(hours=1)}).kinds() == {
        "image_past_expiry": 1}


def test_only_provoked_violations_are_allowed() -> None:
    history = happy("req-1")
    pid = probe_id_for("req-1")
    history.append(rec(ComplianceViolation(
        probe_id=pid, invariant=Invariant.DISPATCH_AFTER_PURGE, detail="x",
        offending_event_id="e", detected_at=NOW), None))
    assert check(history).kinds() == {"unprovoked_violation": 1}
    assert check(history, provoked_violations=[(pid, "dispatch_after_purge")]).ok


def test_relay_check_finds_lost_duplicated_and_orphan_messages() -> None:
    inputs = [env(failed(f"prb-{i}", "p", requested(f"r{i}"))) for i in range(3)]
    outputs = [env(rec(ProbeRejected(probe_id=e.event.probe_id, request_id=e.id,  # type: ignore[attr-defined]
                                     reason=RejectReason.INVALID_FIELDS, detail="x"), e))
               for e in inputs]
    acked = [e.id for e in inputs]
    assert check_relay(inputs, outputs + outputs[:1], acked).ok  # a redelivery is fine
    assert check_relay(inputs, outputs[1:], acked).kinds() == {"lost_message": 1}
    assert check_relay(inputs[1:], outputs[1:], acked).kinds() == {"lost_acknowledged": 1}
    assert check_relay(inputs + inputs[:1], outputs, acked).kinds() == {"duplicate_input": 1}
    assert check_relay(inputs[1:], outputs, acked[1:]).kinds() == {"output_without_input": 1}


def results(event: Event, cause: Record) -> Record:
    return rec(event, env(cause), topic="frs.results.events")


def test_a_probe_needing_review_settles_only_after_the_review() -> None:
    pid = probe_id_for("req-r")
    r = requested("req-r")
    s = rec(ProbeSubmitted.model_validate({**env(submitted(pid, r)).event.model_dump(),
                                           "review_required": True}), env(r))
    c = cleared(pid, s, ("p1",))
    d = dispatched(pid, "p1", c)
    a = rec(CandidatesReceived(
        probe_id=pid, provider_id="p1", channel="webhook",
        candidates=[Candidate(rank=1, candidate_ref="c1", score=0.9, score_scale="s",
                              gallery="g")], threshold=0.0,
        list_size=1, algorithm="a", algorithm_version="1", received_at=NOW), env(d))
    unreviewed = [r, s, c, d, a, settled(pid, a, ["p1"])]
    assert check(unreviewed).kinds() == {"settled_without_review": 1}
    review = rec(ReviewCompleted(probe_id=pid, examiner_id="ex-1", conclusions=[],
                                 completed_at=NOW), env(a))
    report = check([*unreviewed[:-1], review, settled(pid, review, ["p1"])])
    assert report.ok, report.problems
    assert report.headline()["settled_without_review"] == 0


def test_a_deadline_event_after_the_answer_or_before_its_time_is_false() -> None:
    pid = probe_id_for("req-d")
    history = happy("req-d")
    d1 = history[3]
    past = NOW - timedelta(seconds=30)
    ok_late = results(NoResponse(probe_id=pid, provider_id="p2", deadline=past), d1)
    assert check([*history, ok_late]).ok
    # From the clock now, not NOW: an event's time is the wall clock when it is encoded,
    # minutes after NOW in a long suite (CI saw NOW + 5 min already past).
    early = results(NoResponse(probe_id=pid, provider_id="p2",
                               deadline=utcnow() + timedelta(minutes=5)), d1)
    assert check([*history, early]).kinds() == {"false_no_response": 1}
    answer = results(CandidatesReceived(
        probe_id=pid, provider_id="p1", channel="webhook", candidates=[], threshold=0.0,
        list_size=0, algorithm="a", algorithm_version="1", received_at=past), d1)
    after_answer = results(NoResponse(probe_id=pid, provider_id="p1",
                                      deadline=past + timedelta(seconds=5)), d1)
    assert check([*history, answer, after_answer]).kinds() == {"false_no_response": 1}
    receipt = results(DeletionConfirmed(probe_id=pid, provider_id="p1", confirmed_at=past),
                      d1)
    overdue = results(DeletionOverdue(probe_id=pid, provider_id="p1",
                                      due_at=past + timedelta(seconds=5)), d1)
    report = check([*history, receipt, overdue])
    assert report.kinds() == {"false_deletion_overdue": 1}
    assert report.headline()["false_deletion_overdue"] == 1
