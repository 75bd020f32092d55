"""Typed identifiers, enums and small value types shared by every event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field, StringConstraints

# Ids are opaque strings with a fixed alphabet: they end up in headers, keys and paths.
_ID = StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
RequestId = Annotated[str, _ID]
ProbeId = Annotated[str, _ID]
CaseId = Annotated[str, _ID]
AgentId = Annotated[str, _ID]
ProviderId = Annotated[str, _ID]
RoiRef = Annotated[str, _ID]
StateCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
NonEmptyText = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
# A rule id, a reason code: short by nature, bounded so a list of them cannot grow a record.
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def _require_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_require_utc)]

# Probe ids derive from the upstream request id, so a redelivered request maps onto the
# same probe and every downstream effect keyed by probe id stays idempotent.
_PROBE_NAMESPACE = uuid.UUID("6f6c1f0e-3c39-4bb5-9a55-8c1de1f0b7a1")


def probe_id_for(request_id: str) -> str:
    return f"prb-{uuid.uuid5(_PROBE_NAMESPACE, request_id)}"


# A submission refused for reusing a request id with other content gets a probe id of its
# own (another namespace: no request id maps onto it), so its ProbeRejected lands on no
# state of the probe that request id already names.
_REUSED_NAMESPACE = uuid.uuid5(_PROBE_NAMESPACE, "request-id-reused")


def reused_probe_id(request_id: str) -> str:
    return f"prb-{uuid.uuid5(_REUSED_NAMESPACE, request_id)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Purpose(StrEnum):
    """REQ-PURPOSE: the only purposes a search may serve. No free text."""

    CHILD_EXPLOITATION_VICTIM = "child_exploitation_victim"
    CHILD_EXPLOITATION_SUBJECT = "child_exploitation_subject"
    HUMAN_TRAFFICKING = "human_trafficking"
    FINANCIAL_FRAUD = "financial_fraud"
    IDENTITY_BENEFIT_FRAUD = "identity_benefit_fraud"
    TRANSNATIONAL_CRIMINAL_ORGANIZATION = "transnational_criminal_organization"


class ImageSource(StrEnum):
    MUG_SHOT = "mug_shot"
    SURVEILLANCE = "surveillance"
    SOCIAL_MEDIA = "social_media"
    SEIZED_DEVICE = "seized_device"
    VIDEO_STILL = "video_still"
    OTHER = "other"


class ProviderKind(StrEnum):
    STATE_LOCAL = "state_local"
    FUSION_CENTER = "fusion_center"
    FEDERAL = "federal"
    COMMERCIAL = "commercial"


class Transport(StrEnum):
    HTTPS = "https"
    SMIME_EMAIL = "smime_email"
    REKOGNITION = "rekognition"


class OutboundField(StrEnum):
    """REQ-MINIMAL: the complete set of fields a provider may ever receive."""

    PHOTO = "photo"
    AGENT_ID = "agent_id"
    REQUEST_REF = "request_ref"


MINIMAL_FIELDS: tuple[OutboundField, ...] = tuple(OutboundField)

Score = Annotated[float, Field(ge=0.0)]
