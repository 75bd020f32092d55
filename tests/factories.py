"""Event builders shared by tests that publish events straight to the topics."""

from __future__ import annotations

from datetime import datetime, timedelta

from schemas.events import ProbeSubmitted
from schemas.types import ImageSource, Purpose, utcnow

DIGEST = "0" * 64


def submitted(probe_id: str, expires_at: datetime | None = None,
              exigent: bool = False) -> ProbeSubmitted:
    return ProbeSubmitted(probe_id=probe_id, request_id=f"req-{probe_id}", case_id="CASE-1",
                          agent_id="agent-7", purpose=Purpose.HUMAN_TRAFFICKING,
                          roi_refs=["ROI-1"], image_source=ImageSource.SURVEILLANCE, nexus=[],
                          exigent=exigent,
                          exigent_justification="imminent threat" if exigent else None,
                          unedited_attestation=True, vault_ref=f"v/{probe_id}",
                          image_format="jpeg", received_sha256=DIGEST, sanitized_sha256=DIGEST,
                          expires_at=expires_at or utcnow() + timedelta(hours=72),
                          submitted_at=utcnow())
