"""Races on the audit log in PostgreSQL: two instances (two connections, two threads) append
the same record at the same moment, 1,000 times; it is in the log exactly once every time,
and the log stays one tree (indexes without a gap, the head equal to the leaves)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from services.audit.merkle import Tree, leaf_hash
from services.audit.pg_store import PgAuditStore
from services.audit.store import LeafMeta
from tests.integration.stores.test_audit_store_contract import (
    body,
    empty_audit_tables,
    meta,
    pg_location,
)
from tests.pg import PgServer

TRIALS = 1000


def test_the_same_record_is_one_leaf_when_two_instances_append_it_at_once(
        pg_migrated: PgServer) -> None:
    empty_audit_tables(pg_migrated)
    where = pg_location(pg_migrated)
    a, b = PgAuditStore.connect(where), PgAuditStore.connect(where)
    start = threading.Barrier(2)

    def append_and_commit(store: PgAuditStore, record: LeafMeta) -> int | None:
        start.wait(timeout=10)
        idx = store.append(record, body(record))
        store.commit()
        return idx

    taken = []
    try:
        with ThreadPoolExecutor(2) as pool:
            for trial in range(TRIALS):
                record = meta(trial, partition=trial % 3)
                got = [f.result(timeout=30) for f in
                       [pool.submit(append_and_commit, s, record) for s in (a, b)]]
                assert sorted(got, key=lambda i: i is None) == [trial, None], (trial, got)
                taken.append(got.index(trial))
    finally:
        a.close()
        b.close()
    reader = PgAuditStore.connect(where, readonly=True)
    try:
        rows = reader.rows()
        assert [(r.partition, r.offset) for r in rows] == [(t % 3, t) for t in range(TRIALS)]
        leaves = reader.leaves()
        assert reader.size == TRIALS
        assert reader.frontier.root() == Tree([leaf_hash(x) for x in leaves]).root()
    finally:
        reader.close()
    assert 0 < sum(taken) < TRIALS  # a real race: each instance won some
