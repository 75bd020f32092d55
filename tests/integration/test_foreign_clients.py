"""CloudEvents from clients that are not ours, on the real broker: a request published by
kcat (librdkafka) and one whose headers a bare aiokafka producer writes by hand, both
without the optional ``time``, are accepted by the intake; the record's timestamp stands
in for the time and the audit log says so. A LogAppendTime topic gives the broker's time."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.catalog import MAX_REQUEST_BYTES, PROBE_REQUESTS
from schemas.envelope import DecodeError, Envelope, Headers
from schemas.events import ProbeRejected, ProbeRequested, ProbeSubmitted, RejectReason
from services.audit.store import AuditStore
from services.kit.reader import read_topic
from tests import intake_samples as s
from tests.conftest import ServiceProcess
from tests.helpers import wait_for_async
from tests.integration.audit.conftest import audit_env
from tests.integration.intake_support import make_request, new_id, outcomes, start_intake

pytestmark = pytest.mark.integration
KCAT = shutil.which("kcat")
A_YEAR_AGO_MS = int((datetime.now(UTC) - timedelta(days=365)).timestamp() * 1000)


def ce_headers(event_id: str, source: str, **extra: str) -> Headers:
    """The four attributes CloudEvents 1.0 requires, and nothing else unless asked."""
    return [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()),
            ("ce_source", source.encode()), ("ce_type", ProbeRequested.TYPE.encode()),
            *((k, v.encode()) for k, v in extra.items())]


async def request_record(bootstrap: str, event_id: str) -> tuple[int, Envelope | DecodeError]:
    """The request's record on the topic (its timestamp in ms), decoded as services do."""
    for raw, decoded in await read_topic(bootstrap, [PROBE_REQUESTS.name]):
        if (("ce_id", event_id.encode())) in raw.headers:
            return raw.offset, decoded
    raise AssertionError(f"no record with ce_id {event_id} on {PROBE_REQUESTS.name}")


async def audit_leaf(store_dir: Path, event_id: str, timeout: float = 60.0,  # noqa: ASYNC109
                     ) -> dict[str, object]:
    def recorded() -> dict[str, object] | None:
        try:
            store = AuditStore(store_dir, readonly=True)
        except FileNotFoundError:
            return None
        try:
            rows = store.query("SELECT idx FROM leaves WHERE ce_id = ?", (event_id,))
            if not rows:
                return None
            idx = int(rows[0][0])
            leaf: dict[str, object] = json.loads(store.leaves(idx, idx + 1)[0])
            return leaf
        finally:
            store.close()

    return await wait_for_async(recorded, timeout=timeout, interval=0.3,
                                what=f"the audit leaf of {event_id}")


def assert_time_stands_in(decoded: Envelope | DecodeError, before: datetime) -> Envelope:
    assert isinstance(decoded, Envelope), decoded
    assert decoded.time_source == "kafka_create_time"  # the requests topic is CreateTime
    # The producing client's clock, on this machine: between the send and now.
    assert before - timedelta(seconds=1) <= decoded.time <= datetime.now(UTC)
    return decoded


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed (Debian package kcat; "
                                         "deploy/test.sh installs it)")
async def test_kcat_publishes_a_cloudevent_without_time_and_intake_accepts_it(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    assert KCAT is not None
    env = audit_env(service_env)
    services["audit"].env = env
    services["audit"].start()
    start_intake(services)
    request = make_request(service_env, s.face_jpeg(), request_id=new_id("req-kcat"))
    event_id = new_id("kcat")
    data = tmp_path / "request.json"
    data.write_text(request.model_dump_json())  # one file is one message
    headers = ce_headers(event_id, "/kcat/upstream", **{"content-type": "application/json",
                                                         "ce_subject": request.request_id})
    before = datetime.now(UTC)
    # murmur2_random: the Java (and aiokafka) partitioner, so the key picks the partition
    # our own producers would, and one request's records stay on one partition.
    proc = await asyncio.create_subprocess_exec(
        KCAT, "-P", "-b", kafka_bootstrap, "-t", PROBE_REQUESTS.name, "-k", request.request_id,
        "-X", "topic.partitioner=murmur2_random",
        *(arg for k, v in headers for arg in ("-H", f"{k}={v.decode()}")), str(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()

    got = await outcomes(kafka_bootstrap, [request.request_id])
    outcome = got[request.request_id][0].event
    assert isinstance(outcome, ProbeSubmitted), outcome
    _offset, decoded = await request_record(kafka_bootstrap, event_id)
    env_ = assert_time_stands_in(decoded, before)
    assert env_.source == "/kcat/upstream" and env_.traceparent is None
    # The auditor can tell: the leaf's time is the record's, and it says so.
    leaf = await audit_leaf(Path(env["FRS_AUDIT_STORE_DIR"]), event_id)
    assert leaf["time_source"] == "kafka_create_time"
    assert leaf["time"] == env_.time.isoformat() and "error" not in leaf


async def test_hand_built_headers_from_a_bare_producer_are_accepted(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str],
) -> None:
    start_intake(services)
    # Only the required attributes (no time, subject, content-type, traceparent), plus a
    # dataschema; and a second request whose time is not RFC 3339.
    good = make_request(service_env, s.face_jpeg(), request_id=new_id("req-raw"))
    bad = make_request(service_env, s.face_jpeg(), request_id=new_id("req-raw"))
    good_id, bad_id = new_id("raw"), new_id("raw")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                max_request_size=MAX_REQUEST_BYTES)
    await producer.start()
    try:
        before = datetime.now(UTC)
        await producer.send_and_wait(
            PROBE_REQUESTS.name, good.model_dump_json().encode(),
            key=good.request_id.encode(),
            headers=ce_headers(good_id, "urn:example:upstream",
                               ce_dataschema="https://example.org/probe-requested.json"))
        await producer.send_and_wait(
            PROBE_REQUESTS.name, bad.model_dump_json().encode(), key=bad.request_id.encode(),
            headers=ce_headers(bad_id, "urn:example:upstream", ce_time="2026-11-26 12:00"))
    finally:
        await producer.stop()

    got = await outcomes(kafka_bootstrap, [good.request_id, bad.request_id])
    accepted = got[good.request_id][0]
    assert isinstance(accepted.event, ProbeSubmitted), accepted.event
    refused = got[bad.request_id][0].event
    assert isinstance(refused, ProbeRejected) and refused.detail.startswith("bad_time: ")
    _offset, decoded = await request_record(kafka_bootstrap, good_id)
    env_ = assert_time_stands_in(decoded, before)
    assert env_.subject is None and env_.source == "urn:example:upstream"


async def test_on_a_log_append_time_topic_the_brokers_time_stands_in(
        kafka_bootstrap: str) -> None:
    topic = f"test.foreign.{uuid.uuid4().hex[:8]}"  # not frs.*: nothing else reads it
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
            "message.timestamp.type": "LogAppendTime"})])
    finally:
        await admin.close()
    event = ProbeRejected(probe_id="prb-foreign", request_id="req-foreign",
                          reason=RejectReason.NO_FACE, detail="")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        before = datetime.now(UTC)
        # A producer clock a year off: the broker overwrites it when it appends.
        await producer.send_and_wait(
            topic, event.model_dump_json().encode(), key=b"prb-foreign",
            timestamp_ms=A_YEAR_AGO_MS, headers=[
                ("ce_specversion", b"1.0"), ("ce_id", b"ev-append"), ("ce_source", b"/x"),
                ("ce_type", ProbeRejected.TYPE.encode())])
    finally:
        await producer.stop()
    [(_raw, decoded)] = await read_topic(kafka_bootstrap, [topic])
    assert isinstance(decoded, Envelope), decoded
    assert decoded.time_source == "kafka_log_append_time"
    assert before - timedelta(milliseconds=1) <= decoded.time <= datetime.now(UTC)
    assert decoded.event == event
