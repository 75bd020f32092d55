"""Signed policy decisions (issue 19, item 1): the gate signs, dispatch refuses and the
audit flags any decision that is not the gate's, or that clears a provider for a purpose
its registry entry does not allow. No broker: handlers and the invariants with fakes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.decisions import key_id_for, purpose_faults, sign, signed_bytes, unverified
from schemas.envelope import Envelope, decode, encode
from schemas.events import (
    ClaimCheck,
    ClearedProvider,
    ComplianceViolation,
    DispatchFailed,
    DispatchFailure,
    Event,
    Invariant,
    PolicyCleared,
    PolicyDenied,
    ProviderDenial,
    ProviderDispatched,
    ProviderRecord,
    RegistryVersions,
    RuleDenial,
    TrustedKey,
)
from schemas.types import OutboundField, Purpose, Transport
from services.audit import handlers as audit_handlers
from services.audit.invariants import Invariants, InvariantSettings
from services.audit.store import AuditStore
from services.dispatch import handlers
from services.dispatch.breaker import ProviderGuards
from services.dispatch.delivery import RetryPolicy
from services.dispatch.images import StaticImageSource
from services.dispatch.ledger import SqliteLedger
from services.intake.policy.signing import load_or_create_signing_key, public_key_path
from services.kit.private_files import ExposedFileError
from services.kit.registry import Registries
from tests.factories import POLICY_KEY, inputs, inputs_for, signed, trusted, trusting_registries
from tests.unit.fakes import FakeClock, ScriptedTransport, no_sleep

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ATTACKER = Ed25519PrivateKey.generate()


def provider(pid: str, purposes: list[Purpose] | None = None) -> ProviderRecord:
    return ProviderRecord(provider_id=pid, name=pid, kind="federal", transport=Transport.HTTPS,
                          endpoint="https://127.0.0.1:1/search", updated_at=NOW,
                          allowed_purposes=list(Purpose) if purposes is None else purposes)


def clearance(*pids: str, probe: str = "prb-1", digest: str = "a" * 64,
              snapshot: list[ProviderRecord] | None = None,
              purpose: Purpose = Purpose.HUMAN_TRAFFICKING) -> PolicyCleared:
    """Unsigned: what a principal that may write the decisions topic could publish."""
    return PolicyCleared(
        probe_id=probe, case_id="CASE-1",
        cleared=[ClearedProvider(provider_id=p, transport=Transport.HTTPS,
                                 fields=list(OutboundField)) for p in pids],
        policy_digest=digest, registry_versions=RegistryVersions(), decided_at=NOW,
        inputs=inputs(snapshot, purpose) if snapshot is not None else inputs_for(
            *pids, purpose=purpose),
        claim=ClaimCheck(vault_ref="vault:1", agent_id="agent-7", sanitized_sha256=digest,
                         expires_at=NOW + timedelta(days=1)))


def denial(probe: str = "prb-9") -> PolicyDenied:
    return PolicyDenied(probe_id=probe, case_id="CASE-1", policy_digest="b" * 64,
                        registry_versions=RegistryVersions(), decided_at=NOW,
                        denied=[ProviderDenial(provider_id="fed", rules=[RuleDenial(
                            rule_id="REQ-CASE", message="closed")])])


def keys(*records: TrustedKey) -> dict[str, TrustedKey]:
    return {r.key_id: r for r in records}


# --- the signature -------------------------------------------------------------------


def test_a_signed_decision_verifies_after_the_wire_and_nothing_else_does() -> None:
    trust = keys(trusted())
    decisions: list[PolicyCleared | PolicyDenied] = [clearance("fed"), denial()]
    for decision in decisions:
        good = sign(decision, POLICY_KEY)
        assert good.key_id == key_id_for(POLICY_KEY.public_key())
        # Encoded as the gate publishes it and decoded as dispatch and the audit read it.
        record = encode(good, "/frs/intake/policy")
        wire = decode(record.headers, record.key, record.value).event
        assert isinstance(wire, PolicyCleared | PolicyDenied)
        assert unverified(wire, trust) is None
        assert signed_bytes(wire) == signed_bytes(decision)
        assert unverified(decision, trust) == "the decision is not signed"


def test_every_way_to_forge_a_decision_is_refused() -> None:
    trust = keys(trusted())
    good = signed(clearance("fed"))
    # Another key: one nobody enrolled.
    assert "not in the trusted-keys registry" in str(unverified(signed(clearance("fed"),
                                                                       ATTACKER), trust))
    # The attacker's key carried under the gate's key id.
    borrowed = signed(clearance("fed"), ATTACKER).model_copy(update={"key_id": good.key_id})
    assert "does not verify" in str(unverified(borrowed, trust))
    # The gate's signature with any field changed: another provider, a zero digest, a purpose.
    for change in ({"cleared": [*good.cleared, ClearedProvider(
                        provider_id="rogue", transport=Transport.HTTPS,
                        fields=list(OutboundField))]},
                   {"claim": good.claim.model_copy(update={"sanitized_sha256": "0" * 64})
                    if good.claim else None},
                   {"exigent": True},
                   {"inputs": inputs_for("fed", purpose=Purpose.FINANCIAL_FRAUD)}):
        assert "does not verify" in str(unverified(good.model_copy(update=change), trust))
    # A signature that is not even base64 of 64 bytes fails the same way, not with a crash.
    assert "does not verify" in str(unverified(good.model_copy(
        update={"signature": "A" * 86 + "=="}), trust))
    # A revoked key verifies nothing any more.
    assert "revoked" in str(unverified(good, keys(trusted(status="revoked"))))


def test_unsigned_decisions_from_before_still_decode() -> None:
    data = clearance("fed").model_dump(mode="json")
    assert "signature" not in data or data["signature"] is None
    old = {k: v for k, v in data.items() if k not in ("signature", "key_id")}
    assert PolicyCleared.model_validate(old).signature is None


def test_the_gate_key_is_private_and_its_public_part_sits_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "policy-decisions.pem"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_path(path).name == "policy-decisions.pub.pem"
    assert key_id_for(load_or_create_signing_key(path).public_key()) == key_id_for(
        key.public_key())
    path.chmod(0o644)
    with pytest.raises(ExposedFileError):
        load_or_create_signing_key(path)


# --- the purpose ---------------------------------------------------------------------


def test_purpose_faults_read_the_snapshot_and_the_registry() -> None:
    fraud_only = provider("fed", [Purpose.FINANCIAL_FRAUD])
    # The decision's own snapshot does not allow the purpose.
    assert "snapshot" in purpose_faults(clearance("fed", snapshot=[fraud_only]), {})["fed"]
    # The snapshot does, the registry as it is now does not.
    faults = purpose_faults(clearance("fed"), {"fed": [Purpose.FINANCIAL_FRAUD.value]})
    assert "registry does not allow human_trafficking" in faults["fed"]
    # A provider the decision did not read, and a clearance that names no purpose.
    assert "not in the decision's own" in purpose_faults(
        clearance("fed", snapshot=[]), {})["fed"]
    assert set(purpose_faults(clearance("fed", "web").model_copy(update={"inputs": None}),
                              {})) == {"fed", "web"}
    assert purpose_faults(clearance("fed"), {"fed": [p.value for p in Purpose]}) == {}


# --- dispatch refuses ----------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path: Path, registries: Registries) -> None:
        self.ledger = SqliteLedger(tmp_path / "ledger.db")
        self.https = ScriptedTransport([None])
        self.registries = registries
        self.ports = handlers.DispatchPorts(
            registries=registries, ledger=self.ledger, images=StaticImageSource(b"jpeg"),
            transports={Transport.HTTPS: self.https},
            guards=ProviderGuards(concurrency=4, failure_threshold=5, open_s=1),
            clock=lambda: NOW, retry=RetryPolicy(max_attempts=1), sleep=no_sleep)

    def send(self, event: PolicyCleared) -> list[Event]:
        return asyncio.run(handlers.on_policy_cleared(event, self.ports))


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    registries = trusting_registries()
    for pid in ("fed", "web"):
        registries.apply(provider(pid))
    r = Rig(tmp_path, registries)
    yield r
    r.ledger.close()


@pytest.mark.parametrize("forgery", ["unsigned", "other key", "tampered", "revoked key"])
def test_dispatch_refuses_a_forged_clearance_and_sends_nothing(rig: Rig, forgery: str) -> None:
    event = {"unsigned": clearance("fed", "web", digest="0" * 64),
             "other key": signed(clearance("fed", "web"), ATTACKER),
             "tampered": signed(clearance("fed")).model_copy(update={"cleared": [
                 ClearedProvider(provider_id=p, transport=Transport.HTTPS,
                                 fields=list(OutboundField)) for p in ("fed", "web")]}),
             "revoked key": signed(clearance("fed", "web"))}[forgery]
    if forgery == "revoked key":
        rig.registries.apply(trusted(status="revoked"))
    out = rig.send(event)
    failed = [e for e in out if isinstance(e, DispatchFailed)]
    assert len(failed) == len(out)
    assert {e.provider_id for e in failed} == {c.provider_id for c in event.cleared}
    assert {e.reason for e in failed} == {DispatchFailure.UNVERIFIED_DECISION}
    assert rig.https.calls == 0
    if forgery != "revoked key":
        # The forgery used up no claim: the gate's own clearance of the probe still sends.
        sent = rig.send(signed(clearance("fed", "web")))
        assert sorted(type(e).__name__ for e in sent) == ["ProviderDispatched"] * 2


def test_dispatch_refuses_a_provider_whose_entry_does_not_allow_the_purpose(rig: Rig) -> None:
    # Signed by the gate, but the operator has since narrowed fed's agreement.
    rig.registries.apply(provider("fed", [Purpose.FINANCIAL_FRAUD]).model_copy(
        update={"updated_at": NOW + timedelta(seconds=1)}))
    out = rig.send(signed(clearance("fed", "web")))
    by = {e.provider_id: e for e in out if isinstance(e, DispatchFailed | ProviderDispatched)}
    assert isinstance(by["fed"], DispatchFailed)
    assert by["fed"].reason is DispatchFailure.PURPOSE_NOT_ALLOWED
    assert isinstance(by["web"], ProviderDispatched) and rig.https.calls == 1


# --- the registry view: suspensions and keys ------------------------------------------


def test_a_suspension_from_results_holds_until_the_operator_writes_a_newer_entry() -> None:
    from schemas.events import ProviderSuspensionRequested, SuspensionReason

    registries = Registries()
    registries.apply(provider("fed"), 4)
    registries.apply(ProviderSuspensionRequested(
        provider_id="fed", reason=SuspensionReason.DELETION_OVERDUE, probe_id="prb-1",
        requested_at=NOW + timedelta(minutes=1)), 7)

    def status() -> str:
        return registries.providers["fed"].status

    assert status() == "suspended"
    assert registries.versions.suspensions == 7
    # Nothing else about the entry changed.
    assert registries.providers["fed"].endpoint == provider("fed").endpoint
    registries.apply(provider("fed").model_copy(
        update={"updated_at": NOW + timedelta(minutes=2)}), 5)
    assert status() == "active"


# --- the audit flags -----------------------------------------------------------------


class Audit:
    def __init__(self, directory: Path) -> None:
        self.clock = FakeClock(NOW)
        self.store = AuditStore(directory)
        self.inv = Invariants(self.store, InvariantSettings(30, 60), self.clock)

    def feed(self, event: Event) -> tuple[str, list[ComplianceViolation]]:
        rec = encode(event, "/frs/test", time=NOW)
        env = decode(rec.headers, rec.key, rec.value)
        out = asyncio.run(audit_handlers.on_record(
            "frs.t", 0, self.store.size, rec.value, env,
            audit_handlers.AuditPorts(self.store, self.inv), rec.headers))
        self.store.commit()
        return env.id, [v for v in out if isinstance(v, ComplianceViolation)
                        and v.invariant in (Invariant.UNVERIFIED_DECISION,
                                            Invariant.PURPOSE_NOT_ALLOWED)]

    def tick(self, seconds: float) -> list[ComplianceViolation]:
        self.clock.at(seconds)
        out = [v for v in self.inv.tick() if v.invariant is Invariant.UNVERIFIED_DECISION]
        self.store.commit()
        return out


def test_audit_flags_forged_decisions_and_accepts_the_gates(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit")
    assert audit.feed(trusted())[1] == []
    assert audit.feed(provider("fed"))[1] == []
    assert audit.feed(signed(clearance("fed")))[1] == []
    assert audit.feed(signed(denial()))[1] == []
    for forged in (clearance("fed", probe="prb-2", digest="0" * 64),
                   signed(clearance("fed", probe="prb-3"), ATTACKER).model_copy(
                       update={"key_id": key_id_for(POLICY_KEY.public_key())}),
                   denial("prb-4")):
        eid, (v,) = audit.feed(forged)
        assert (v.invariant, v.offending_event_id, v.probe_id) == (
            Invariant.UNVERIFIED_DECISION, eid, forged.probe_id)


def test_audit_waits_for_a_key_it_has_not_read_yet_then_judges(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit")
    # Topics interleave: the gate's decision may come before the key's record.
    assert audit.feed(signed(clearance("fed")))[1] == []
    assert audit.feed(trusted())[1] == []
    assert audit.tick(3600) == []
    # A key that never shows up: flagged once the grace is over.
    eid, found = audit.feed(signed(clearance("fed", probe="prb-5"), ATTACKER))
    assert found == [] and audit.tick(3600 + 29) == []
    (v,) = audit.tick(3600 + 31)
    assert v.offending_event_id == eid and "did not show" in v.detail


def test_audit_flags_a_clearance_for_a_purpose_the_provider_does_not_allow(
        tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit")
    audit.feed(trusted())
    audit.feed(provider("fed", [Purpose.FINANCIAL_FRAUD]))
    # Correctly signed (a gate key that leaked could sign anything): still flagged.
    eid, (v,) = audit.feed(signed(clearance("fed")))
    assert v.invariant is Invariant.PURPOSE_NOT_ALLOWED
    assert v.offending_event_id == f"{eid}/fed" and "human_trafficking" in v.detail


def test_a_replay_of_one_case_reads_the_trusted_keys_too() -> None:
    """`frs audit replay --case/--probe` judges the selection's decisions with the keys on
    the registry topic, which are about no probe: without them every genuine decision would
    look unverified."""
    from schemas.catalog import topic_for
    from services.audit.replay import for_invariants, replay_violations, selected
    from services.audit.settings import AuditSettings
    from services.kit.routing import RawRecord

    def record(event: Event, offset: int) -> tuple[RawRecord, Envelope]:
        rec = encode(event, "/frs/test", time=NOW)
        raw = RawRecord(topic_for(event).name, 0, offset, rec.key, rec.value, rec.headers)
        return raw, decode(rec.headers, rec.key, rec.value)

    records: list[Any] = [record(trusted(), 0), record(signed(clearance("fed")), 0),
                          record(clearance("fed", probe="prb-2"), 1)]
    settings = AuditSettings().invariant_settings()
    found = asyncio.run(replay_violations(for_invariants(records, {"prb-1"}), settings))
    # (the probe reached no end: liveness, not the point here)
    assert {inv for _, inv in found} == {"clearance_without_end"}
    # The forged one is still found when it is the one asked about.
    found = asyncio.run(replay_violations(for_invariants(records, {"prb-2"}), settings))
    assert "unverified_decision" in {inv for _, inv in found}
    # Without the registry records (the old selection), the genuine decision looked forged.
    found = asyncio.run(replay_violations(selected(records, {"prb-1"}, None), settings))
    assert "unverified_decision" in {inv for _, inv in found}
