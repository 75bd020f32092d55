"""Partition ownership on the real broker, with real processes (issue 18, item 1): a
route's input topics must be co-partitioned (else the start stops with one line naming
them), and the members of a group get the same partition numbers of every input topic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import ROOT
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    """Three topics of this test's own: two of 4 partitions, one of 3."""
    tag = uuid.uuid4().hex[:8]
    names = {"a": f"frs.test.own.{tag}.a", "b": f"frs.test.own.{tag}.b",
             "odd": f"frs.test.own.{tag}.odd"}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(names["a"], 4, 1), NewTopic(names["b"], 4, 1),
                                   NewTopic(names["odd"], 3, 1)])
        yield names
        await admin.delete_topics(list(names.values()))
    finally:
        await admin.close()


def member(env: dict[str, str], log: Path, group: str, topics: list[str],
           ) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.member_service"], cwd=ROOT,
            env={**env, "MEMBER_GROUP": group, "MEMBER_TOPICS": ",".join(topics)},
            stdout=out, stderr=subprocess.STDOUT)


def assignments(log: Path) -> list[dict[str, str]]:
    """Every "partitions assigned" line the member logged, in order."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg") == "partitions assigned"]


async def test_topics_with_different_partition_counts_stop_the_start_in_one_line(
        topics: dict[str, str], service_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "member.log"
    group = f"frs-test-own-{uuid.uuid4().hex[:8]}"
    proc = member(service_env, log, group, [topics["a"], topics["odd"]])
    assert await asyncio.to_thread(proc.wait, 60) == 1
    errors = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{") and json.loads(line)["level"] == "error"]
    assert [e["msg"] for e in errors] == [
        f"consumer group {group}: its input topics must have as many partitions each "
        f"(co-partitioned by key), found {topics['a']}=4, {topics['odd']}=3"]
    assert "Traceback" not in log.read_text()


async def test_two_members_split_partition_numbers_alike_across_topics(
        topics: dict[str, str], service_env: dict[str, str], tmp_path: Path) -> None:
    group = f"frs-test-own-{uuid.uuid4().hex[:8]}"
    wanted = [topics["a"], topics["b"]]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [member(service_env, logs[0], group, wanted)]
    try:
        wait_for(lambda: any(a["partitions"] == "0,1,2,3" for a in assignments(logs[0])),
                 timeout=60, what="the first member to hold every partition")
        procs.append(member(service_env, logs[1], group, wanted))

        def split() -> bool:
            last = [assignments(log)[-1:] for log in logs]
            return all(last) and sorted(
                p for one in last for p in one[0]["partitions"].split(",") if p) == \
                ["0", "1", "2", "3"] and all(one[0]["partitions"] for one in last)

        wait_for(split, timeout=90, what="the two members to split the partitions")
        for log in logs:
            held = assignments(log)[-1]["assigned"].split()
            numbers = held[0].rsplit(":", 1)[1]
            # Partition p of one topic comes with partition p of the other, and only so.
            assert sorted(held) == sorted(f"{t}:{p}" for t in wanted
                                          for p in assignments(log)[-1]["partitions"]
                                          .split(",")), held
            assert numbers
        firsts = [a["partitions"] for a in assignments(logs[0])]
        # Sticky: the first member kept two of the numbers it held, gave away two.
        assert firsts[0] == "0,1,2,3" and len(firsts[-1].split(",")) == 2
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert await asyncio.to_thread(proc.wait, 60) == 0
