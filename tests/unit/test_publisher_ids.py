"""The kit sends a probe's one settlement (and one review request) under a fixed id, so a
repeat after a crash is the same CloudEvent; every other event gets a fresh id."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import DeletionConfirmed, ProbeSettled, ReviewRequested, probe_event_id
from services.kit.publisher import Publisher

AT = datetime(2026, 12, 5, tzinfo=UTC)


async def test_a_settlement_goes_out_under_its_fixed_id() -> None:
    publisher = Publisher("127.0.0.1:1", "/frs/results")  # prepare() does not connect

    def ce_id(event: ProbeSettled | ReviewRequested) -> bytes:
        return dict(publisher.prepare(event).record.headers)["ce_id"]

    settled = ProbeSettled(probe_id="prb-1", answered=["a"], failed=[], no_response=[],
                           settled_at=AT)
    later = settled.model_copy(update={"settled_at": datetime(2026, 12, 6, tzinfo=UTC)})
    assert ce_id(settled) == ce_id(later) == probe_event_id(ProbeSettled.TYPE, "prb-1").encode()
    other = settled.model_copy(update={"probe_id": "prb-2"})
    assert ce_id(other) != ce_id(settled)
    review = ReviewRequested(probe_id="prb-1", reason="policy", requested_at=AT)
    assert ce_id(review) == ce_id(review) != ce_id(settled)
    # Not every event: a deletion receipt is a new event each time one comes in.
    receipt = DeletionConfirmed(probe_id="prb-1", provider_id="a", confirmed_at=AT)
    assert receipt.fixed_id() is None
    first, second = (dict(publisher.prepare(receipt).record.headers)["ce_id"]
                     for _ in range(2))
    assert first != second
