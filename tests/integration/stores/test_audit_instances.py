"""Many audit instances, one log (issue 18, item 5), on real PostgreSQL and the real
broker: audit processes in one consumer group, each with its own state directory as on
separate hosts (the checkpoint key deployed to each), ingest what they consume; the lease's
holder sequences. One log without gap or duplicate and one chain of checkpoints that
`frs audit verify` accepts; a SIGKILLed leader's standby sequences within 15 s and a
consistency proof spans the change; a leader stopped (SIGSTOP) past its lease neither
appends nor signs once resumed."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.events import Invariant
from services.audit.checkpoint import Signer, load_or_create_key
from services.audit.merkle import consistency_proof, verify_consistency
from services.audit.pg_store import PgAuditStore
from services.audit.sequencer import LEASE_TTL_S, RENEW_S
from tests.conftest import ServiceProcess
from tests.helpers import log_text, wait_for
from tests.integration.audit.conftest import audit_env
from tests.integration.audit.test_audit_invariants import (
    ALL_FIELDS,
    cleared,
    dispatched,
    none_for,
    probe,
    seen,
)
from tests.integration.audit.test_audit_invariants import publish as publish_events
from tests.integration.audit.test_audit_log import publish, rejected
from tests.integration.stores.test_audit_on_postgres import frs
from tests.integration.stores.test_audit_store_contract import empty_audit_tables, pg_location
from tests.integration.stores.test_services_on_postgres import on_postgres, rows
from tests.pg import PgServer

pytestmark = pytest.mark.integration
ORIGIN = "frs-broker.local/audit"


@pytest.fixture
def fleet(service_env: dict[str, str], pg_migrated: PgServer, tmp_path: Path
          ) -> Iterator[tuple[dict[str, ServiceProcess], str]]:
    """Two audit instances, a and b, not started: one group, one database, a state dir
    each with the deployed signing key. Yields them and the verifier key."""
    empty_audit_tables(pg_migrated)
    key = tmp_path / "deployed" / "audit-checkpoint.pem"
    signer = Signer(ORIGIN, load_or_create_key(key))
    common = {**audit_env(service_env, FRS_AUDIT_CHECKPOINT_EVERY_N="20",
                          FRS_AUDIT_BATCH_MAX="50"), **on_postgres(pg_migrated, "audit")}
    procs = {}
    for name in ("a", "b"):
        home = tmp_path / name
        (home / "keys").mkdir(parents=True)
        shutil.copy2(key, home / "keys" / key.name)
        env = {**common, "FRS_STATE_DIR": str(home), "FRS_AUDIT_STORE_DIR": str(home / "audit"),
               "FRS_AUDIT_SIGNING_KEY_FILE": str(home / "keys" / key.name),
               "FRS_AUDIT_INSTANCE_ID": name}
        procs[name] = ServiceProcess("audit", env, tmp_path / f"audit-{name}.log")
    yield procs, signer.verifier_key
    for p in procs.values():
        if p.proc is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
            p.kill()


def signal_to(process: ServiceProcess, sig: int) -> None:
    assert process.proc is not None
    process.proc.send_signal(sig)  # not kill(): that waits for the exit


def lease(pg: PgServer) -> tuple[str, int] | None:
    found = rows(pg, "audit", "SELECT holder, epoch FROM audit_sequencer_lease"
                              " WHERE expires_at >= now()")
    return None if not found else (str(found[0][0]), int(found[0][1]))


def ours(pg: PgServer, run: str) -> tuple[int, int]:
    """Leaves of this run's events: all, and distinct events."""
    ((count, distinct),) = rows(pg, "audit", "SELECT COUNT(*), COUNT(DISTINCT ce_id) FROM"
                                " audit_leaves WHERE subject LIKE %s", f"prb-{run}-%")
    return int(count), int(distinct)


def checkpoints(pg: PgServer) -> int:
    return int(rows(pg, "audit", "SELECT COUNT(*) FROM audit_checkpoints")[0][0])


def one_log(pg: PgServer) -> int:
    """No gap, no duplicate: indices 0..n-1, each (topic, partition, offset) once."""
    ((count, distinct, first, last),) = rows(
        pg, "audit", "SELECT COUNT(*), COUNT(DISTINCT (topic, partition, \"offset\")),"
        " MIN(idx), MAX(idx) FROM audit_leaves")
    assert (distinct, first, last) == (count, 0, count - 1)
    return int(count)


def signed_past(pg: PgServer, run: str) -> bool:
    """A checkpoint covers every leaf of this run's events."""
    ((last, signed),) = rows(pg, "audit", "SELECT (SELECT MAX(idx) FROM audit_leaves WHERE"
                             " subject LIKE %s), (SELECT MAX(tree_size) FROM"
                             " audit_checkpoints)", f"prb-{run}-%")
    return last is not None and signed is not None and int(signed) > int(last)


def verified(pg: PgServer, env: dict[str, str], vkey: str) -> dict[str, object]:
    out = frs("audit", "verify", "--json", "--vkey", vkey,
              env={**env, **on_postgres(pg, "auditor")})
    assert out.returncode == 0, out.stdout + out.stderr
    report: dict[str, object] = json.loads(out.stdout)
    assert report["ok"]
    return report


class Stream:
    """Events published in the background, a few at a time, until stopped."""

    def __init__(self, bootstrap: str, run: str, total: int) -> None:
        self.bootstrap, self.run, self.total = bootstrap, run, total
        self.sent = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._send()))

    async def _send(self) -> None:
        while self.sent < self.total:
            batch = [rejected(i, self.run) for i in range(self.sent, min(self.sent + 10,
                                                                         self.total))]
            await publish(self.bootstrap, batch)
            self.sent += len(batch)
            await asyncio.sleep(0.1)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._thread.join(timeout=300)


def start_both(procs: dict[str, ServiceProcess], pg: PgServer) -> tuple[str, str]:
    """Both running, one leading: (leader, standby)."""
    for p in procs.values():
        p.start()
    for p in procs.values():
        p.wait_log("consumer started", timeout=90)
    wait_for(lambda: lease(pg) is not None, timeout=30, what="a sequencer lease")
    held = lease(pg)
    assert held is not None
    leader = held[0].removeprefix("frs-audit-")
    return leader, "b" if leader == "a" else "a"


def test_two_instances_one_log_and_the_standby_takes_over_a_killed_leader(
        fleet: tuple[dict[str, ServiceProcess], str], kafka_bootstrap: str,
        pg_migrated: PgServer) -> None:
    procs, vkey = fleet
    run, total = uuid.uuid4().hex[:8], 600
    leader, standby = start_both(procs, pg_migrated)
    held = lease(pg_migrated)
    assert held is not None
    with Stream(kafka_bootstrap, run, total):
        wait_for(lambda: ours(pg_migrated, run)[0] >= 150, timeout=120, what="leaves")
        wait_for(lambda: checkpoints(pg_migrated) > 0, timeout=60, what="a checkpoint")
        procs[leader].kill()  # SIGKILL mid-stream
        killed_at = time.monotonic()
        before = PgAuditStore.connect(pg_location(pg_migrated), readonly=True)
        last_before = before.last_checkpoint()
        size_at_kill = one_log(pg_migrated)

        def standby_sequences() -> bool:
            now = lease(pg_migrated)
            return now is not None and now[0] == f"frs-audit-{standby}" \
                and now[1] > held[1] and one_log(pg_migrated) > size_at_kill

        wait_for(standby_sequences, timeout=30, interval=0.2, what="the standby sequencing")
        took = time.monotonic() - killed_at
        assert took <= 15, took
        assert took <= LEASE_TTL_S + RENEW_S + 3
    wait_for(lambda: ours(pg_migrated, run)[1] >= total, timeout=180, what="every event")
    wait_for(lambda: signed_past(pg_migrated, run), timeout=60,
             what="a checkpoint of every event")
    assert procs[standby].stop() == 0
    count, distinct = ours(pg_migrated, run)
    assert count == distinct == total  # each event once, none lost
    size = one_log(pg_migrated)
    report = verified(pg_migrated, procs[standby].env, vkey)
    assert report["tree_size"] == size
    # The proof from the last checkpoint before the kill to the first after it.
    assert last_before is not None
    after = next(c for c in before.checkpoints() if c.seq > last_before.seq)
    hashes = before.leaf_hashes(after.tree_size)
    verify_consistency(last_before.tree_size, after.tree_size, last_before.root, after.root,
                       consistency_proof(last_before.tree_size, hashes))
    before.close()


def test_a_leader_stopped_past_its_lease_neither_appends_nor_signs_when_resumed(
        fleet: tuple[dict[str, ServiceProcess], str], kafka_bootstrap: str,
        pg_migrated: PgServer) -> None:
    procs, vkey = fleet
    run = uuid.uuid4().hex[:8]
    leader, standby = start_both(procs, pg_migrated)
    held = lease(pg_migrated)
    assert held is not None
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(100)]))
    wait_for(lambda: ours(pg_migrated, run)[1] >= 100, timeout=120, what="leaves")
    signal_to(procs[leader], signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_for(lambda: (lease(pg_migrated) or ("", 0))[0] == f"frs-audit-{standby}",
             timeout=30, interval=0.2, what="the standby taking the lease")
    assert time.monotonic() - stopped_at <= 15
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(100, 200)]))
    # The stopped member's partitions move once the group drops it; all get sequenced.
    wait_for(lambda: ours(pg_migrated, run)[1] >= 200, timeout=180, what="more leaves")
    resumed_from = len(log_text(procs[leader].log_path))
    signal_to(procs[leader], signal.SIGCONT)
    time.sleep(RENEW_S * 3)
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(200, 260)]))
    wait_for(lambda: ours(pg_migrated, run)[1] >= 260, timeout=180, what="the last leaves")
    time.sleep(RENEW_S * 2)
    after = log_text(procs[leader].log_path)[resumed_from:]
    assert "checkpoint signed" not in after, after[-3000:]
    assert "lease lost" in after or "stops" in after, after[-3000:]
    now = lease(pg_migrated)
    assert now is not None and now[0] == f"frs-audit-{standby}" and now[1] > held[1]
    for name in (leader, standby):
        assert procs[name].stop() == 0, log_text(procs[name].log_path)[-4000:]
    count, distinct = ours(pg_migrated, run)
    assert count == distinct == 260
    size = one_log(pg_migrated)
    report = verified(pg_migrated, procs[standby].env, vkey)
    assert report["tree_size"] == size


def test_two_instances_judge_absences_as_of_what_the_group_has_committed(
        fleet: tuple[dict[str, ServiceProcess], str], kafka_bootstrap: str,
        pg_migrated: PgServer) -> None:
    """Each instance reads a share of the partitions, so neither's own reading says the
    log is complete: the leader judges the rules on absences as of the group's committed
    offsets (the chaos set's PostgreSQL restart once made three false "dispatch without
    clearance" when they were judged by the clock). A dispatch never cleared is still
    caught; one whose clearance comes later on another topic is not flagged."""
    procs, _vkey = fleet
    for p in procs.values():
        p.start(FRS_AUDIT_CLEARANCE_GRACE_S="2")
    for p in procs.values():
        p.wait_log("consumer started", timeout=90)
    wait_for(lambda: lease(pg_migrated) is not None, timeout=30, what="a sequencer lease")
    bad, good = probe(), probe()
    publish_events(kafka_bootstrap, dispatched(bad, "fed-ngi", ALL_FIELDS),
                   dispatched(good, "fed-ngi", ALL_FIELDS), cleared(good, "fed-ngi", ALL_FIELDS))
    (v,) = seen(kafka_bootstrap, bad, Invariant.DISPATCH_WITHOUT_CLEARANCE, timeout=90)
    assert "fed-ngi" in v.detail
    time.sleep(3)  # past the grace once more: the cleared one stays clean
    assert none_for(kafka_bootstrap, good)
