"""Registry entries and probes for policy unit tests (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import (
    AgentRecord,
    CaseRecord,
    DecisionInputs,
    PolicyRequest,
    ProbeSubmitted,
    ProviderRecord,
    QualityReport,
)
from schemas.types import Purpose

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
YEAR = NOW + timedelta(days=365)
PAST = NOW - timedelta(days=1)


def case(**over: Any) -> CaseRecord:
    base: dict[str, Any] = {"case_id": "CASE-1", "status": "open",
                            "offense_category": Purpose.HUMAN_TRAFFICKING,
                            "roi_refs": ["ROI-1", "ROI-2"], "updated_at": NOW}
    return CaseRecord(**{**base, **over})


def agent(**over: Any) -> AgentRecord:
    base: dict[str, Any] = {"agent_id": "agent-7", "role": "agent",
                            "training_valid_until": YEAR, "supervisor_id": "sup-1",
                            "updated_at": NOW}
    return AgentRecord(**{**base, **over})


def provider(**over: Any) -> ProviderRecord:
    base: dict[str, Any] = {"provider_id": "fed-ngi", "name": "Federal gallery",
                            "kind": "federal", "transport": "https",
                            "endpoint": "https://127.0.0.1:8443/search",
                            "attestation_valid_until": YEAR, "updated_at": NOW}
    return ProviderRecord(**{**base, **over})


def state_provider(**over: Any) -> ProviderRecord:
    return provider(**{"provider_id": "va-state", "name": "Virginia State Police",
                       "kind": "state_local", "jurisdictions": ["VA"], **over})


def request(**over: Any) -> PolicyRequest:
    base: dict[str, Any] = {"agent_id": "agent-7", "case_id": "CASE-1",
                            "purpose": Purpose.HUMAN_TRAFFICKING, "roi_refs": ["ROI-1"],
                            "nexus": [], "unedited_attestation": True}
    return PolicyRequest(**{**base, **over})


def inputs(req: PolicyRequest | None = None, *, case_: CaseRecord | str | None = "default",
           agent_: AgentRecord | str | None = "default",
           providers: list[ProviderRecord] | None = None) -> DecisionInputs:
    return DecisionInputs(
        request=req or request(), evaluated_at=NOW,
        case=case() if case_ == "default" else case_,  # type: ignore[arg-type]
        agent=agent() if agent_ == "default" else agent_,  # type: ignore[arg-type]
        providers=providers if providers is not None else [provider()],
    )


def quality(passed: bool) -> QualityReport:
    return QualityReport(width=512, height=512, faces_found=1, largest_face_px=200,
                         sharpness=120.0, exposure=0.5, passed=passed,
                         failures=[] if passed else ["too_blurred"])


def probe(**over: Any) -> ProbeSubmitted:
    base: dict[str, Any] = {
        "probe_id": "prb-1", "request_id": "req-1", "case_id": "CASE-1",
        "agent_id": "agent-7", "purpose": Purpose.HUMAN_TRAFFICKING, "roi_refs": ["ROI-1"],
        "image_source": "surveillance", "nexus": [], "exigent": False,
        "unedited_attestation": True, "vault_ref": "vault:prb-1", "image_format": "jpeg",
        "received_sha256": "a" * 64, "sanitized_sha256": "b" * 64,
        "expires_at": NOW + timedelta(hours=72), "submitted_at": NOW,
    }
    return ProbeSubmitted(**{**base, **over})
