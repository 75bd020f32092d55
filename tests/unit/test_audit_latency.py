"""End-to-end latency as the audit service measures it: request to each candidate list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.envelope import Envelope
from schemas.events import CandidatesReceived, DispatchFailed, DispatchFailure, Event
from schemas.types import ImageSource, Purpose, probe_id_for
from services.audit.app import RequestTimes
from services.cli.client import build_request
from services.intake.crypto import load_or_create_private_key

T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)


def envelope(event: Event, at: datetime) -> Envelope:
    return Envelope(id="e", source="/t", type=event.TYPE, subject=None, time=at,
                    causation_id=None, traceparent=None, event=event)


def candidates(probe_id: str) -> CandidatesReceived:
    return CandidatesReceived(probe_id=probe_id, provider_id="p", channel="webhook",
                              candidates=[], threshold=0, list_size=0, algorithm="a",
                              algorithm_version="1", received_at=T0)


def test_latency_from_request_to_candidates(tmp_path: object) -> None:
    from pathlib import Path

    key_path = Path(str(tmp_path)) / "k.pem"
    load_or_create_private_key(key_path)
    request = build_request(b"x", key_path.with_suffix(".pub.pem"), case_id="C", agent_id="a",
                            purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["R"],
                            image_source=ImageSource.OTHER, request_id="req-1")
    times = RequestTimes(capacity=2)
    probe = probe_id_for("req-1")
    assert times.observe(envelope(request, T0)) is None
    assert times.observe(envelope(candidates(probe), T0 + timedelta(seconds=1.5))) == 1.5
    # A second provider's list is timed from the same request.
    assert times.observe(envelope(candidates(probe), T0 + timedelta(seconds=4))) == 4.0
    assert times.observe(envelope(candidates("prb-unknown"), T0)) is None
    other = DispatchFailed(probe_id=probe, provider_id="p", reason=DispatchFailure.SUSPENDED,
                           detail="", failed_at=T0)
    assert times.observe(envelope(other, T0)) is None
    # Bounded: the oldest request is forgotten first.
    for rid in ("req-2", "req-3"):
        times.observe(envelope(request.model_copy(update={"request_id": rid}), T0))
    assert times.observe(envelope(candidates(probe), T0)) is None
