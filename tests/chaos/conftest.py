"""Fixtures for the chaos tier: a three-node Kafka cluster (deploy/kafka/cluster.sh) and
helpers that act on real processes by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import ROOT
from tests.helpers import alive, free_port_block

CLUSTER = ROOT / "deploy" / "kafka" / "cluster.sh"


@dataclass
class Cluster:
    """Three KRaft nodes started by cluster.sh; faults are sent to a node by its pid."""

    env: dict[str, str]
    state: Path
    bootstrap: str

    def pid(self, node: int) -> int:
        return int((self.state / f"node{node}" / "broker.pid").read_text())

    def kill(self, node: int, sig: int = signal.SIGKILL) -> None:
        pid = self.pid(node)
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            # Reap-free wait: the JVM is not our child (cluster.sh started it), and PID 1
            # here reaps only now and then, so dead is "gone or a zombie".
            for _ in range(200):
                if not alive(pid):
                    return
                time.sleep(0.05)

    def start_node(self, node: int) -> None:
        subprocess.run([str(CLUSTER), "start-node", str(node)], env=self.env, check=True,
                       timeout=60)

    def wait_all(self, timeout: int = 120) -> None:
        """Until a metadata answer lists all three brokers again; if not, the nodes' own
        words on why (the tail of each node's log) are in the failure."""
        done = subprocess.run(["bash", "-c", f'source "{ROOT}/deploy/kafka/common.sh"; '
                               'wait_ready "$1" "$2" 3', "_", self.bootstrap, str(timeout)],
                              env=self.env, timeout=timeout + 30, capture_output=True,
                              text=True)
        if done.returncode != 0:
            tails = {n: (self.state / f"node{n}" / "broker.log").read_text(
                errors="replace").splitlines()[-15:] for n in (1, 2, 3)}
            raise AssertionError(f"the cluster did not list three brokers in {timeout} s: "
                                 f"{done.stdout}{done.stderr}; pids alive "
                                 f"{ {n: alive(self.pid(n)) for n in (1, 2, 3)} }; "
                                 f"node logs: {tails}")

    async def leader(self, topic: str, partition: int) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            for t in await admin.describe_topics([topic]):
                for p in t["partitions"]:
                    if p["partition"] == partition:
                        return int(p["leader"])
        finally:
            await admin.close()
        raise LookupError(f"{topic}/{partition} has no leader")


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "FRS_CLUSTER_PORT": str(free_port_block(6)),
           "FRS_CLUSTER_STATE": str(state)}
    subprocess.run([str(CLUSTER), "start"], env=env, check=True, timeout=400)
    try:
        bootstrap = subprocess.run([str(CLUSTER), "bootstrap"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
        from services.kit.topics import ensure_topics

        asyncio.run(ensure_topics(bootstrap, replication=3))
        yield Cluster(env, state, bootstrap)
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, check=False, timeout=120)
