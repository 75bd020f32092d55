"""One audit log from many ingesters, on PostgreSQL (migration 0010, services/audit/
sequencer.py), below the service: the queue takes each record once however often and by
whichever instance it is ingested; the lease's holder sequences it into one log without
gap or duplicate; a leader whose lease was taken can neither append nor sign, and the
tree and its checkpoints go on across the change of leader."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.catalog import topic_for
from schemas.envelope import DecodeError, Envelope, Headers, decode, encode
from schemas.events import ComplianceViolation, PolicyCleared
from services.audit import handlers
from services.audit.bench import _lifecycle, run
from services.audit.checkpoint import Signer, Verifier
from services.audit.invariants import Invariants, InvariantSettings, violations_metric
from services.audit.pg_store import Fenced, PgAuditStore
from services.audit.sequencer import IngestQueue, Lease, PgLeaseTable, read_lease, sequence_batch
from services.audit.store import AuditStore, canonical
from services.audit.verify import verify_store
from tests.integration.stores.conftest import conninfo
from tests.integration.stores.test_audit_store_contract import empty_audit_tables, pg_location
from tests.pg import PgServer

pytestmark = pytest.mark.integration
ORIGIN = "frs-broker.test/audit"
Record = tuple[str, int, int, Headers, bytes | None, Envelope | DecodeError]


@pytest.fixture
def pg(pg_migrated: PgServer) -> Iterator[PgServer]:
    empty_audit_tables(pg_migrated)
    yield pg_migrated


def records(n: int) -> list[Record]:
    """A probe's life, over and over, as consumed (topic, partition, offset), with one
    record that is no CloudEvent."""
    now = datetime.now(UTC)
    out: list[Record] = []
    i = 0
    while len(out) < n:
        for event in _lifecycle(i, now):
            rec = encode(event, "/frs/test")
            out.append((topic_for(event).name, 0, len(out), rec.headers, rec.value,
                        decode(rec.headers, rec.key, rec.value)))
        i += 1
    out[5] = ("frs.results.events", 0, 5, [], b"not an event",
              DecodeError("not_cloudevent", "no ce_type"))
    return out[:n]


def ingest(queue: IngestQueue, batch: list[Record], invariants: Invariants) -> int:
    for topic, partition, offset, headers, value, decoded in batch:
        meta, body = handlers.leaf_for(topic, partition, offset, value, decoded, headers)
        kept = handlers.invariant_input(headers, None, value, decoded) \
            if invariants.concerns(topic, decoded) else None
        queue.add(meta, body, kept)
    return queue.commit()


def sequencer(pg: PgServer, name: str) -> tuple[PgAuditStore, Invariants, Lease]:
    store = PgAuditStore.connect(pg_location(pg))
    invariants = Invariants(store, InvariantSettings(30.0, 300.0), lambda: datetime.now(UTC))
    return store, invariants, Lease(PgLeaseTable(pg_location(pg)), name, 8.0)


def drain(store: PgAuditStore, invariants: Invariants) -> None:
    while sequence_batch(store, invariants, 100)[0] == 100:
        pass


def expire_lease(pg: PgServer) -> None:
    with psycopg.connect(**conninfo(pg, "owner")) as conn:
        conn.execute("UPDATE audit_sequencer_lease SET expires_at = now() - interval '1 s'")


def log_rows(pg: PgServer) -> list[tuple[int, str, int, int]]:
    with psycopg.connect(**conninfo(pg, "owner")) as conn:
        return [(int(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in conn.execute(
            'SELECT idx, topic, partition, "offset" FROM audit_leaves ORDER BY idx')]


def test_two_ingesters_one_sequencer_make_one_log_without_gap_or_duplicate(
        pg: PgServer) -> None:
    store, invariants, lease = sequencer(pg, "frs-audit-a")
    a, b = IngestQueue(pg_location(pg)), IngestQueue(pg_location(pg))
    recs = records(700)
    # Both ingest overlapping halves, some twice (a redelivery after a rebalance).
    assert ingest(a, recs[:400], invariants) == 400
    assert ingest(b, recs[300:], invariants) == 300  # 300..399 are in already
    assert ingest(b, recs[350:420], invariants) == 0
    assert lease.keep() and lease.epoch == 1
    store.fence = lease.epoch
    drain(store, invariants)
    # Sequenced already, ingested again (a late redelivery): not a second leaf.
    assert ingest(a, recs[:50], invariants) == 50
    # The same CloudEvent at another offset (a producer's retry): kept once, whether its
    # first copy is queued still or sequenced already.
    topic, _, _, headers, value, decoded = recs[10]
    assert ingest(a, [(topic, 0, 10_000, headers, value, decoded)], invariants) == 0
    drain(store, invariants)
    assert ingest(a, [(topic, 0, 10_001, headers, value, decoded)], invariants) == 1
    drain(store, invariants)
    rows = log_rows(pg)
    assert [r[0] for r in rows] == list(range(700))
    assert [r[3] for r in rows] == list(range(700))  # the arrival order, each once
    signer = Signer(ORIGIN, Ed25519PrivateKey.generate())
    policy = handlers.CheckpointPolicy(signer, ORIGIN, 100, 1e9, lambda: datetime.now(UTC))
    handlers.make_checkpoint(store, policy)
    report = verify_store(pg_location(pg), Verifier.parse(signer.verifier_key), ORIGIN)
    assert report.ok and report.tree_size == 700, report
    for q in (a, b):
        q.close()
    store.close()


def test_queued_leaves_are_the_bytes_the_single_instance_appends(pg: PgServer) -> None:
    recs = records(30)
    store, invariants, lease = sequencer(pg, "frs-audit-a")
    queue = IngestQueue(pg_location(pg))
    ingest(queue, recs, invariants)
    assert lease.keep()
    store.fence = lease.epoch
    drain(store, invariants)
    expected = []
    for i, (topic, partition, offset, headers, value, decoded) in enumerate(recs):
        _, body = handlers.leaf_for(topic, partition, offset, value, decoded, headers)
        expected.append(canonical({**body, "index": i}))
    assert store.leaves() == expected
    queue.close()
    store.close()


def test_a_stale_leader_can_neither_append_nor_sign_and_the_tree_goes_on(
        pg: PgServer) -> None:
    signer = Signer(ORIGIN, Ed25519PrivateKey.generate())
    policy = handlers.CheckpointPolicy(signer, ORIGIN, 100, 1e9, lambda: datetime.now(UTC))
    old, old_inv, old_lease = sequencer(pg, "frs-audit-a")
    new, new_inv, new_lease = sequencer(pg, "frs-audit-b")
    queue = IngestQueue(pg_location(pg))
    recs = records(300)
    ingest(queue, recs[:100], old_inv)
    assert old_lease.keep() and not new_lease.keep()  # held: the standby waits
    old.fence = old_lease.epoch
    drain(old, old_inv)
    handlers.make_checkpoint(old, policy)
    # The leader stops (SIGSTOP); its lease runs out; the standby takes it.
    expire_lease(pg)
    assert new_lease.keep() and new_lease.epoch == 2
    new.fence = new_lease.epoch
    ingest(queue, recs[100:200], new_inv)
    # Back from the stop, the old leader still believes it leads: its writes fail.
    with pytest.raises(Fenced):
        sequence_batch(old, old_inv, 100)
    with pytest.raises(Fenced):
        handlers.make_checkpoint(old, policy)
    assert not old_lease.keep()  # and its renewal says so
    assert old_lease.epoch is None
    drain(new, new_inv)
    handlers.make_checkpoint(new, policy)
    ingest(queue, recs[200:], new_inv)
    drain(new, new_inv)
    handlers.make_checkpoint(new, policy)
    sizes = [c.tree_size for c in new.checkpoints()]
    assert sizes == [100, 200, 300]
    # verify checks each checkpoint's consistency proof from the one before it: 100 → 200
    # spans the change of leader.
    report = verify_store(pg_location(pg), Verifier.parse(signer.verifier_key), ORIGIN)
    assert report.ok and report.checkpoints == 3, report
    assert [r[0] for r in log_rows(pg)] == list(range(300))
    with psycopg.connect(**conninfo(pg, "auditor")) as conn:  # frs status reads it so
        held = read_lease(conn)
    assert held is not None and (held.holder, held.epoch, held.live) == ("frs-audit-b", 2, True)
    new_lease.release()  # a clean stop: the other need not wait
    assert old_lease.keep() and old_lease.epoch == 3
    for s in (old, new):
        s.close()
    queue.close()


def test_bench_reports_ingest_and_sequence_against_sqlite_in_one_run(
        pg: PgServer, tmp_path: Path) -> None:
    out = run(600, 700, (200,), tmp_path, repeats=1, pg=pg_location(pg))
    (row,) = out["ingest_sequence_postgres"]
    for path in ("store_path", "service", "service_dispatch_only"):
        figures = row[path]
        assert figures["events_per_s"] > 0 and figures["sqlite_single_instance_per_s"] > 0
        assert figures["events_per_s"] <= min(figures["ingest_events_per_s"],
                                              figures["sequence_events_per_s"])
    assert "ingest_sequence_store_path_events_per_s>=20000" in out["targets"]
    with psycopg.connect(**conninfo(pg, "owner")) as conn:  # the scratch log emptied
        assert conn.execute("SELECT COUNT(*) FROM audit_leaves").fetchone() == (0,)


def unsigned_clearances(n: int) -> list[Record]:
    """``records(n)`` with every PolicyCleared stripped of its signature: each is an
    unverified_decision the moment it is read, so the findings can be compared."""
    out: list[Record] = []
    for record in records(n):
        decoded = record[5]
        if isinstance(decoded, Envelope) and isinstance(decoded.event, PolicyCleared):
            rec = encode(decoded.event.model_copy(update={"signature": None}), "/frs/test")
            record = (*record[:3], rec.headers, rec.value,  # noqa: PLW2901
                      decode(rec.headers, rec.key, rec.value))
        out.append(record)
    return out


def findings(violations: list[ComplianceViolation]) -> list[tuple[str, str]]:
    return sorted((v.invariant.value, v.offending_event_id) for v in violations)


def counted() -> float:
    return sum(s.value for m in violations_metric().collect() for s in m.samples
               if s.name.endswith("_total"))


def test_a_batch_finds_what_the_single_instance_finds_even_when_a_record_fails(
        pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequencer sends a batch's statements pipelined, without a savepoint per record;
    a record whose invariants fail sends the whole batch back to be done record by record.
    Either way: every record a leaf, in order, and the single instance's findings,
    each counted once."""
    recs = unsigned_clearances(140)
    sqlite = AuditStore(tmp_path / "single")
    single = handlers.AuditPorts(sqlite, Invariants(
        sqlite, InvariantSettings(30.0, 300.0), lambda: datetime.now(UTC)))

    async def one_by_one() -> list[ComplianceViolation]:
        found: list[ComplianceViolation] = []
        for topic, partition, offset, headers, value, decoded in recs:
            for event in await handlers.on_record(topic, partition, offset, value, decoded,
                                                  single, headers):
                assert isinstance(event, ComplianceViolation)
                found.append(event)
        sqlite.commit()
        return found

    expected = findings(asyncio.run(one_by_one()))
    sqlite.close()
    assert len(expected) == 20  # one per probe's clearance
    # A ProviderDispatched (which finds nothing here) fails the first time it is judged.
    marker = base64.b64encode(next(r[4] for r in recs if r[0] == "frs.dispatch.events")
                              or b"").decode()
    observe = handlers.observe_queued
    failed: list[int] = []

    def flaky(topic: str, record: bytes, invariants: Invariants) -> list[ComplianceViolation]:
        if marker in record.decode():
            failed.append(1)
            if len(failed) % 2:  # pipelined: its error comes back with a later statement
                invariants.store.execute("INSERT INTO inv_probes (probe_id) VALUES (?)",
                                         ("no expiry",))  # NOT NULL: refused
            else:
                raise ValueError("a rule's bug")
        return observe(topic, record, invariants)

    for fail in (False, True):
        empty_audit_tables(pg)
        store, invariants, lease = sequencer(pg, "frs-audit-a")
        queue = IngestQueue(pg_location(pg))
        ingest(queue, recs, invariants)
        assert lease.keep()
        store.fence = lease.epoch
        if fail:
            monkeypatch.setattr(handlers, "observe_queued", flaky)
        before = counted()
        taken, found = sequence_batch(store, invariants, 1000)
        assert taken == len(recs)
        assert findings(found) == expected
        assert counted() - before == len(expected)  # the batch tried twice counts once
        assert failed == ([1, 1] if fail else [])  # pipelined, then record by record
        assert [r[3] for r in log_rows(pg)] == list(range(len(recs)))
        lease.release()
        queue.close()
        store.close()
