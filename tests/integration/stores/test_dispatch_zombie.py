"""A zombie dispatch on PostgreSQL, with real processes on the real broker (issue 18,
items 1-2): two instances, each with a state dir of its own (two hosts), split the
partitions of frs.policy.decisions; one is frozen (SIGSTOP) mid-run past its session
timeout, so the group gives its partitions to the other, which takes their leases and
sends the rest. When the frozen one wakes (SIGCONT) with sends in flight and a batch in
hand, its writes are fenced, and the requests it had recorded but not yet written are
refused by their guard (services/dispatch/transports/base.py SendGuard): the vendor
simulator receives nothing at all from it after the wake. The frozen instance starts
each request a while after its record (slow_sends_dispatch.py), so the freeze usually
catches some there, where CI once saw 4 copies leave after the wake."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from schemas.types import Transport
from services.cli.dispatch import cleared
from services.simulators.vendor import VendorBehaviour, VendorSimulator
from tests.conftest import ServiceProcess
from tests.helpers import wait_for_async
from tests.integration.stores.conftest import conninfo, empty_tables
from tests.integration.test_dispatch_service import Rig, outcomes, rig  # noqa: F401
from tests.pg import PgServer

pytestmark = pytest.mark.integration
N = 90


def assigned(log: Path) -> list[set[int]]:
    """The partition numbers of each assignment the instance logged, in order."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"partitions assigned"' in line:
            numbers = json.loads(line)["partitions"]
            out.append({int(p) for p in numbers.split(",") if p})
    return out


async def test_a_zombie_dispatch_sends_nothing_after_it_wakes(
        rig: Rig, services: dict[str, ServiceProcess], tmp_path: Path,  # noqa: F811
        pg_migrated: PgServer) -> None:
    await empty_tables(pg_migrated)
    on_postgres = {"FRS_STATE_URL": pg_migrated.url("dispatch"), "FRS_STATE_PASSWORD_FILE":
                   pg_migrated.settings("dispatch")["FRS_STATE_PASSWORD_FILE"]}
    zombie = rig.dispatch
    zombie.module = "tests.integration.stores.slow_sends_dispatch"
    other = ServiceProcess("dispatch", services["dispatch"].env, tmp_path / "other.log")
    async with VendorSimulator(VendorBehaviour(latency_s=0.3)) as vendor:
        web = rig.provider("web", Transport.HTTPS, vendor.url)
        await rig.publish(list(rig.providers))
        env: dict[str, Any] = {**rig.env, **on_postgres,
                               "FRS_DISPATCH_CA_FILE": str(vendor.ca_file),
                               "FRS_DISPATCH_BATCH_MAX": "30", "FRS_DISPATCH_CONCURRENCY": "8"}
        zombie.start(**env, FRS_DISPATCH_INSTANCE_ID="zombie",
                     FRS_STATE_DIR=str(tmp_path / "zombie"))
        try:
            await wait_for_async(lambda: assigned(zombie.log_path)[-1:] == [{0, 1, 2}],
                                 timeout=60, what="the first instance to hold every partition")
            other.start(**env, FRS_DISPATCH_INSTANCE_ID="other",
                        FRS_STATE_DIR=str(tmp_path / "other"))

            def split() -> bool:
                last = [assigned(p.log_path)[-1:] for p in (zombie, other)]
                return all(last) and last[0][0] | last[1][0] == {0, 1, 2} \
                    and not last[0][0] & last[1][0] and all(x[0] for x in last)

            await wait_for_async(split, timeout=60, what="the two instances to split")
            held = assigned(zombie.log_path)[-1]
            probes = await rig.clear(N, [cleared(web.provider_id, Transport.HTTPS)])
            await wait_for_async(lambda: sum(vendor.state.copies.values()) >= 10, timeout=60,
                                 interval=0.05, what="sends to start")
            assert zombie.proc is not None and other.proc is not None
            zombie.proc.send_signal(signal.SIGSTOP)
            # Past the session timeout (10 s): the other instance gets the zombie's
            # partitions, takes their leases, and (after the claims' lease) sends the rest.
            await asyncio.sleep(14)
            assert assigned(other.log_path)[-1] == {0, 1, 2}
            by_pair = await outcomes(rig.bootstrap, probes, N, timeout_s=120)
            assert len(by_pair) == N
            # Quiet: everything is sent and nothing else is coming from the live instance.
            settled = -1
            while settled != sum(vendor.state.copies.values()):
                settled = sum(vendor.state.copies.values())
                await asyncio.sleep(2)
            copies_before = Counter(vendor.state.copies)
            accepted_before = dict(vendor.state.accepted)
            received_before = len(vendor.state.received)
            zombie.proc.send_signal(signal.SIGCONT)
            woke = time.monotonic()
            # It wakes with its sends in flight and a batch in hand: every write that would
            # act is refused by its lost lease; then it rejoins the group.
            await wait_for_async(lambda: len(assigned(zombie.log_path)) > 2
                                 or time.monotonic() - woke > 20, timeout=40)
            await asyncio.sleep(3)
            # Nothing leaves it after it wakes: not a new probe, and not a copy of an
            # attempt it recorded under its lease before the freeze (the guard asks the
            # ledger again, and the lease has moved).
            late = vendor.state.copies - copies_before
            refused = zombie.log_path.read_text(errors="replace").count(
                "late attempt refused before its request left")
            assert not late, f"copies arrived after the zombie woke: {late} " \
                             f"({refused} late attempts refused)"
            assert vendor.state.received[received_before:] == [], "a request after the wake"
            assert vendor.state.accepted == accepted_before, "accepted after it woke"
            assert len(vendor.state.accepted) == N, "one accepted send per probe"
            for proc in (zombie, other):
                code = await asyncio.to_thread(proc.stop)
                assert code == 0, proc.log_path.read_text(errors="replace")[-3000:]
        finally:
            for proc in (zombie, other):
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.proc.send_signal(signal.SIGCONT)
                    proc.kill()
    log = zombie.log_path.read_text(errors="replace")
    assert held and "partition lease lost to a newer owner" in log, log[-3000:]
    with psycopg.connect(**conninfo(pg_migrated, "dispatch")) as conn:
        assert conn.execute("SELECT state, count(*) FROM sends GROUP BY state").fetchall() \
            == [("done", N)]
        epochs = dict(conn.execute("SELECT partition_no, epoch FROM dispatch_leases "
                                   "WHERE group_id = %s", (rig.env["FRS_DISPATCH_GROUP_ID"],))
                      .fetchall())
    assert set(epochs) == {0, 1, 2} and all(e >= 2 for e in epochs.values())
