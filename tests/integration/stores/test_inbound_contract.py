"""Results' inbound ports (services/results/store.py), one contract for both
implementations: Nonces (NonceStore / PgNonceStore, webhook calls and reply mails) and
RefLookup (RequestRefs over the tracker's SQLite file / PgRequestRefs), each fed by the
writer its backend has in the service (the tracker's store, or the shared table)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.results.pg_store import PgNonceStore, PgRequestRefs
from services.results.store import Nonces, NonceStore, RefLookup, RequestRefs, TrackerStore
from services.results.tracking import ProbeState, ProviderTrack
from tests.integration.stores.conftest import shared_state

TABLES = ("nonces", "mail_replies")


@pytest.fixture
async def nonce_tables(backend: str, request: pytest.FixtureRequest,
                       tmp_path: Path) -> AsyncIterator[dict[str, Nonces]]:
    if backend == "sqlite":
        stores = {t: NonceStore(tmp_path / "results" / "nonces.sqlite3", t) for t in TABLES}
        yield dict(stores)
        for store in stores.values():
            store.close()
        return
    state = await shared_state(request, "results")
    yield {t: PgNonceStore(state.pool, t) for t in TABLES}
    await state.close()


@pytest.mark.parametrize("table", TABLES)
async def test_a_digest_is_claimed_once_per_window(nonce_tables: dict[str, Nonces],
                                                   table: str) -> None:
    nonces = nonce_tables[table]
    assert not await nonces.seen("d1", 1000.0, 600)
    assert await nonces.claim("d1", 1000.0, 600)
    assert not await nonces.claim("d1", 1001.0, 600)
    assert await nonces.seen("d1", 1500.0, 600)
    assert not await nonces.seen("d1", 1601.0, 600)  # out of the window
    assert await nonces.claim("d1", 1601.0, 600)  # so it may be claimed again
    assert not await nonces.claim("d1", 1602.0, 600)


async def test_a_released_claim_may_be_claimed_again(nonce_tables: dict[str, Nonces]) -> None:
    nonces = nonce_tables["nonces"]
    assert await nonces.claim("d1", 10.0, 60)
    await nonces.release("d1")
    assert not await nonces.seen("d1", 11.0, 60)
    assert await nonces.claim("d1", 11.0, 60)
    await nonces.release("never-claimed")


async def test_the_two_tables_are_apart(nonce_tables: dict[str, Nonces]) -> None:
    assert await nonce_tables["mail_replies"].claim("sha256:abc", 1000.0, 86400)
    # A webhook claim far later prunes its own table only.
    assert await nonce_tables["nonces"].claim("sha256:abc", 100_000.0, 600)
    assert await nonce_tables["mail_replies"].seen("sha256:abc", 2000.0, 86400)
    assert not await nonce_tables["nonces"].seen("other", 100_000.0, 600)


def test_unknown_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table"):
        PgNonceStore(None, "x; DROP TABLE nonces")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table"):
        NonceStore(tmp_path / "n.sqlite3", "x; DROP TABLE nonces")


@dataclass
class Refs:
    lookup: RefLookup
    write: Callable[[str, str, str], Awaitable[None]]


@pytest.fixture
async def refs(backend: str, request: pytest.FixtureRequest,
               tmp_path: Path) -> AsyncIterator[Refs]:
    if backend == "sqlite":
        path = tmp_path / "results" / "tracker.sqlite3"
        tracker = TrackerStore(path)
        reader = RequestRefs(path)

        async def through_the_tracker(ref: str, probe_id: str, provider_id: str) -> None:
            await tracker.put(ProbeState(
                probe_id=probe_id, providers={provider_id: ProviderTrack(request_ref=ref)}))
            await tracker.commit()

        yield Refs(reader, through_the_tracker)
        reader.close()
        tracker.close()
        return
    state = await shared_state(request, "results")
    shared = PgRequestRefs(state.pool)

    async def to_the_shared_table(ref: str, probe_id: str, provider_id: str) -> None:
        await shared.record([(ref, probe_id, provider_id)])

    yield Refs(shared, to_the_shared_table)
    await state.close()


async def test_a_request_ref_names_its_probe_and_provider(refs: Refs) -> None:
    assert await refs.lookup.lookup("ref-1") is None
    await refs.write("ref-1", "prb-1", "p1")
    assert await refs.lookup.lookup("ref-1") == ("prb-1", "p1")
    await refs.write("ref-1", "prb-other", "p2")  # a ref never moves to another send
    assert await refs.lookup.lookup("ref-1") == ("prb-1", "p1")
