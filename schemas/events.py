"""Every event on the bus, as frozen pydantic models.

Each model's ``TYPE`` is its versioned CloudEvents type; the topic it travels on is in
``schemas.catalog``. Events are keyed by probe id (``partition_key``) so one probe's
events stay ordered on one partition. No event carries image bytes in clear: only
``ProbeRequested`` carries an image, encrypted to the intake's public key.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from schemas.answers import raw_digest, reduce_answer
from schemas.types import (
    AgentId,
    CaseId,
    ImageSource,
    NonEmptyText,
    OutboundField,
    ProbeId,
    ProviderId,
    ProviderKind,
    Purpose,
    RequestId,
    RoiRef,
    Score,
    Sha256Hex,
    ShortText,
    StateCode,
    Transport,
    UtcDatetime,
    utcnow,
)

# An Ed25519 signature (64 bytes) and public key (32 bytes), standard base64; a key id.
DecisionSignature = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
Ed25519PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]

LeadMarking = Literal["INVESTIGATIVE LEAD ONLY - NOT A POSITIVE IDENTIFICATION"]
LEAD_MARKING: LeadMarking = "INVESTIGATIVE LEAD ONLY - NOT A POSITIVE IDENTIFICATION"


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Event(Model):
    """Base of every event: versioned, immutable, strict."""

    TYPE: ClassVar[str]
    schema_version: Literal[1] = 1

    def partition_key(self) -> str:
        return str(getattr(self, "probe_id"))  # noqa: B009 - every event but registries has one


# --- intake -------------------------------------------------------------------------


class EncryptedImage(Model):
    """Hybrid encryption to the intake's X25519 key: HKDF-SHA256, then AES-256-GCM."""

    scheme: Literal["x25519-hkdf-sha256-aes256gcm"] = "x25519-hkdf-sha256-aes256gcm"
    key_id: str = Field(max_length=64)
    ephemeral_public_key: str = Field(description="base64 raw X25519 public key")
    nonce: str = Field(description="base64 12-byte GCM nonce")
    ciphertext: str = Field(description="base64 AES-256-GCM ciphertext with tag")


class ProbeRequested(Event):
    TYPE: ClassVar[str] = "frs.probe.requested.v1"
    request_id: RequestId
    case_id: CaseId
    agent_id: AgentId
    purpose: Purpose
    roi_refs: list[RoiRef] = Field(max_length=50)
    image_source: ImageSource
    nexus: list[StateCode] = Field(default_factory=list, max_length=60)
    exigent: bool = False
    exigent_justification: NonEmptyText | None = None
    exigent_bypass: list[ShortText] = Field(default_factory=list, max_length=20)
    unedited_attestation: bool
    review_required: bool = False
    image: EncryptedImage
    requested_at: UtcDatetime = Field(default_factory=utcnow)

    def partition_key(self) -> str:
        return self.request_id


class QualityReport(Model):
    width: int = Field(ge=0)
    height: int = Field(ge=0)
    faces_found: int = Field(ge=0)
    largest_face_px: int = Field(ge=0)
    sharpness: float = Field(ge=0.0, description="variance of the Laplacian")
    exposure: float = Field(ge=0.0, le=1.0, description="mean luminance, 0..1")
    passed: bool
    failures: list[ShortText] = Field(default_factory=list, max_length=20)


class ProbeSubmitted(Event):
    TYPE: ClassVar[str] = "frs.probe.submitted.v1"
    probe_id: ProbeId
    request_id: RequestId
    case_id: CaseId
    agent_id: AgentId
    purpose: Purpose
    roi_refs: list[RoiRef] = Field(max_length=50)
    image_source: ImageSource
    nexus: list[StateCode] = Field(max_length=60)
    exigent: bool
    exigent_justification: NonEmptyText | None = None
    exigent_bypass: list[ShortText] = Field(default_factory=list, max_length=20)
    unedited_attestation: bool
    review_required: bool = False
    vault_ref: str
    image_format: Literal["jpeg", "png"]
    received_sha256: Sha256Hex
    sanitized_sha256: Sha256Hex
    quality: QualityReport | None = None
    expires_at: UtcDatetime
    submitted_at: UtcDatetime


class RejectReason(StrEnum):
    INVALID_FIELDS = "invalid_fields"
    UNDECRYPTABLE = "undecryptable"
    NOT_ATTESTED_UNEDITED = "not_attested_unedited"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_MANY_BYTES = "too_many_bytes"
    TOO_MANY_PIXELS = "too_many_pixels"
    # A JPEG with more scans than the cap: each scan is a pass over the whole image.
    TOO_MANY_SCANS = "too_many_scans"
    # The image worker hit its CPU-time, memory or wall-clock limit on it, or died on it.
    DECODE_LIMIT_EXCEEDED = "decode_limit_exceeded"
    CORRUPT_IMAGE = "corrupt_image"
    TRUNCATED_IMAGE = "truncated_image"
    MULTI_FRAME = "multi_frame"
    POLYGLOT = "polyglot"
    EMPTY_IMAGE = "empty_image"
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    TOO_BLURRED = "too_blurred"
    BAD_EXPOSURE = "bad_exposure"
    # A redelivered request whose image was stored, then purged, before its outcome was
    # recorded: it is never stored again.
    IMAGE_PURGED = "image_purged"
    # The request id was used before with other content (an idempotency key is bound to
    # its request). Carried under ``reused_probe_id(request_id)``, never the original
    # probe's id, so nothing keyed by that probe sees it.
    REQUEST_ID_REUSED = "request_id_reused"


class ProbeRejected(Event):
    TYPE: ClassVar[str] = "frs.probe.rejected.v1"
    probe_id: ProbeId
    request_id: str = Field(max_length=256)
    reason: RejectReason
    detail: str = Field(max_length=2000)
    rejected_at: UtcDatetime = Field(default_factory=utcnow)


class PurgeReason(StrEnum):
    EXPIRED = "expired"
    CASE_CLOSED = "case_closed"


class ImagePurged(Event):
    TYPE: ClassVar[str] = "frs.image.purged.v1"
    probe_id: ProbeId
    vault_ref: str
    object_kind: Literal["probe", "candidate"] = "probe"
    reason: PurgeReason
    expires_at: UtcDatetime
    purged_at: UtcDatetime


# --- policy --------------------------------------------------------------------------


class RegistryVersions(Model):
    """Offsets of the registry topics a decision read: enough to reproduce it."""

    cases: int = -1
    agents: int = -1
    providers: int = -1
    suspensions: int = -1


class ClearedProvider(Model):
    provider_id: ProviderId
    transport: Transport
    fields: list[OutboundField] = Field(max_length=10)


class ClaimCheck(Model):
    """Where a cleared probe's image is and what it must be: everything dispatch needs to
    send it, carried by the clearance itself so no service joins two topics to find it."""

    vault_ref: str
    agent_id: AgentId
    sanitized_sha256: Sha256Hex
    expires_at: UtcDatetime


class RuleDenial(Model):
    rule_id: str
    message: str


class ProviderDenial(Model):
    provider_id: ProviderId
    rules: list[RuleDenial] = Field(max_length=50)


class PolicyCleared(Event):
    """The providers a probe may be sent to, and the fields each may receive.

    Contract for dispatch: a clearance is not a standing permission. A provider that is
    suspended (registry ``status != "active"``) after this decision and before the send
    must not be sent to: dispatch re-reads the providers registry right before each send
    and records ``DispatchFailed(reason=suspended)`` instead.
    ``exigent=True`` means the emergency path waived ``bypassed_rules``; the probe stays
    flagged until a ``SupervisorReviewRecorded`` for it is on the log. ``inputs`` holds
    what the policy read, so ``frs policy explain --replay`` can re-evaluate it."""

    TYPE: ClassVar[str] = "frs.policy.cleared.v1"
    probe_id: ProbeId
    case_id: CaseId
    cleared: list[ClearedProvider] = Field(min_length=1, max_length=100)
    denied: list[ProviderDenial] = Field(default_factory=list, max_length=100)
    exigent: bool = False
    bypassed_rules: list[ShortText] = Field(default_factory=list, max_length=20)
    review_required: bool = False
    policy_digest: Sha256Hex
    registry_versions: RegistryVersions
    decided_at: UtcDatetime
    inputs: DecisionInputs | None = None
    # Set by the policy gate on every clearance. Optional only so clearances made before
    # it existed still decode; dispatch refuses to send on one without it.
    claim: ClaimCheck | None = None
    # The policy gate's Ed25519 signature over the rest (schemas/decisions.py) and the id
    # of its key in frs.registry.trusted_keys. Optional only so older decisions decode:
    # dispatch refuses, and the audit flags, a decision without a valid one.
    signature: DecisionSignature | None = None
    key_id: KeyId | None = None


class PolicyDenied(Event):
    """No provider cleared: per provider, the rule ids that denied and a sentence each."""

    TYPE: ClassVar[str] = "frs.policy.denied.v1"
    probe_id: ProbeId
    case_id: CaseId
    denied: list[ProviderDenial] = Field(max_length=100)
    policy_digest: Sha256Hex
    registry_versions: RegistryVersions
    decided_at: UtcDatetime
    inputs: DecisionInputs | None = None
    signature: DecisionSignature | None = None
    key_id: KeyId | None = None


class SupervisorReviewRecorded(Event):
    TYPE: ClassVar[str] = "frs.exigent.reviewed.v1"
    probe_id: ProbeId
    supervisor_id: AgentId
    approved: bool
    notes: str = Field(default="", max_length=2000)
    reviewed_at: UtcDatetime


class ExigentReviewOverdue(Event):
    TYPE: ClassVar[str] = "frs.exigent.review_overdue.v1"
    probe_id: ProbeId
    due_at: UtcDatetime


# --- dispatch ------------------------------------------------------------------------


class ProviderDispatched(Event):
    TYPE: ClassVar[str] = "frs.provider.dispatched.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    dispatch_id: str
    transport: Transport
    fields_sent: list[OutboundField] = Field(max_length=10)
    request_ref: str = Field(description="opaque id the provider answers to")
    sent_at: UtcDatetime
    response_due_at: UtcDatetime
    deletion_due_at: UtcDatetime
    payload_sha256: Sha256Hex | None = Field(
        default=None, description="SHA-256 of the exact payload sent (the JSON body, or the "
        "image bytes for Rekognition)")
    attempts: int = Field(default=1, ge=1, description="transport attempts, including the last")
    claimed_at: UtcDatetime | None = Field(
        default=None, description="when the dispatch ledger first claimed this send")


class DispatchFailure(StrEnum):
    SUSPENDED = "suspended"
    UNKNOWN_PROVIDER = "unknown_provider"
    IMAGE_PURGED = "image_purged"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PERMANENT_ERROR = "permanent_error"
    CIRCUIT_OPEN = "circuit_open"
    OUTCOME_UNKNOWN = "outcome_unknown"
    # The clearance's signature is missing, or does not verify against an active
    # policy-decisions key of the trusted-keys registry: not a decision of the policy gate.
    UNVERIFIED_DECISION = "unverified_decision"
    # The provider's registry entry (or the decision's own snapshot of it) does not allow
    # the purpose the probe states.
    PURPOSE_NOT_ALLOWED = "purpose_not_allowed"


class DispatchFailed(Event):
    TYPE: ClassVar[str] = "frs.dispatch.failed.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    reason: DispatchFailure
    detail: str = Field(max_length=2000)
    failed_at: UtcDatetime
    attempts: int = Field(default=0, ge=0, description="transport attempts made before failing")


# --- results -------------------------------------------------------------------------


class Candidate(Model):
    rank: int = Field(ge=1)
    score: Score
    score_scale: str = Field(max_length=64)
    gallery: str = Field(max_length=128)
    candidate_ref: str = Field(max_length=256)
    photo_vault_ref: str | None = None


class CandidatesReceived(Event):
    """REQ-LEADS-ONLY: a ranked candidate list is a lead, never an identification."""

    TYPE: ClassVar[str] = "frs.candidates.received.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    channel: Literal["webhook", "email", "rekognition"]
    candidates: list[Candidate] = Field(max_length=50)
    threshold: float
    list_size: int = Field(ge=0, le=50)
    algorithm: str = Field(max_length=128)
    algorithm_version: str = Field(max_length=64)
    mode: Literal["investigative"] = "investigative"
    lead_marking: LeadMarking = LEAD_MARKING
    truncated_from: int | None = None
    received_at: UtcDatetime

    @model_validator(mode="after")
    def _ranked(self) -> CandidatesReceived:
        ranks = [c.rank for c in self.candidates]
        if ranks != sorted(ranks) or len(set(ranks)) != len(ranks):
            raise ValueError("candidates must be in strictly increasing rank order")
        return self


class ProviderAnswered(Event):
    """A provider's answer, as received on any channel, before normalization, reduced to
    the fields the normalizer reads (schemas/answers.py): never image bytes, never a field
    nobody asked for. What was dropped is named by path; the raw answer is kept only as
    its SHA-256."""

    TYPE: ClassVar[str] = "frs.provider.answered.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    channel: Literal["webhook", "email", "rekognition"]
    payload: dict[str, Any]
    received_at: UtcDatetime
    raw_sha256: Sha256Hex | None = None
    dropped_fields: list[ShortText] = Field(default_factory=list, max_length=50)

    @model_validator(mode="before")
    @classmethod
    def _allow_list(cls, data: Any) -> Any:
        # Every producer builds the event through here, so nothing can skip the reduction.
        if not isinstance(data, dict) or "payload" not in data:
            return data
        kept, dropped = reduce_answer(data["payload"])
        digest = data.get("raw_sha256") or raw_digest(data["payload"])
        return {**data, "payload": kept, "raw_sha256": digest,
                "dropped_fields": list(data.get("dropped_fields") or []) or dropped}


class ProviderResponseRejected(Event):
    TYPE: ClassVar[str] = "frs.provider_response.rejected.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    reason: str = Field(max_length=64)
    detail: str = Field(max_length=2000)
    rejected_at: UtcDatetime


class NoResponse(Event):
    TYPE: ClassVar[str] = "frs.provider.no_response.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    deadline: UtcDatetime


class ProbeSettled(Event):
    TYPE: ClassVar[str] = "frs.probe.settled.v1"
    probe_id: ProbeId
    answered: list[ProviderId] = Field(max_length=100)
    failed: list[ProviderId] = Field(max_length=100)
    no_response: list[ProviderId] = Field(max_length=100)
    settled_at: UtcDatetime


class ReviewRequested(Event):
    TYPE: ClassVar[str] = "frs.review.requested.v1"
    probe_id: ProbeId
    reason: str = Field(max_length=256)
    requested_at: UtcDatetime


class Conclusion(StrEnum):
    """REQ-EXAMINER: morphological comparison outcome; still a lead, never an identity."""

    LIKELY_SAME = "likely_same"
    INCONCLUSIVE = "inconclusive"
    LIKELY_DIFFERENT = "likely_different"


class ExaminerConclusion(Model):
    provider_id: ProviderId
    candidate_ref: str
    conclusion: Conclusion
    notes: str = Field(default="", max_length=2000)


class ReviewCompleted(Event):
    TYPE: ClassVar[str] = "frs.review.completed.v1"
    probe_id: ProbeId
    examiner_id: AgentId
    conclusions: list[ExaminerConclusion] = Field(max_length=50)
    completed_at: UtcDatetime


class DeletionConfirmed(Event):
    TYPE: ClassVar[str] = "frs.deletion.confirmed.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    confirmed_at: UtcDatetime


class DeletionOverdue(Event):
    TYPE: ClassVar[str] = "frs.deletion.overdue.v1"
    probe_id: ProbeId
    provider_id: ProviderId
    due_at: UtcDatetime
    provider_suspended: bool = False


# --- audit ---------------------------------------------------------------------------


class CheckpointPublished(Event):
    TYPE: ClassVar[str] = "frs.audit.checkpoint.v1"
    origin: str
    tree_size: int = Field(ge=0)
    root_hash: str = Field(description="base64 SHA-256 Merkle root")
    note: str = Field(description="C2SP signed-note text of the checkpoint")
    published_at: UtcDatetime

    def partition_key(self) -> str:
        return self.origin


class Invariant(StrEnum):
    DISPATCH_WITHOUT_CLEARANCE = "dispatch_without_clearance"
    DISPATCH_AFTER_PURGE = "dispatch_after_purge"
    IMAGE_PAST_EXPIRY = "image_past_expiry"
    EXTRA_FIELDS_SENT = "extra_fields_sent"
    CANDIDATES_WITHOUT_LEAD_MARKING = "candidates_without_lead_marking"
    EXIGENT_WITHOUT_REVIEW = "exigent_without_review"
    # Liveness: a cleared provider's part of a probe reached no end (answer, NoResponse,
    # DispatchFailed, then ProbeSettled) by its answer deadline plus the audit's grace.
    CLEARANCE_WITHOUT_END = "clearance_without_end"
    # A PolicyCleared or PolicyDenied whose signature is missing or does not verify
    # against an active policy-decisions key on frs.registry.trusted_keys.
    UNVERIFIED_DECISION = "unverified_decision"
    # A clearance for a provider whose registry entry does not allow the probe's purpose.
    PURPOSE_NOT_ALLOWED = "purpose_not_allowed"


class ComplianceViolation(Event):
    TYPE: ClassVar[str] = "frs.compliance.violation.v1"
    probe_id: ProbeId
    invariant: Invariant
    detail: str = Field(max_length=2000)
    offending_event_id: str
    detected_at: UtcDatetime


# --- oversight -----------------------------------------------------------------------


class UsageRule(StrEnum):
    """The usage patterns the oversight service watches (services/oversight/rules.py)."""

    SEARCHES_PER_HOUR = "searches_per_hour"
    SEARCHES_PER_DAY = "searches_per_day"
    DISTINCT_CASES = "distinct_cases"
    PURPOSE_SHOPPING = "purpose_shopping"
    PROVIDER_FANOUT = "provider_fanout"
    EXIGENT_PER_WEEK = "exigent_per_week"
    REVIEW_MISSING = "review_missing"
    DELETION_OVERDUE_SHARE = "deletion_overdue_share"


class UsageReason(StrEnum):
    """Why a rule fired, as a stable code."""

    COUNT_OVER_LIMIT = "count_over_limit"
    DISTINCT_OVER_LIMIT = "distinct_over_limit"
    RESUBMITTED_AFTER_DENIAL = "resubmitted_after_denial"
    REVIEW_PAST_DEADLINE = "review_past_deadline"
    SHARE_OVER_LIMIT = "share_over_limit"


_ALERT_NAMESPACE = uuid.UUID("0b7d3f5e-9a0c-4d2e-8f71-5c1a2e6b9d40")


def usage_alert_id(rule: UsageRule, subject: str, window_start: datetime,
                   window_end: datetime) -> str:
    """The same (rule, subject, window) always names the same alert: a redelivered or
    replayed event cannot make a second one."""
    name = f"{rule.value}|{subject}|{window_start.isoformat()}|{window_end.isoformat()}"
    return f"ua-{uuid.uuid5(_ALERT_NAMESPACE, name)}"


class UsageAlert(Event):
    """A usage pattern crossed a threshold: ids and digests as evidence, never images."""

    TYPE: ClassVar[str] = "frs.oversight.alert.v1"
    alert_id: str = Field(pattern=r"^ua-[0-9a-f-]{36}$")
    rule: UsageRule
    reason: UsageReason
    subject_kind: Literal["agent", "image_digest", "provider", "probe"]
    subject: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    window_start: UtcDatetime
    window_end: UtcDatetime
    count: int = Field(ge=0, description="what the rule counted in the window")
    total: int | None = Field(default=None, ge=0, description="denominator of a share rule")
    threshold: float = Field(ge=0, description="the limit the count (or share) went over")
    evidence_ids: list[ShortText] = Field(
        max_length=100, description="CloudEvent ids of the events that made the count")
    probe_ids: list[ProbeId] = Field(default_factory=list, max_length=100)
    observed_at: UtcDatetime = Field(description="time of the event that crossed it")

    @model_validator(mode="after")
    def _deterministic_id(self) -> UsageAlert:
        if self.alert_id != usage_alert_id(self.rule, self.subject, self.window_start,
                                           self.window_end):
            raise ValueError("alert_id must be usage_alert_id(rule, subject, window)")
        return self

    def partition_key(self) -> str:
        return self.subject


# --- registries (compacted topics, keyed by the entry's own id) ----------------------


class CaseRecord(Event):
    TYPE: ClassVar[str] = "frs.registry.case.v1"
    case_id: CaseId
    status: Literal["open", "closed"]
    offense_category: Purpose
    roi_refs: list[RoiRef] = Field(default_factory=list, max_length=500)
    updated_at: UtcDatetime

    def partition_key(self) -> str:
        return self.case_id


class AgentRecord(Event):
    TYPE: ClassVar[str] = "frs.registry.agent.v1"
    agent_id: AgentId
    role: Literal["agent", "supervisor", "examiner"]
    training_valid_until: UtcDatetime | None = None
    supervisor_id: AgentId | None = None
    updated_at: UtcDatetime

    def partition_key(self) -> str:
        return self.agent_id


class ProviderRecord(Event):
    TYPE: ClassVar[str] = "frs.registry.provider.v1"
    provider_id: ProviderId
    name: str = Field(max_length=200)
    kind: ProviderKind
    jurisdictions: list[StateCode] = Field(default_factory=list, max_length=60)
    transport: Transport
    endpoint: str = Field(max_length=500, description="URL, mailbox or Rekognition collection")
    status: Literal["active", "suspended"] = "active"
    attestation_valid_until: UtcDatetime | None = None
    accuracy_evaluation_ref: str | None = None
    max_candidates: int = Field(default=20, ge=2, le=50)
    allowed_purposes: list[Purpose] = Field(default_factory=lambda: list(Purpose), max_length=20)
    response_deadline_s: int = Field(default=3600, ge=1)
    deletion_deadline_s: int = Field(default=86400, ge=1)
    requires_review: bool = False
    certificate_pem: str | None = Field(default=None, description="S/MIME recipient cert")
    updated_at: UtcDatetime

    def partition_key(self) -> str:
        return self.provider_id


class SuspensionReason(StrEnum):
    DELETION_OVERDUE = "deletion_overdue"


class ProviderSuspensionRequested(Event):
    """The results service's one say over a provider: suspend it, and why. Registry views
    (services/kit/registry.py) apply it as status "suspended" over the provider's entry
    until the operator writes a newer entry (``frs registry activate``). It can change
    nothing else about a provider."""

    TYPE: ClassVar[str] = "frs.registry.suspension.v1"
    provider_id: ProviderId
    reason: SuspensionReason
    probe_id: ProbeId | None = Field(default=None, description="the probe that showed it")
    requested_at: UtcDatetime

    def partition_key(self) -> str:
        return self.provider_id


class TrustedKey(Event):
    """A public key the operator trusts for one purpose: "policy-decisions" keys verify
    the policy gate's signatures. Written only by the operator (``frs registry
    trust-key``), never by the service that holds the private key."""

    TYPE: ClassVar[str] = "frs.registry.trusted_key.v1"
    key_id: KeyId
    purpose: Literal["policy-decisions"] = "policy-decisions"
    algorithm: Literal["ed25519"] = "ed25519"
    public_key: Ed25519PublicKeyB64
    status: Literal["active", "revoked"] = "active"
    updated_at: UtcDatetime

    def partition_key(self) -> str:
        return self.key_id


# --- policy decision inputs (after the registry records they embed) -----------------


class PolicyRequest(Model):
    """The probe's statements the policy reads (no image, no digests)."""

    agent_id: AgentId
    case_id: CaseId
    purpose: Purpose
    roi_refs: list[RoiRef] = Field(max_length=50)
    nexus: list[StateCode] = Field(max_length=60)
    unedited_attestation: bool
    quality_passed: bool | None = None
    exigent: bool = False
    exigent_justification: NonEmptyText | None = None
    exigent_bypass: list[ShortText] = Field(default_factory=list, max_length=20)


class DecisionInputs(Model):
    """Everything a policy decision read, so it can be replayed from the log alone:
    the probe's statements, the decision time and the registry entries as they were
    (``None``: not in the registry)."""

    request: PolicyRequest
    evaluated_at: UtcDatetime
    case: CaseRecord | None = None
    agent: AgentRecord | None = None
    providers: list[ProviderRecord] = Field(default_factory=list, max_length=100)


PolicyCleared.model_rebuild()
PolicyDenied.model_rebuild()

ALL_EVENTS: tuple[type[Event], ...] = (
    ProbeRequested,
    ProbeSubmitted,
    ProbeRejected,
    ImagePurged,
    PolicyCleared,
    PolicyDenied,
    SupervisorReviewRecorded,
    ExigentReviewOverdue,
    ProviderDispatched,
    DispatchFailed,
    ProviderAnswered,
    CandidatesReceived,
    ProviderResponseRejected,
    NoResponse,
    ProbeSettled,
    ReviewRequested,
    ReviewCompleted,
    DeletionConfirmed,
    DeletionOverdue,
    CheckpointPublished,
    ComplianceViolation,
    UsageAlert,
    CaseRecord,
    AgentRecord,
    ProviderRecord,
    ProviderSuspensionRequested,
    TrustedKey,
)

EVENTS_BY_TYPE: dict[str, type[Event]] = {e.TYPE: e for e in ALL_EVENTS}
