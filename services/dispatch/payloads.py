"""REQ-MINIMAL by construction: what may leave the system, one strict schema per transport.

A payload is built only from the fields policy cleared for that provider; the models
forbid any other field, so nothing else can be serialized onto the wire. The names of
the fields actually sent go into ``ProviderDispatched.fields_sent``."""

from __future__ import annotations

import base64
import hashlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.types import AgentId, OutboundField, Transport

RequestRef = Annotated[str, StringConstraints(pattern=r"^ref-[0-9a-f-]{36}$")]
Base64Photo = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9+/]+=*$", max_length=40_000_000)
]


class Outbound(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def fields_sent(self) -> list[OutboundField]:
        return [OutboundField(name) for name in self.model_fields_set]


class HttpsPayload(Outbound):
    """JSON body of the vendor upload (see services/dispatch/README.md)."""

    photo: Base64Photo | None = Field(default=None, repr=False)
    agent_id: AgentId | None = None
    request_ref: RequestRef | None = None


class EmailPayload(Outbound):
    """The JSON document inside the S/MIME envelope."""

    photo: Base64Photo | None = Field(default=None, repr=False)
    agent_id: AgentId | None = None
    request_ref: RequestRef | None = None


class RekognitionPayload(Outbound):
    """Rekognition searches by image only: the photo is the one field AWS receives."""

    photo: bytes = Field(repr=False)


PAYLOAD_MODELS: dict[Transport, type[Outbound]] = {
    Transport.HTTPS: HttpsPayload,
    Transport.SMIME_EMAIL: EmailPayload,
    Transport.REKOGNITION: RekognitionPayload,
}


class PhotoNotCleared(ValueError):
    """Policy did not clear the photo: there is nothing a provider could search with."""


def build_payload(
    transport: Transport, cleared: list[OutboundField], *, photo: bytes, agent_id: str,
    request_ref: str,
) -> Outbound:
    if OutboundField.PHOTO not in cleared:
        raise PhotoNotCleared("photo not cleared")
    if transport is Transport.REKOGNITION:
        return RekognitionPayload(photo=photo)
    values: dict[str, str] = {
        OutboundField.PHOTO.value: base64.b64encode(photo).decode("ascii"),
        OutboundField.AGENT_ID.value: agent_id,
        OutboundField.REQUEST_REF.value: request_ref,
    }
    model = PAYLOAD_MODELS[transport]
    # Only the cleared names are passed, so only they are in model_fields_set and on the wire.
    return model(**{name.value: values[name.value] for name in cleared})


def payload_body(payload: Outbound) -> bytes:
    """Canonical JSON of the fields set (what is sent, and what is digested)."""
    return payload.model_dump_json(exclude_unset=True).encode()


def payload_digest(payload: Outbound) -> str:
    if isinstance(payload, RekognitionPayload):
        return hashlib.sha256(payload.photo).hexdigest()
    return hashlib.sha256(payload_body(payload)).hexdigest()
