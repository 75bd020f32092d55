"""The Outcomes port (services/intake/outcomes.py), one contract for both implementations:
OutcomeLog (SQLite, in the vault index's file) and PgOutcomeLog (PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.events import ProbeRejected, RejectReason
from schemas.types import probe_id_for
from services.intake.outcomes import OutcomeLog, Outcomes, PgOutcomeLog
from services.vault import open_db
from tests.factories import submitted
from tests.integration.stores.conftest import shared_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def outcomes(backend: str, request: pytest.FixtureRequest,
                   tmp_path: Path) -> AsyncIterator[Outcomes]:
    if backend == "sqlite":
        conn = open_db(tmp_path / "intake.db")
        yield OutcomeLog(conn)
        conn.close()
        return
    state = await shared_state(request, "intake")
    yield PgOutcomeLog(state.pool)
    await state.close()


def rejected(request_id: str, reason: RejectReason = RejectReason.NO_FACE) -> ProbeRejected:
    return ProbeRejected(probe_id=probe_id_for(request_id), request_id=request_id,
                         reason=reason, detail="d", rejected_at=T0)


async def test_unknown_request_ids_have_no_outcome(outcomes: Outcomes) -> None:
    assert await outcomes.find("nope") is None
    assert await outcomes.get("nope") is None
    assert await outcomes.reuse("nope", "c") is None


async def test_an_outcome_comes_back_with_its_digests(outcomes: Outcomes) -> None:
    first = submitted("prb-1")
    await outcomes.record(first.request_id, first, content_sha256="c1", record_sha256="r1")
    found = await outcomes.find(first.request_id)
    assert found is not None
    assert (found.event, found.content_sha256, found.record_sha256) == (first, "c1", "r1")
    assert await outcomes.get(first.request_id) == first
    other = rejected("r-2")
    await outcomes.record("r-2", other)
    found = await outcomes.find("r-2")
    assert found is not None and (found.event, found.content_sha256) == (other, None)


async def test_the_first_outcome_wins(outcomes: Outcomes) -> None:
    await outcomes.record("r-1", rejected("r-1"), content_sha256="c1", record_sha256="r1")
    await outcomes.record("r-1", rejected("r-1", RejectReason.POLYGLOT), content_sha256="c2",
                          record_sha256="r2")
    found = await outcomes.find("r-1")
    assert found is not None
    assert (found.event, found.content_sha256) == (rejected("r-1"), "c1")


async def test_bind_fills_only_missing_digests(outcomes: Outcomes) -> None:
    await outcomes.record("old", rejected("old"))
    await outcomes.bind("old", "c1", "r1")
    await outcomes.bind("old", "c2", "r2")  # bound already: unchanged
    await outcomes.record("new", rejected("new"), content_sha256="c3", record_sha256=None)
    await outcomes.bind("new", "c4", "r4")
    old, new = await outcomes.find("old"), await outcomes.find("new")
    assert old is not None and (old.content_sha256, old.record_sha256) == ("c1", "r1")
    assert new is not None and (new.content_sha256, new.record_sha256) == ("c3", None)


async def test_a_reused_id_keeps_one_refusal_per_content(outcomes: Outcomes) -> None:
    refusal = rejected("r-1", RejectReason.REQUEST_ID_REUSED)
    await outcomes.record_reuse("r-1", "other", refusal)
    await outcomes.record_reuse("r-1", "other", rejected("r-1", RejectReason.POLYGLOT))
    assert await outcomes.reuse("r-1", "other") == refusal
    assert await outcomes.reuse("r-1", "third") is None
    assert await outcomes.find("r-1") is None  # a refusal is not the id's outcome
