"""Policy gate handlers: plain functions of typed events and ports, returning events.

``on_probe_submitted`` decides per (probe, candidate provider) with the Cedar engine;
every provider in the registry is a candidate; every decision leaves signed with the
gate's Ed25519 key (schemas/decisions.py). ``replay`` re-runs a recorded decision
from the inputs it carries. The exigent-review handlers keep the review flags."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.decisions import sign
from schemas.events import (
    AgentRecord,
    CaseRecord,
    ClaimCheck,
    ClearedProvider,
    DecisionInputs,
    Event,
    ExigentReviewOverdue,
    PolicyCleared,
    PolicyDenied,
    PolicyRequest,
    ProbeSubmitted,
    ProviderDenial,
    ProviderRecord,
    ProviderSuspensionRequested,
    RegistryVersions,
    RuleDenial,
    SupervisorReviewRecorded,
)
from schemas.types import MINIMAL_FIELDS
from services.intake.policy.engine import PolicyEngine
from services.intake.policy.metrics import policy_metrics
from services.intake.policy.reviews import Reviews
from services.kit.cost import step
from services.kit.registry import Registries, effective_provider

log = logging.getLogger("frs.policy")

NO_PROVIDER = "none"


@dataclass(frozen=True)
class PolicyPorts:
    registries: Registries
    clock: Callable[[], datetime]
    engine: PolicyEngine
    # The gate's own key: dispatch and the audit accept only decisions signed with a key
    # the operator enrolled (frs.registry.trusted_keys).
    signing_key: Ed25519PrivateKey
    # Where an exigent clearance is flagged for review, before it is sent (None: not here).
    reviews: ReviewPorts | None = None


@dataclass(frozen=True)
class ReviewPorts:
    store: Reviews
    registries: Registries
    clock: Callable[[], datetime]
    review_window: timedelta


def snapshot(event: ProbeSubmitted, registries: Registries, now: datetime) -> DecisionInputs:
    """What the policy reads for this probe, frozen so the decision can be replayed."""
    request = PolicyRequest(
        agent_id=event.agent_id, case_id=event.case_id, purpose=event.purpose,
        roi_refs=event.roi_refs, nexus=event.nexus,
        unedited_attestation=event.unedited_attestation,
        quality_passed=event.quality.passed if event.quality is not None else None,
        exigent=event.exigent, exigent_justification=event.exigent_justification,
        exigent_bypass=event.exigent_bypass,
    )
    providers = sorted(registries.providers.values(), key=lambda p: p.provider_id)
    return DecisionInputs(request=request, evaluated_at=now,
                          case=registries.cases.get(event.case_id),
                          agent=registries.agents.get(event.agent_id), providers=providers)


def decide(engine: PolicyEngine, probe_id: str, inputs: DecisionInputs,
           versions: RegistryVersions, review_required: bool = False
           ) -> PolicyCleared | PolicyDenied:
    """The decision event for one probe over every candidate provider in ``inputs``."""
    decisions = engine.decide(inputs)
    providers = {p.provider_id: p for p in inputs.providers}
    cleared = [ClearedProvider(provider_id=d.provider_id,
                               transport=providers[d.provider_id].transport,
                               fields=list(MINIMAL_FIELDS))
               for d in decisions if d.allowed]
    denied = [ProviderDenial(provider_id=d.provider_id, rules=list(d.denials))
              for d in decisions if not d.allowed]
    common = {"probe_id": probe_id, "case_id": inputs.request.case_id,
              "policy_digest": engine.digest, "registry_versions": versions,
              "decided_at": inputs.evaluated_at, "inputs": inputs}
    if not cleared:
        if not decisions:
            denied = [ProviderDenial(provider_id=NO_PROVIDER, rules=[RuleDenial(
                rule_id="REQ-PROVIDER", message="No provider is registered.")])]
        return PolicyDenied(denied=denied, **common)
    bypassed = engine.bypassed_rules(inputs)
    examiner = review_required or any(providers[c.provider_id].requires_review
                                      for c in cleared)
    # A clearance on the exigent path implies a justification (REQ-EXIGENT forbids the
    # rest), and it is flagged for supervisor review even when it waived nothing.
    return PolicyCleared(cleared=cleared, denied=denied, exigent=inputs.request.exigent,
                         bypassed_rules=bypassed, review_required=examiner, **common)


async def on_probe_submitted(event: ProbeSubmitted, ports: PolicyPorts) -> list[Event]:
    registries = ports.registries
    with step("policy"):
        # Versions first: the snapshot is at least as new as the versions it claims.
        versions = registries.versions
        inputs = snapshot(event, registries, ports.clock())
        decision = decide(ports.engine, event.probe_id, inputs, versions,
                          event.review_required)
        if isinstance(decision, PolicyCleared):
            # The claim check rides with the clearance: dispatch sends from it alone.
            decision = decision.model_copy(update={"claim": ClaimCheck(
                vault_ref=event.vault_ref, agent_id=event.agent_id,
                sanitized_sha256=event.sanitized_sha256, expires_at=event.expires_at)})
        # Signed last: the signature covers everything else, the claim check included.
        decision = sign(decision, ports.signing_key)
    metrics = policy_metrics()
    if isinstance(decision, PolicyCleared):
        metrics.decisions.labels("cleared").inc()
        if decision.exigent:
            metrics.exigent.inc()
    else:
        metrics.decisions.labels("denied").inc()
    for denial in decision.denied:
        for rule in denial.rules:
            metrics.denials.labels(rule.rule_id).inc()
    log.info("policy decision", extra={
        "probe_id": event.probe_id, "outcome": type(decision).__name__,
        "cleared": len(decision.cleared) if isinstance(decision, PolicyCleared) else 0,
        "denied": len(decision.denied), "policy_digest": ports.engine.digest[:12]})
    if ports.reviews is not None and isinstance(decision, PolicyCleared):
        # Flagged before the clearance is sent, so no flag trails its clearance, and the
        # reviews route need not read every decision back for the few exigent ones (a
        # delivery a probe, issue 21 item 3). A clearance that never leaves (the record
        # dead-lettered, or decided otherwise when redelivered) leaves a flag that reports
        # overdue: a false alarm, never a missed one.
        await on_decision_for_review(decision, ports.reviews)
    return [decision]


def replay(engine: PolicyEngine, recorded: PolicyCleared | PolicyDenied
           ) -> PolicyCleared | PolicyDenied:
    """Re-evaluate a recorded decision from the inputs it carries."""
    if recorded.inputs is None:
        raise ValueError("the decision carries no inputs to replay")
    return decide(engine, recorded.probe_id, recorded.inputs, recorded.registry_versions,
                  recorded.review_required if isinstance(recorded, PolicyCleared) else False)


def outcome(decision: PolicyCleared | PolicyDenied) -> dict[str, object]:
    """The parts of a decision that must match on replay (not the time or digest)."""
    cleared = decision.cleared if isinstance(decision, PolicyCleared) else []
    return {
        "outcome": "cleared" if isinstance(decision, PolicyCleared) else "denied",
        "cleared": sorted((c.provider_id, tuple(c.fields)) for c in cleared),
        "denied": sorted((d.provider_id, tuple(r.rule_id for r in d.rules))
                         for d in decision.denied),
        "exigent": decision.exigent if isinstance(decision, PolicyCleared) else False,
        "bypassed_rules": decision.bypassed_rules if isinstance(decision, PolicyCleared)
        else [],
    }


# --- exigent reviews ---------------------------------------------------------------


async def on_decision_for_review(event: PolicyCleared, ports: ReviewPorts) -> list[Event]:
    """An exigent clearance flags the probe until a supervisor review is recorded."""
    if event.exigent:
        await ports.store.flag(event.probe_id, event.decided_at + ports.review_window)
        policy_metrics().reviews_pending.set(await ports.store.pending_count())
    return []


async def on_supervisor_review(event: SupervisorReviewRecorded, ports: ReviewPorts
                               ) -> list[Event]:
    supervisor = ports.registries.agents.get(event.supervisor_id)
    if supervisor is None or supervisor.role != "supervisor":
        # A review only counts from a registered supervisor; the flag stays up.
        log.warning("exigent review ignored: not a registered supervisor",
                    extra={"probe_id": event.probe_id})
        return []
    await ports.store.resolve(event.probe_id, event.reviewed_at, event.approved)
    policy_metrics().reviews_pending.set(await ports.store.pending_count())
    return []


async def overdue_reviews(store: Reviews, now: datetime,
                          lease: timedelta = timedelta(minutes=1)
                          ) -> list[ExigentReviewOverdue]:
    """Flags past their due time with no review, not yet reported, claimed for ``lease``
    by this watch (each instance runs one; a flag goes to one of them)."""
    return [ExigentReviewOverdue(probe_id=probe_id, due_at=due_at)
            for probe_id, due_at in await store.claim_overdue(now, lease)]


# --- registry cross-check for replays ----------------------------------------------

RegistryRecord = CaseRecord | AgentRecord | ProviderRecord | ProviderSuspensionRequested


def check_inputs_against_registries(
    inputs: DecisionInputs, versions: RegistryVersions,
    history: list[tuple[int, RegistryRecord]],
) -> dict[str, str]:
    """Does the inputs snapshot match the registry topics at the recorded versions?

    Per entry: "match", "mismatch", "absent" (no record at or before the version, and
    the snapshot says none), "compacted" (the snapshot has an entry, the topic no
    longer holds one at or before the version) or "omitted" (a provider registered at
    the version that the snapshot left out). Compaction only drops records older
    than a key's newest one, so the newest surviving record at or before the version is
    the one the decision read. A provider's entry is compared as the decision saw it:
    with the suspension from results at or before ``versions.suspensions`` applied."""
    limits = {CaseRecord: versions.cases, AgentRecord: versions.agents,
              ProviderRecord: versions.providers,
              ProviderSuspensionRequested: versions.suspensions}
    latest: dict[tuple[type[RegistryRecord], str], tuple[int, RegistryRecord]] = {}
    for offset, record in history:
        if offset > limits[type(record)]:
            continue
        key = (type(record), _registry_key(record))
        if key not in latest or latest[key][0] < offset:
            latest[key] = (offset, record)

    def verdict(kind: type[RegistryRecord], key: str, snap: RegistryRecord | None) -> str:
        found = latest.get((kind, key))
        if found is None:
            return "absent" if snap is None else "compacted"
        record = found[1]
        suspension = latest.get((ProviderSuspensionRequested, key), (0, None))[1]
        if isinstance(record, ProviderRecord) and isinstance(suspension,
                                                             ProviderSuspensionRequested):
            record = effective_provider(record, suspension)
        return "match" if record == snap else "mismatch"

    req = inputs.request
    out = {f"case:{req.case_id}": verdict(CaseRecord, req.case_id, inputs.case),
           f"agent:{req.agent_id}": verdict(AgentRecord, req.agent_id, inputs.agent)}
    for p in inputs.providers:
        out[f"provider:{p.provider_id}"] = verdict(ProviderRecord, p.provider_id, p)
    # Every registered provider is a candidate: one missing from the snapshot is a gap.
    for kind, provider_id in latest:
        if kind is ProviderRecord and f"provider:{provider_id}" not in out:
            out[f"provider:{provider_id}"] = "omitted"
    return out


def _registry_key(record: RegistryRecord) -> str:
    if isinstance(record, CaseRecord):
        return record.case_id
    if isinstance(record, AgentRecord):
        return record.agent_id
    return record.provider_id  # a provider's entry, or a suspension of it
