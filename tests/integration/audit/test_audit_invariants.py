"""REQ-INVARIANTS on the real broker: publish the offending events directly, as a faulty
or hostile service would, and see the audit service's ComplianceViolation."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.envelope import encode
from schemas.events import (
    Candidate,
    CandidatesReceived,
    ClearedProvider,
    ComplianceViolation,
    Event,
    ImagePurged,
    Invariant,
    PolicyCleared,
    ProbeSettled,
    ProviderDispatched,
    ProviderRecord,
    PurgeReason,
    RegistryVersions,
    SupervisorReviewRecorded,
)
from schemas.types import OutboundField, Purpose, Transport
from services.kit.publisher import Publisher
from tests.conftest import ServiceProcess
from tests.factories import inputs, inputs_for, signed, submitted
from tests.helpers import wait_for
from tests.integration.audit.conftest import later, now, violations

pytestmark = pytest.mark.integration
DIGEST = "0" * 64
ALL_FIELDS = [OutboundField.PHOTO, OutboundField.AGENT_ID, OutboundField.REQUEST_REF]


def probe() -> str:
    return f"prb-test-{uuid.uuid4()}"


def cleared(probe_id: str, provider: str, fields: list[OutboundField],
            sign: bool = True) -> PolicyCleared:
    """Signed with the session's enrolled policy key, as the gate would (unless not)."""
    decision = PolicyCleared(probe_id=probe_id, case_id="CASE-1",
                             cleared=[ClearedProvider(provider_id=provider,
                                                      transport=Transport.HTTPS, fields=fields)],
                             policy_digest=DIGEST, registry_versions=RegistryVersions(),
                             decided_at=now(), inputs=inputs_for(provider))
    return signed(decision) if sign else decision


def dispatched(probe_id: str, provider: str, fields: list[OutboundField],
               sent_at: datetime | None = None, due_in_s: float = 3600) -> ProviderDispatched:
    sent = sent_at or now()
    return ProviderDispatched(probe_id=probe_id, provider_id=provider, dispatch_id=f"d-{probe_id}",
                              transport=Transport.HTTPS, fields_sent=fields,
                              request_ref=f"ref-{uuid.uuid4()}", sent_at=sent,
                              response_due_at=later(due_in_s), deletion_due_at=later(86400))


def purged(probe_id: str, at: datetime) -> ImagePurged:
    return ImagePurged(probe_id=probe_id, vault_ref=f"vault/{probe_id}",
                       reason=PurgeReason.EXPIRED, expires_at=at, purged_at=at)


def candidates(probe_id: str) -> CandidatesReceived:
    return CandidatesReceived(probe_id=probe_id, provider_id="fed-ngi", channel="webhook",
                              candidates=[Candidate(rank=1, score=0.9, score_scale="0-1",
                                                    gallery="g", candidate_ref="c-1")],
                              threshold=0.0, list_size=1, algorithm="a",
                              algorithm_version="1", received_at=now())


async def _publish(bootstrap: str, events: list[Event]) -> None:
    async with Publisher(bootstrap, source="/frs/test") as publisher:
        for e in events:  # one at a time: the order matters to some rules
            await publisher.publish([e])


def publish(bootstrap: str, *events: Event) -> None:
    asyncio.run(_publish(bootstrap, list(events)))


def publish_forged(bootstrap: str, event: Event, **overrides: object) -> str:
    """A record with a valid envelope whose JSON body was edited by hand."""
    record = encode(event, "/frs/results")
    body = json.loads(record.value)
    body.update(overrides)

    async def send() -> None:
        async with Publisher(bootstrap, source="/frs/test") as publisher:
            from schemas.catalog import topic_for
            fut = await publisher.send_raw(topic_for(event).name, record.key,
                                           json.dumps(body).encode(), record.headers)
            await fut

    asyncio.run(send())
    return dict(record.headers)["ce_id"].decode()


def seen(bootstrap: str, probe_id: str, invariant: Invariant,
         timeout: float = 60.0) -> list[ComplianceViolation]:
    return wait_for(lambda: [v for v in violations(bootstrap) if v.probe_id == probe_id
                             and v.invariant == invariant], timeout=timeout,
                    what=f"{invariant.value} for {probe_id}")


def none_for(bootstrap: str, probe_id: str) -> bool:
    return not [v for v in violations(bootstrap) if v.probe_id == probe_id]


Audit = tuple[ServiceProcess, Path]


def test_dispatch_without_clearance(audit_service: Audit, kafka_bootstrap: str) -> None:
    bad, good, other = probe(), probe(), probe()
    publish(kafka_bootstrap, dispatched(bad, "fed-ngi", ALL_FIELDS))
    # Cleared for another provider only: still no clearance for fed-ngi.
    publish(kafka_bootstrap, cleared(other, "state-va", ALL_FIELDS),
            dispatched(other, "fed-ngi", ALL_FIELDS))
    # Dispatch consumed before its clearance (topics interleave): not a violation.
    publish(kafka_bootstrap, dispatched(good, "fed-ngi", ALL_FIELDS),
            cleared(good, "fed-ngi", ALL_FIELDS))
    (v,) = seen(kafka_bootstrap, bad, Invariant.DISPATCH_WITHOUT_CLEARANCE)
    assert "fed-ngi" in v.detail
    seen(kafka_bootstrap, other, Invariant.DISPATCH_WITHOUT_CLEARANCE)
    assert none_for(kafka_bootstrap, good)


def test_dispatch_after_purge(audit_service: Audit, kafka_bootstrap: str) -> None:
    bad, good = probe(), probe()
    t0 = now()
    publish(kafka_bootstrap, cleared(bad, "fed-ngi", ALL_FIELDS), purged(bad, t0),
            dispatched(bad, "fed-ngi", ALL_FIELDS, sent_at=later(1)))
    publish(kafka_bootstrap, cleared(good, "fed-ngi", ALL_FIELDS),
            dispatched(good, "fed-ngi", ALL_FIELDS, sent_at=t0), purged(good, later(1)))
    (v,) = seen(kafka_bootstrap, bad, Invariant.DISPATCH_AFTER_PURGE)
    assert "purged" in v.detail
    assert none_for(kafka_bootstrap, good)


def test_image_past_expiry(audit_service: Audit, kafka_bootstrap: str) -> None:
    bad, good = probe(), probe()
    expired = later(-30)
    # The control's purge goes first so that no timer tick can fall between the two.
    publish(kafka_bootstrap, purged(good, later(-29)), submitted(good, expired),
            submitted(bad, expired))
    (v,) = seen(kafka_bootstrap, bad, Invariant.IMAGE_PAST_EXPIRY)
    assert v.offending_event_id == bad
    assert none_for(kafka_bootstrap, good)


def test_extra_fields_sent(audit_service: Audit, kafka_bootstrap: str) -> None:
    narrow, forged, good = probe(), probe(), probe()
    publish(kafka_bootstrap,
            cleared(narrow, "fed-ngi", [OutboundField.PHOTO, OutboundField.REQUEST_REF]),
            dispatched(narrow, "fed-ngi", ALL_FIELDS))
    # A dispatch record listing a field outside REQ-MINIMAL that the model would refuse.
    publish(kafka_bootstrap, cleared(forged, "fed-ngi", ALL_FIELDS))
    eid = publish_forged(kafka_bootstrap, dispatched(forged, "fed-ngi", ALL_FIELDS),
                         fields_sent=["photo", "agent_id", "request_ref", "case_notes"])
    publish(kafka_bootstrap, cleared(good, "fed-ngi", ALL_FIELDS),
            dispatched(good, "fed-ngi", ALL_FIELDS))
    (v,) = seen(kafka_bootstrap, narrow, Invariant.EXTRA_FIELDS_SENT)
    assert "agent_id" in v.detail
    (f,) = seen(kafka_bootstrap, forged, Invariant.EXTRA_FIELDS_SENT)
    assert f.offending_event_id == eid and "case_notes" in f.detail
    assert none_for(kafka_bootstrap, good)


def test_candidates_without_lead_marking(audit_service: Audit, kafka_bootstrap: str) -> None:
    bad, good = probe(), probe()
    eid = publish_forged(kafka_bootstrap, candidates(bad),
                         lead_marking="POSITIVE IDENTIFICATION", mode="identification")
    publish(kafka_bootstrap, candidates(good))
    (v,) = seen(kafka_bootstrap, bad, Invariant.CANDIDATES_WITHOUT_LEAD_MARKING)
    assert v.offending_event_id == eid
    assert none_for(kafka_bootstrap, good)


def test_exigent_probe_without_review(audit_service: Audit, kafka_bootstrap: str) -> None:
    bad, good = probe(), probe()
    review = SupervisorReviewRecorded(probe_id=good, supervisor_id="sup-1", approved=True,
                                      reviewed_at=now())
    publish(kafka_bootstrap, review, submitted(good, later(3600), exigent=True),
            submitted(bad, later(3600), exigent=True))
    (v,) = seen(kafka_bootstrap, bad, Invariant.EXIGENT_WITHOUT_REVIEW)
    assert "review" in v.detail
    assert none_for(kafka_bootstrap, good)


def test_a_settlement_held_back_after_the_answer_is_a_liveness_violation(
        audit_service: Audit, kafka_bootstrap: str) -> None:
    """Issue 15's stall: cleared, dispatched, answered, and the settlement never comes.
    The control settles in time. Deadline 2s, grace 3s (the fixture's)."""
    held, good = probe(), probe()
    settled = ProbeSettled(probe_id=good, answered=["fed-ngi"], failed=[], no_response=[],
                           settled_at=now())
    # The control goes first and whole, so no timer tick can judge one and not the other.
    for pid in (good, held):
        publish(kafka_bootstrap, cleared(pid, "fed-ngi", ALL_FIELDS),
                dispatched(pid, "fed-ngi", ALL_FIELDS, due_in_s=2),
                candidates(pid),
                *([settled] if pid == good else []))
    (v,) = seen(kafka_bootstrap, held, Invariant.CLEARANCE_WITHOUT_END, timeout=60)
    assert v.offending_event_id.endswith("/fed-ngi")
    assert "fed-ngi ended (answered) but the probe did not settle" in v.detail
    assert none_for(kafka_bootstrap, good)


def test_a_decision_not_signed_by_the_policy_gate_is_flagged(audit_service: Audit,
                                                             kafka_bootstrap: str) -> None:
    """Issue 19's forged clearance: any provider, a zero digest, no signature (or another
    key's). The gate's own decision (the enrolled session key) is not flagged."""
    unsigned, other_key, narrow, good = probe(), probe(), probe(), probe()
    publish(kafka_bootstrap, cleared(unsigned, "fed-ngi", ALL_FIELDS, sign=False),
            signed(cleared(other_key, "fed-ngi", ALL_FIELDS, sign=False),
                   Ed25519PrivateKey.generate()),
            # Signed, but the decision's own snapshot of the provider does not allow it.
            signed(cleared(narrow, "fed-ngi", ALL_FIELDS, sign=False).model_copy(update={
                "inputs": inputs([registry_entry("fed-ngi", [Purpose.FINANCIAL_FRAUD])])})),
            cleared(good, "fed-ngi", ALL_FIELDS))
    (v,) = seen(kafka_bootstrap, unsigned, Invariant.UNVERIFIED_DECISION)
    assert "not signed" in v.detail
    # Waited for its key's record (topics interleave), which never came.
    (v,) = seen(kafka_bootstrap, other_key, Invariant.UNVERIFIED_DECISION)
    assert "the trusted-keys registry did not show" in v.detail
    (v,) = seen(kafka_bootstrap, narrow, Invariant.PURPOSE_NOT_ALLOWED)
    assert v.offending_event_id.endswith("/fed-ngi") and "human_trafficking" in v.detail
    assert none_for(kafka_bootstrap, good)


def registry_entry(provider: str, purposes: list[Purpose]) -> ProviderRecord:
    return ProviderRecord(provider_id=provider, name=provider, kind="federal",
                          transport=Transport.HTTPS, endpoint="https://127.0.0.1:1/",
                          allowed_purposes=purposes, updated_at=now())
