"""The AuditLog port (services/audit/store.py), one contract for both implementations:
AuditStore (a segment file and a SQLite index) and PgAuditStore (PostgreSQL, the leaf
bytes in their rows): appends and redeliveries, the tree's right edge against a tree
recomputed from the leaves, checkpoints, reading back, crashes, the invariants' state, and
what `frs audit verify`, `proof` and `report` read."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.events import Invariant, NoResponse, ProbeSettled
from services.audit import handlers
from services.audit.checkpoint import Signer, Verifier
from services.audit.invariants import SCHEMA as INVARIANT_TABLES
from services.audit.invariants import Invariants, InvariantSettings
from services.audit.merkle import Tree, leaf_hash
from services.audit.pg_store import LOG_TABLES
from services.audit.proof import inclusion_bundle, verify_bundle
from services.audit.report import build_report
from services.audit.store import AuditLog, AuditStore, LeafMeta, PgLocation, open_store
from services.audit.verify import verify_store
from tests.integration.stores.conftest import conninfo
from tests.pg import PgServer
from tests.unit.fakes import FakeClock
from tests.unit.test_audit_report import T0, cleared, dispatched, feed

AUDIT_TABLES = LOG_TABLES  # every table of migration 0008, the log's three first
ORIGIN = "frs-broker.test/audit"


def empty_audit_tables(server: PgServer) -> None:
    with psycopg.connect(**conninfo(server, "owner")) as conn:
        conn.execute(f"TRUNCATE {', '.join(AUDIT_TABLES)}".encode())


def pg_location(server: PgServer) -> PgLocation:
    return PgLocation(server.url("audit"), server.password("audit"))


class Backend:
    """Opens stores at one place, and plays the crash and the tampering an auditor must see."""

    def __init__(self, where: Path | PgLocation, server: PgServer | None) -> None:
        self.where = where
        self.server = server
        self.opened: list[AuditLog] = []

    def open(self, *, readonly: bool = False) -> AuditLog:
        store = open_store(self.where, readonly=readonly)
        self.opened.append(store)
        return store

    def crash(self, store: AuditLog) -> None:
        """The process dies mid-batch: nothing is committed, nothing closed cleanly."""
        self.opened.remove(store)
        if isinstance(store, AuditStore):
            assert store._segment is not None
            store._segment.flush()  # the torn bytes reach the file
            store._segment.close()
            store._db.close()  # the open transaction is lost
        else:
            store._conn.close()  # type: ignore[attr-defined]

    def tamper(self, index: int) -> None:
        """Change one byte of a committed leaf behind the store's back."""
        if isinstance(self.where, Path):
            path = self.where / "leaves.seg"
            data = bytearray(path.read_bytes())
            store = AuditStore(self.where, readonly=True)
            pos = next(row[1] for row, _ in store.iter_leaves(index, index + 1))
            store.close()
            data[pos + 2] ^= 1
            path.write_bytes(bytes(data))
            return
        assert self.server is not None
        with psycopg.connect(**conninfo(self.server, "owner")) as conn:
            conn.execute("UPDATE audit_leaves SET leaf = overlay(leaf placing 'X' from 3)"
                         " WHERE idx = %s", (index,))


@pytest.fixture
def backend_at(backend: str, request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[Backend]:
    if backend == "sqlite":
        made = Backend(tmp_path / "audit", None)
    else:
        server: PgServer = request.getfixturevalue("pg_migrated")
        empty_audit_tables(server)
        made = Backend(pg_location(server), server)
    yield made
    for store in made.opened:
        store.close()


def meta(i: int, topic: str = "frs.dispatch.events", partition: int = 0,
         ce_id: str | None = None) -> LeafMeta:
    return LeafMeta(topic, partition, i, ce_id or f"ev-{i}", "frs.test.v1", f"prb-{i % 3}",
                    "2026-03-01T12:00:00+00:00")


def body(m: LeafMeta) -> dict[str, Any]:
    return {"topic": m.topic, "partition": m.partition, "offset": m.offset, "id": m.ce_id,
            "subject": m.subject, "value_sha256": "0" * 64, "data": {"n": m.offset}}


def append(store: AuditLog, m: LeafMeta) -> int | None:
    return store.append(m, body(m))


def recomputed_root(store: AuditLog) -> bytes:
    return Tree([leaf_hash(leaf) for leaf in store.leaves()]).root()


def test_appends_take_indexes_in_order_and_read_back(backend_at: Backend) -> None:
    store = backend_at.open()
    assert store.size == 0 and store.leaves() == []
    assert [append(store, meta(i)) for i in range(5)] == [0, 1, 2, 3, 4]
    store.commit()
    assert store.size == 5
    leaves = store.leaves()
    assert len(leaves) == 5
    for i, leaf in enumerate(leaves):
        assert leaf.endswith(f',"index":{i}}}'.encode()) or f'"index":{i}'.encode() in leaf
    rows = list(store.iter_leaves())
    assert [int(r[0]) for r, _ in rows] == list(range(5))
    assert all(int(r[2]) == len(leaf) and bytes(r[3]) == leaf_hash(leaf) for r, leaf in rows)
    assert store.leaves(2, 4) == leaves[2:4]
    assert store.leaf_hashes(3) == [leaf_hash(leaf) for leaf in leaves[:3]]
    assert [r.offset for r in store.rows()] == list(range(5))
    assert [r.offset for r in store.rows(subject="prb-1")] == [1, 4]


def test_the_same_record_is_appended_once(backend_at: Backend) -> None:
    store = backend_at.open()
    assert append(store, meta(0)) == 0
    assert append(store, meta(0)) is None  # again in the same batch
    assert append(store, meta(1)) == 1
    store.commit()
    assert append(store, meta(1)) is None  # after the commit
    assert append(store, meta(0)) is None  # below the partition's highest offset
    assert append(store, meta(1, partition=1)) == 2  # same offset, other partition
    assert append(store, meta(1, topic="frs.dlq.dispatch")) == 3  # other topic
    store.commit()
    store.close()
    backend_at.opened.remove(store)
    again = backend_at.open()
    assert append(again, meta(0)) is None and append(again, meta(1, partition=1)) is None
    assert append(again, meta(2)) == 4
    again.commit()
    assert again.size == 5 and len(again.rows()) == 5


def test_a_record_skipped_below_the_highest_offset_is_still_taken(backend_at: Backend
                                                                   ) -> None:
    store = backend_at.open()
    for offset in (0, 1, 5):
        append(store, meta(offset))
    store.commit()
    assert append(store, meta(3)) == 3  # a gap filled later: new, not a redelivery
    store.commit()
    assert sorted(r.offset for r in store.rows()) == [0, 1, 3, 5]


def test_the_frontier_equals_a_tree_recomputed_from_the_leaves(backend_at: Backend) -> None:
    store = backend_at.open()
    for i in range(37):
        append(store, meta(i))
        if i % 10 == 9:
            store.commit()
            assert store.frontier.root() == recomputed_root(store)
    store.commit()
    assert store.frontier.size == 37
    root = store.frontier.root()
    assert root == recomputed_root(store)
    store.close()
    backend_at.opened.remove(store)
    reopened = backend_at.open()
    assert (reopened.size, reopened.frontier.root()) == (37, root)
    reader = backend_at.open(readonly=True)
    assert (reader.size, reader.frontier.root()) == (37, root)


def test_a_failed_record_leaves_nothing_and_its_index_is_taken_again(backend_at: Backend
                                                                     ) -> None:
    store = backend_at.open()
    store.prepare(INVARIANT_TABLES)
    append(store, meta(0))
    with pytest.raises(RuntimeError, match="halfway"), store.savepoint():
        assert append(store, meta(1)) == 1
        store.execute("INSERT INTO inv_probe_ends (probe_id, how) VALUES (?, ?)",
                      ("p-x", "settled"))
        raise RuntimeError("halfway")
    assert store.size == 1
    assert append(store, meta(1)) == 1  # the retry: same record, same index
    store.commit()
    assert store.size == 2 and store.frontier.root() == recomputed_root(store)
    assert store.query("SELECT COUNT(*) FROM inv_probe_ends")[0][0] == 0


def test_a_crash_before_the_commit_leaves_the_committed_log(backend_at: Backend) -> None:
    store = backend_at.open()
    for i in range(3):
        append(store, meta(i))
    store.commit()
    root = store.frontier.root()
    for i in range(3, 6):
        append(store, meta(i))
    backend_at.crash(store)
    reopened = backend_at.open()
    assert (reopened.size, reopened.frontier.root()) == (3, root)
    assert append(reopened, meta(3)) == 3  # not taken for a redelivery
    reopened.commit()
    assert reopened.frontier.root() == recomputed_root(reopened)


def test_checkpoints_are_kept_in_order_after_their_batch(backend_at: Backend) -> None:
    store = backend_at.open()
    assert store.last_checkpoint() is None and store.checkpoints() == []
    append(store, meta(0))
    with pytest.raises(RuntimeError, match="commit the batch"):
        store.add_checkpoint(1, b"r" * 32, "note-1", T0.isoformat())
    store.commit()
    store.add_checkpoint(1, b"r" * 32, "note-1", T0.isoformat())
    append(store, meta(1))
    store.commit()
    store.add_checkpoint(2, b"s" * 32, "note-2", (T0 + timedelta(seconds=1)).isoformat())
    got = store.checkpoints()
    assert [(c.seq, c.tree_size, c.root, c.note) for c in got] == [
        (1, 1, b"r" * 32, "note-1"), (2, 2, b"s" * 32, "note-2")]
    last = store.last_checkpoint()
    assert last is not None and (last.tree_size, last.created_at) == (
        2, (T0 + timedelta(seconds=1)).isoformat())


def test_what_checkpoints_and_proofs_look_up(backend_at: Backend) -> None:
    store = backend_at.open()
    append(store, meta(0, topic="frs.dlq.dispatch", ce_id="ev-x"))  # a DLQ copy first
    append(store, meta(1, ce_id="ev-x"))
    append(store, meta(2, topic=handlers.CHECKPOINT_TOPIC))
    store.commit()
    assert store.index_of("ev-x") == 1 and store.index_of("nope") is None
    assert store.count_since(0, handlers.CHECKPOINT_TOPIC) == 2
    assert store.count_since(2, handlers.CHECKPOINT_TOPIC) == 0


def signed_log(backend_at: Backend, n: int = 25) -> tuple[AuditLog, Verifier]:
    """n leaves with a signed checkpoint after each 10, as the service keeps them."""
    store = backend_at.open()
    signer = Signer(ORIGIN, Ed25519PrivateKey.generate())
    policy = handlers.CheckpointPolicy(signer, ORIGIN, 10, 1e9, lambda: T0)
    for i in range(n):
        append(store, meta(i))
        if i % 10 == 9:
            store.commit()
            assert handlers.checkpoint_due(store, policy, 0.0, 0.0)
            handlers.make_checkpoint(store, policy)
    store.commit()
    return store, Verifier.parse(signer.verifier_key)


def test_verify_proof_and_report_read_a_live_store(backend_at: Backend) -> None:
    store, verifier = signed_log(backend_at)
    report = verify_store(backend_at.where, verifier, ORIGIN)
    assert report.ok, report.findings
    assert (report.tree_size, report.checkpoints) == (25, 2)
    assert base64.b64decode(report.root) == store.frontier.root()
    bundle = inclusion_bundle(backend_at.where, "ev-7")
    assert bundle["tree_size"] == 20 and bundle["leaf_index"] == 7
    assert verify_bundle(bundle, verifier).startswith("event ev-7 is leaf 7")
    assert build_report(backend_at.where)["log_size"] == 25


def test_verify_names_a_leaf_changed_behind_the_stores_back(backend_at: Backend) -> None:
    store, verifier = signed_log(backend_at)
    store.close()
    backend_at.opened.remove(store)
    backend_at.tamper(12)
    report = verify_store(backend_at.where, verifier, ORIGIN)
    assert not report.ok
    assert ("leaf_hash_mismatch", 12) in {(f.kind, f.leaf_index) for f in report.findings}


def test_a_reader_sees_what_is_committed_and_never_writes(backend_at: Backend) -> None:
    store = backend_at.open()
    append(store, meta(0))
    store.commit()
    append(store, meta(1))  # not committed yet
    reader = backend_at.open(readonly=True)
    with reader.snapshot():
        assert [r.offset for r in reader.rows()] == [0]
        assert len(reader.leaves()) == 1
    store.commit()
    assert [r.offset for r in reader.rows()] == [0, 1]


Clocked = Callable[[], tuple[AuditLog, Invariants, FakeClock]]


@pytest.fixture
def with_invariants(backend_at: Backend) -> Clocked:
    def make() -> tuple[AuditLog, Invariants, FakeClock]:
        store = backend_at.open()
        clock = FakeClock(T0)
        return store, Invariants(store, InvariantSettings(30, 60), clock), clock
    return make


def test_the_invariants_state_lives_with_the_leaves(with_invariants: Clocked) -> None:
    store, inv, clock = with_invariants()
    assert feed(store, inv, [dispatched("p1", "fed-ngi")]) == []
    clock.now = T0 + timedelta(seconds=31)
    assert [v.invariant for v in inv.tick()] == [Invariant.DISPATCH_WITHOUT_CLEARANCE]
    store.commit()
    assert inv.tick() == []  # reported once
    # An unsigned clearance, then a dispatch of more fields than it cleared.
    narrow = cleared("p2", "fed-ngi")
    narrow = narrow.model_copy(update={"cleared": [narrow.cleared[0].model_copy(
        update={"fields": narrow.cleared[0].fields[:1]})]})
    assert sorted(feed(store, inv, [narrow, dispatched("p2", "fed-ngi")])) == sorted([
        Invariant.UNVERIFIED_DECISION, Invariant.PURPOSE_NOT_ALLOWED,
        Invariant.EXTRA_FIELDS_SENT])


def test_liveness_on_both_backends(with_invariants: Clocked) -> None:
    store, inv, _ = with_invariants()
    feed(store, inv, [cleared("p1", "fed-ngi"), cleared("p2", "fed-ngi"),
                      dispatched("p2", "fed-ngi", T0 + timedelta(seconds=5)),
                      dispatched("p2", "fed-ngi", T0 + timedelta(seconds=1)),
                      NoResponse(probe_id="p2", provider_id="fed-ngi",
                                 deadline=T0 + timedelta(seconds=5)),
                      ProbeSettled(probe_id="p2", answered=[], failed=[],
                                   no_response=["fed-ngi"], settled_at=T0)])
    late = T0 + timedelta(days=2)
    found = [(v.invariant, v.probe_id) for v in inv.liveness(late)]
    store.commit()
    assert found == [(Invariant.CLEARANCE_WITHOUT_END, "p1")]
    assert inv.liveness(late) == []
    (row,) = store.query("SELECT dispatched_due_at, ended, probe_ended FROM inv_liveness"
                         " WHERE probe_id = ?", ("p2",))
    assert row == ((T0 + timedelta(seconds=5)).isoformat(), "no_response", 1)


def test_a_second_store_on_the_same_log_continues_its_head(backend: str,
                                                           backend_at: Backend) -> None:
    if backend == "sqlite":
        pytest.skip("one SQLite store per directory: a second writer is PostgreSQL's case")
    first, second = backend_at.open(), backend_at.open()
    append(first, meta(0))
    first.commit()
    append(second, meta(0))  # the same record, seen by the other instance: not again
    append(second, meta(1))
    second.commit()
    append(first, meta(2))
    first.commit()
    assert first.size == 3 and second.size == 2
    reader = backend_at.open(readonly=True)
    assert [r.offset for r in reader.rows()] == [0, 1, 2]
    assert first.frontier.root() == recomputed_root(reader)


def test_the_role_password_is_not_in_the_location_repr(backend_at: Backend) -> None:
    if not isinstance(backend_at.where, PgLocation):
        pytest.skip("a directory has no password")
    assert backend_at.where.password and backend_at.where.password not in repr(backend_at.where)


def test_the_auditor_role_reads_the_log_and_writes_nothing(pg_migrated: PgServer) -> None:
    empty_audit_tables(pg_migrated)
    backend_at = Backend(pg_location(pg_migrated), pg_migrated)
    store, verifier = signed_log(backend_at)
    store.close()
    auditor = PgLocation(pg_migrated.url("auditor"), pg_migrated.password("auditor"))
    report = verify_store(auditor, verifier, ORIGIN)
    assert report.ok and report.tree_size == 25
    writer = open_store(auditor)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        writer.append(meta(99), body(meta(99)))  # its first statement locks the head
    writer.close()
    with psycopg.connect(**conninfo(pg_migrated, "auditor")) as conn:
        for write in ("DELETE FROM audit_leaves", "UPDATE audit_tree SET size = 0",
                      "INSERT INTO audit_checkpoints VALUES (9, 1, '', '', '')",
                      "SELECT * FROM inv_violations"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(write.encode())
            conn.rollback()
