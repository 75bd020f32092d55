"""The dispatch service on the real broker, against the vendor and inbox simulators.

Every test uses its own provider ids, probe ids and consumer group, and suspends its
providers at the end, so tests sharing the session broker do not see each other's work."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from schemas.catalog import DISPATCH_EVENTS, POLICY_DECISIONS, PROVIDER_RESPONSES
from schemas.envelope import Envelope
from schemas.events import (
    DispatchFailed,
    DispatchFailure,
    Event,
    ProviderAnswered,
    ProviderDispatched,
    ProviderRecord,
)
from schemas.types import OutboundField, Transport
from services.cli.dispatch import cleared, start_groups_at_end, synthetic_clearance
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.simulators.inbox import InboxSimulator
from services.simulators.rekognition import RekognitionSimulator
from services.simulators.tls import SimulatorCA
from services.simulators.vendor import VendorBehaviour, VendorSimulator
from tests.conftest import ServiceProcess
from tests.factories import POLICY_KEY
from tests.helpers import metrics_port, wait_for_async, wait_log

pytestmark = pytest.mark.integration


@dataclass
class Rig:
    bootstrap: str
    dispatch: ServiceProcess
    env: dict[str, str]
    tag: str
    image: bytes
    providers: list[ProviderRecord]

    def provider(self, name: str, transport: Transport, endpoint: str, *,
                 status: str = "active", cert_pem: str | None = None,
                 max_candidates: int = 20) -> ProviderRecord:
        now = datetime.now(UTC)
        record = ProviderRecord(
            provider_id=f"{name}-{self.tag}", name=name, kind="commercial",
            transport=transport, endpoint=endpoint, status=status,  # type: ignore[arg-type]
            attestation_valid_until=now + timedelta(days=1), certificate_pem=cert_pem,
            max_candidates=max_candidates, updated_at=now)
        self.providers.append(record)
        return record

    async def publish(self, events: list[Event]) -> None:
        async with Publisher(self.bootstrap, source="/frs/test") as pub:
            await pub.publish(events)

    async def clear(self, n: int, clearances: list[Any], start: int = 0) -> list[str]:
        probes = [f"prb-{self.tag}-{i}" for i in range(start, start + n)]
        pairs = [synthetic_clearance(p, clearances, key=POLICY_KEY) for p in probes]
        await self.publish([s for s, _ in pairs])
        await self.publish([d for _, d in pairs])
        return probes

    async def web_and_mail(self, vendor_url: str, cert_pem: str, n: int
                           ) -> tuple[ProviderRecord, ProviderRecord, list[str]]:
        """An HTTPS and an S/MIME provider, published, and ``n`` probes cleared for both."""
        web = self.provider("web", Transport.HTTPS, vendor_url)
        mail = self.provider("mail", Transport.SMIME_EMAIL, "inbox@provider.test",
                             cert_pem=cert_pem)
        await self.publish(list(self.providers))
        probes = await self.clear(n, [cleared(web.provider_id, Transport.HTTPS),
                                      cleared(mail.provider_id, Transport.SMIME_EMAIL)])
        return web, mail, probes

    def start(self, **env: str) -> ServiceProcess:
        return self.dispatch.start(**{**self.env, **env})

    async def stop(self) -> int:
        return await asyncio.to_thread(self.dispatch.stop)


@pytest.fixture
async def rig(kafka_bootstrap: str, services: dict[str, ServiceProcess], tmp_path: Path,
              face_jpeg: bytes) -> AsyncIterator[Rig]:
    image = tmp_path / "probe.jpg"
    image.write_bytes(face_jpeg)
    tag = uuid.uuid4().hex[:8]
    r = Rig(kafka_bootstrap, services["dispatch"], {
        "FRS_DISPATCH_GROUP_ID": f"frs-dispatch-{tag}",
        "FRS_DISPATCH_IMAGE_SOURCE": "test-file",
        "FRS_DISPATCH_TEST_IMAGE_FILE": str(image),
        "FRS_DISPATCH_RETRY_BASE_DELAY_S": "0.05",
        "FRS_DISPATCH_RETRY_MAX_DELAY_S": "0.5",
    }, tag, face_jpeg, [])
    # Clearances other tests left on the topic are not this rig's: start after them.
    await start_groups_at_end(kafka_bootstrap, [(f"frs-dispatch-{tag}", POLICY_DECISIONS.name)])
    yield r
    if r.dispatch.proc is not None and r.dispatch.proc.poll() is None:
        await r.stop()
    # Later tests' consumer groups read this history: make it a no-op for them.
    now = datetime.now(UTC)
    await r.publish([p.model_copy(update={"status": "suspended", "updated_at": now})
                     for p in r.providers])


async def outcomes(bootstrap: str, probes: list[str], expected: int,
                   timeout_s: float = 90.0) -> dict[tuple[str, str], list[Event]]:
    """Dispatch events of these probes by (probe, provider), once ``expected`` pairs exist."""
    wanted = set(probes)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        by_pair: dict[tuple[str, str], list[Event]] = {}
        for _raw, env in await read_topic(bootstrap, [DISPATCH_EVENTS.name,
                                                      PROVIDER_RESPONSES.name]):
            if isinstance(env, Envelope) and env.subject in wanted:
                ev = env.event
                by_pair.setdefault((ev.probe_id, ev.provider_id), []).append(ev)  # type: ignore[attr-defined]
        done = sum(1 for evs in by_pair.values()
                   if any(isinstance(e, (ProviderDispatched, DispatchFailed)) for e in evs))
        if done >= expected or asyncio.get_running_loop().time() > deadline:
            return by_pair
        await asyncio.sleep(1.0)


def first(events: list[Event], kind: type[Event]) -> Any:
    found = [e for e in events if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in {events}"
    return found[0]


@pytest.fixture
def smime(tmp_path: Path) -> Iterator[tuple[str, Any, Any]]:
    cert_file, key_file = SimulatorCA("provider CA").smime("inbox@provider.test").write(
        tmp_path, "smime")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    yield cert_file.read_text(), cert, key


def decrypt_json(mail: bytes, cert: Any, key: Any) -> dict[str, Any]:
    inner = pkcs7.pkcs7_decrypt_smime(mail, cert, key, [])
    part = email.message_from_bytes(inner, policy=email.policy.default)
    body: dict[str, Any] = json.loads(part.get_payload())
    return body


async def test_each_cleared_provider_gets_exactly_one_minimal_send(
    rig: Rig, smime: tuple[str, Any, Any]
) -> None:
    cert_pem, cert, key = smime
    ca = SimulatorCA()
    async with VendorSimulator(ca=ca) as full, VendorSimulator(ca=ca) as narrow, \
            VendorSimulator(ca=ca) as off:
        with InboxSimulator() as inbox:
            p_full = rig.provider("web", Transport.HTTPS, full.url)
            p_narrow = rig.provider("narrow", Transport.HTTPS, narrow.url)
            p_mail = rig.provider("mail", Transport.SMIME_EMAIL, "mailto:inbox@provider.test",
                                  cert_pem=cert_pem)
            # Cleared by policy, then suspended in the registry before dispatch saw it.
            p_off = rig.provider("off", Transport.HTTPS, off.url, status="suspended")
            await rig.publish(list(rig.providers))
            probes = await rig.clear(20, [
                cleared(p_full.provider_id, Transport.HTTPS),
                cleared(p_narrow.provider_id, Transport.HTTPS,
                        [OutboundField.PHOTO, OutboundField.REQUEST_REF]),
                cleared(p_mail.provider_id, Transport.SMIME_EMAIL),
                cleared(p_off.provider_id, Transport.HTTPS)])
            rig.start(FRS_DISPATCH_CA_FILE=str(full.ca_file), FRS_DISPATCH_SMTP_PORT=str(
                inbox.port))
            by_pair = await outcomes(rig.bootstrap, probes, 80)
            assert await rig.stop() == 0
    assert len(by_pair) == 80, "every cleared (probe, provider) pair has an outcome"
    sha = hashlib.sha256(rig.image).hexdigest()
    for probe in probes:
        sent_full = first(by_pair[(probe, p_full.provider_id)], ProviderDispatched)
        sent_narrow = first(by_pair[(probe, p_narrow.provider_id)], ProviderDispatched)
        sent_mail = first(by_pair[(probe, p_mail.provider_id)], ProviderDispatched)
        failed = first(by_pair[(probe, p_off.provider_id)], DispatchFailed)
        assert failed.reason is DispatchFailure.SUSPENDED and failed.attempts == 0
        assert sent_full.fields_sent == list(OutboundField)
        assert sent_narrow.fields_sent == [OutboundField.PHOTO, OutboundField.REQUEST_REF]
        assert full.copies(sent_full.request_ref) == 1
        assert narrow.copies(sent_narrow.request_ref) == 1
        assert inbox.copies(f"<{sent_mail.dispatch_id}@frs-broker.local>") == 1
    assert len(full.state.received) == len(narrow.state.received) == 20
    assert {r.fields for r in full.state.received} == {("agent_id", "photo", "request_ref")}
    assert {r.fields for r in narrow.state.received} == {("photo", "request_ref")}
    assert {r.photo_sha256 for r in full.state.received} == {sha}
    assert off.state.received == [], "a suspended provider gets nothing"
    assert len(inbox.state.mails) == 20
    for mail in inbox.state.mails:
        body = decrypt_json(mail.content, cert, key)
        assert sorted(body) == ["agent_id", "photo", "request_ref"]
        assert hashlib.sha256(base64.b64decode(body["photo"])).hexdigest() == sha


async def test_sigkill_after_send_before_commit_leaves_one_copy_per_probe_and_provider(
    rig: Rig, smime: tuple[str, Any, Any]
) -> None:
    cert_pem, _, _ = smime
    n = 200
    async with VendorSimulator() as vendor:
        with InboxSimulator() as inbox:
            web, mail, probes = await rig.web_and_mail(vendor.url, cert_pem, n)
            env = {"FRS_DISPATCH_CA_FILE": str(vendor.ca_file),
                   "FRS_DISPATCH_SMTP_PORT": str(inbox.port),
                   "FRS_DISPATCH_BATCH_MAX": "40"}
            # Run 1: the processor SIGKILLs itself after its first batch's sends are out
            # and acknowledged, before the offsets are committed.
            rig.start(FRS_DISPATCH_FAULT_KILL_BEFORE_COMMIT="true", **env)
            code = await asyncio.to_thread(rig.dispatch.proc.wait, 120)  # type: ignore[union-attr]
            assert code == -9
            log = await wait_log(rig.dispatch.log_path, "fault injection: SIGKILL before commit")
            sent_before_kill = sum(vendor.state.copies.values())
            assert 0 < sent_before_kill < n, "the kill happened mid-run, after some sends"
            # Run 2: the same batch is redelivered; the ledger re-emits, nothing is resent.
            rig.start(**env)
            by_pair = await outcomes(rig.bootstrap, probes, 2 * n, timeout_s=180)
            assert await rig.stop() == 0
    assert "fault injection" in log
    assert len(by_pair) == 2 * n
    refs = set()
    for probe in probes:
        sent = first(by_pair[(probe, web.provider_id)], ProviderDispatched)
        refs.add(sent.request_ref)
        assert vendor.copies(sent.request_ref) == 1, "exactly one HTTPS copy"
        sent_mail = first(by_pair[(probe, mail.provider_id)], ProviderDispatched)
        assert inbox.copies(f"<{sent_mail.dispatch_id}@frs-broker.local>") == 1
    assert sum(vendor.state.copies.values()) == n == len(refs)
    assert len(inbox.state.mails) == n
    # The redelivered batch was answered from the ledger: its events went out again.
    redelivered = [p for p in probes
                   if len([e for e in by_pair[(p, web.provider_id)]
                           if isinstance(e, ProviderDispatched)]) > 1]
    assert redelivered, "the uncommitted batch was redelivered after the kill"
    print(json.dumps({"probes": n, "sent_before_kill": sent_before_kill,
                      "redelivered_and_reemitted": len(redelivered),
                      "https_copies": sum(vendor.state.copies.values()),
                      "mails": len(inbox.state.mails)}))


async def scrape(port: int, name: str, labels: str) -> float | None:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def test_5xx_and_timeouts_are_retried_then_fail(rig: Rig) -> None:
    ca = SimulatorCA()
    async with VendorSimulator(VendorBehaviour(error_rate=1.0), ca=ca) as broken, \
            VendorSimulator(VendorBehaviour(timeout_rate=1.0, hang_s=3.0), ca=ca) as slow:
        p5 = rig.provider("five", Transport.HTTPS, broken.url)
        pt = rig.provider("slow", Transport.HTTPS, slow.url)
        await rig.publish(list(rig.providers))
        probes = await rig.clear(3, [cleared(p5.provider_id, Transport.HTTPS),
                                     cleared(pt.provider_id, Transport.HTTPS)])
        rig.start(FRS_DISPATCH_CA_FILE=str(broken.ca_file), FRS_DISPATCH_HTTPS_TIMEOUT_S="0.5",
                  FRS_DISPATCH_RETRY_MAX_ATTEMPTS="3", FRS_DISPATCH_BREAKER_FAILURES="100")
        by_pair = await outcomes(rig.bootstrap, probes, 6)
        port = metrics_port(rig.dispatch.log_path)
        transient = await scrape(port, "frs_dispatch_attempts_total",
                                 f'provider="{p5.provider_id}",result="transient"')
        assert await rig.stop() == 0
    for probe in probes:
        f5 = first(by_pair[(probe, p5.provider_id)], DispatchFailed)
        ft = first(by_pair[(probe, pt.provider_id)], DispatchFailed)
        assert (f5.reason, f5.attempts) == (DispatchFailure.RETRIES_EXHAUSTED, 3)
        assert "http_503" in f5.detail
        assert (ft.reason, ft.attempts) == (DispatchFailure.RETRIES_EXHAUSTED, 3)
        assert "timeout" in ft.detail
    assert sum(broken.state.copies.values()) == 9 and not broken.state.accepted
    assert sum(slow.state.copies.values()) == 9
    assert transient == 9


async def test_circuit_opens_after_repeated_failures_and_closes_after_recovery(
    rig: Rig
) -> None:
    async with VendorSimulator(VendorBehaviour(error_rate=1.0)) as vendor:
        p = rig.provider("flaky", Transport.HTTPS, vendor.url)
        await rig.publish(list(rig.providers))
        probes = await rig.clear(8, [cleared(p.provider_id, Transport.HTTPS)])
        rig.start(FRS_DISPATCH_CA_FILE=str(vendor.ca_file), FRS_DISPATCH_RETRY_MAX_ATTEMPTS="3",
                  FRS_DISPATCH_BREAKER_FAILURES="3", FRS_DISPATCH_BREAKER_OPEN_S="3")
        by_pair = await outcomes(rig.bootstrap, probes, 8)
        port = metrics_port(rig.dispatch.log_path)
        label = f'provider="{p.provider_id}"'
        assert await scrape(port, "frs_dispatch_circuit_state", label) == 2.0  # open
        reasons = Counter(first(by_pair[(x, p.provider_id)], DispatchFailed).reason
                          for x in probes)
        assert reasons[DispatchFailure.CIRCUIT_OPEN] >= 1
        # The open circuit kept most attempts from reaching the vendor.
        assert sum(vendor.state.copies.values()) < 8 * 3

        vendor.behaviour = VendorBehaviour()  # the vendor recovers
        await asyncio.sleep(3.5)  # past the open period: the next call is the trial
        later = await rig.clear(4, [cleared(p.provider_id, Transport.HTTPS)], start=100)
        after = await outcomes(rig.bootstrap, later, 4)
        assert await scrape(port, "frs_dispatch_circuit_state", label) == 0.0  # closed
        # closed at creation, then open, half-open (the trial) and closed again.
        for state, times in (("open", 1), ("half_open", 1), ("closed", 2)):
            assert (await scrape(port, "frs_dispatch_circuit_transitions_total",
                                 f'{label},state="{state}"') or 0) >= times
        assert await rig.stop() == 0
    for x in later:
        assert first(after[(x, p.provider_id)], ProviderDispatched).attempts == 1
    assert len(vendor.state.accepted) == 4


async def test_sigkill_mid_send_is_resolved_by_the_idempotency_key(rig: Rig) -> None:
    """Killed while sends are in flight (outcome unknown): the restart resends HTTPS with
    the same Idempotency-Key, and the vendor keeps exactly one copy of each."""
    n = 120
    async with VendorSimulator(VendorBehaviour(latency_s=0.5)) as vendor:
        web = rig.provider("web", Transport.HTTPS, vendor.url)
        await rig.publish(list(rig.providers))
        probes = await rig.clear(n, [cleared(web.provider_id, Transport.HTTPS)])
        env = {"FRS_DISPATCH_CA_FILE": str(vendor.ca_file)}
        rig.start(**env)
        await wait_for_async(lambda: vendor.state.in_flight >= 10 and vendor.state.accepted,
                             timeout=60, interval=0.05, what="sends in flight")
        assert rig.dispatch.kill() == -9  # SIGKILL with sends on the wire
        in_flight_at_kill = vendor.state.in_flight
        rig.start(**env)
        by_pair = await outcomes(rig.bootstrap, probes, n, timeout_s=120)
        assert await rig.stop() == 0
        await asyncio.sleep(0.6)  # let the killed run's orphaned requests finish
    assert in_flight_at_kill > 0
    refs = {first(by_pair[(p, web.provider_id)], ProviderDispatched).request_ref
            for p in probes}
    assert len(refs) == n
    accepted_refs = Counter(vendor.state.accepted.values())
    assert set(accepted_refs) == refs and set(accepted_refs.values()) == {1}
    resent = [r for r in refs if vendor.copies(r) > 1]
    assert resent, "some sends had an unknown outcome and were resent"
    keys_by_ref: dict[str, set[str | None]] = {}
    for rec in vendor.state.received:
        keys_by_ref.setdefault(rec.request_ref or "", set()).add(rec.idempotency_key)
    assert all(len(keys) == 1 for keys in keys_by_ref.values()), "one key per request_ref"
    stored = Counter(rec.request_ref for rec in vendor.state.received if rec.accepted)
    assert set(stored.values()) == {1}, "the vendor stored each request once"
    print(json.dumps({"probes": n, "in_flight_at_kill": in_flight_at_kill,
                      "resent_same_key": len(resent),
                      "raw_copies": sum(vendor.state.copies.values()),
                      "stored": sum(stored.values())}))


async def join_mid_run(rig: Rig, second: ServiceProcess, cert_pem: str, n: int,
                       hosts: tuple[dict[str, str], dict[str, str]]) -> None:
    """``n`` probes cleared for a web and a mail provider; ``second`` (with ``hosts[1]``'s
    settings) joins the group while the first instance is sending, so partitions move
    mid-run. Every pair gets its outcome and no provider gets a second copy."""
    async with VendorSimulator(VendorBehaviour(latency_s=0.3)) as vendor:
        with InboxSimulator() as inbox:
            web, mail, probes = await rig.web_and_mail(vendor.url, cert_pem, n)
            env = {**rig.env, "FRS_DISPATCH_CA_FILE": str(vendor.ca_file),
                   "FRS_DISPATCH_SMTP_PORT": str(inbox.port), "FRS_DISPATCH_BATCH_MAX": "30",
                   "FRS_DISPATCH_CONCURRENCY": "16"}
            rig.dispatch.start(**env, **hosts[0])
            await wait_for_async(lambda: len(vendor.state.accepted) >= 20, timeout=60,
                                 interval=0.05, what="the first instance to send")
            second.start(**env, **hosts[1])
            try:
                by_pair = await outcomes(rig.bootstrap, probes, 2 * n, timeout_s=180)
                for proc in (rig.dispatch, second):
                    code = await asyncio.to_thread(proc.stop)
                    assert code == 0, proc.log_path.read_text(errors="replace")[-4000:]
            finally:
                if second.proc is not None and second.proc.poll() is None:
                    second.kill()
    assert len(by_pair) == 2 * n
    for probe in probes:
        sent = first(by_pair[(probe, web.provider_id)], ProviderDispatched)
        assert vendor.copies(sent.request_ref) == 1
        sent_mail = first(by_pair[(probe, mail.provider_id)], ProviderDispatched)
        assert inbox.copies(f"<{sent_mail.dispatch_id}@frs-broker.local>") == 1
    assert sum(vendor.state.copies.values()) == n and len(inbox.state.mails) == n
    # Both instances did part of the work.
    logs = [rig.dispatch.log_path.read_text(), second.log_path.read_text()]
    assert all("consumer started" in log for log in logs)


async def test_rebalance_between_live_instances_sends_nothing_twice(
    rig: Rig, services: dict[str, ServiceProcess], tmp_path: Path,
    smime: tuple[str, Any, Any],
) -> None:
    """A second instance joins the group mid-run (same state dir): partitions move while
    the first is sending, and still no provider gets a second copy."""
    second = ServiceProcess("dispatch", services["dispatch"].env, tmp_path / "dispatch-2.log")
    await join_mid_run(rig, second, smime[0], 200, ({"FRS_DISPATCH_INSTANCE_ID": "dispatch-a"},
                                                    {"FRS_DISPATCH_INSTANCE_ID": "dispatch-b"}))


async def test_rekognition_search_answer_goes_to_provider_responses(rig: Rig) -> None:
    async with RekognitionSimulator() as aws:
        aws.state.fail_with = ["ThrottlingException", "InvalidParameterException"]
        p = rig.provider("aws", Transport.REKOGNITION,
                         "rekognition://us-east-1/gallery-x?threshold=85&quality=HIGH",
                         max_candidates=5)
        await rig.publish(list(rig.providers))
        probes = await rig.clear(4, [cleared(p.provider_id, Transport.REKOGNITION)])
        rig.start(FRS_DISPATCH_REKOGNITION_ENDPOINT_URL=aws.url,
                  AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        by_pair = await outcomes(rig.bootstrap, probes, 4)
        assert await rig.stop() == 0
    sha = hashlib.sha256(rig.image).hexdigest()
    assert {(r["CollectionId"], r["MaxFaces"], r["FaceMatchThreshold"], r["QualityFilter"],
             r["image_sha256"], r["authorized"]) for r in aws.state.requests} == {
        ("gallery-x", 5, 85.0, "HIGH", sha, True)}
    assert {k for r in aws.state.requests for k in r} == {
        "CollectionId", "MaxFaces", "FaceMatchThreshold", "QualityFilter", "image_sha256",
        "authorized"}, "AWS gets the image and search parameters, nothing else"
    failed = [e for x in probes for e in by_pair[(x, p.provider_id)]
              if isinstance(e, DispatchFailed)]
    assert [(f.reason, f.detail) for f in failed] == [
        (DispatchFailure.PERMANENT_ERROR, "InvalidParameterException")]
    attempts = sum(f.attempts for f in failed)
    for x in probes:
        events = by_pair[(x, p.provider_id)]
        sent = [e for e in events if isinstance(e, ProviderDispatched)]
        if not sent:
            continue
        assert sent[0].fields_sent == [OutboundField.PHOTO]
        attempts += sent[0].attempts
        answer = first(events, ProviderAnswered)
        assert answer.channel == "rekognition"
        matches = answer.payload["FaceMatches"]
        assert len(matches) == 5 and answer.payload["FaceMatchThreshold"] == 85.0
        assert all(m["Similarity"] >= 85.0 for m in matches)
        assert answer.payload["request_ref"] == sent[0].request_ref
    assert attempts == len(aws.state.requests) == 5  # 4 probes + 1 throttled retry


async def test_two_hosts_each_see_every_claim_check(
    rig: Rig, services: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    """Two instances with their own state dirs (two hosts): whichever gets a clearance
    has the probe's claim check (it rides in the clearance), so every clearance is sent
    and none waits for the DLQ."""
    n = 60
    second = ServiceProcess("dispatch", services["dispatch"].env, tmp_path / "host-b.log")
    async with VendorSimulator() as vendor:
        web = rig.provider("web", Transport.HTTPS, vendor.url)
        await rig.publish(list(rig.providers))
        env = {**rig.env, "FRS_DISPATCH_CA_FILE": str(vendor.ca_file),
               "FRS_DISPATCH_MAX_RETRIES": "0"}
        rig.dispatch.start(**env, FRS_DISPATCH_INSTANCE_ID="host-a")
        second.start(**env, FRS_DISPATCH_INSTANCE_ID="host-b",
                     FRS_STATE_DIR=str(tmp_path / "host-b-state"))
        try:
            for proc in (rig.dispatch, second):
                await wait_log(proc.log_path, "consumer started")
            await asyncio.sleep(3)  # let the shared group settle on both members
            probes = await rig.clear(n, [cleared(web.provider_id, Transport.HTTPS)])
            by_pair = await outcomes(rig.bootstrap, probes, n, timeout_s=60)
            assert await rig.stop() == 0
            assert await asyncio.to_thread(second.stop) == 0
        finally:
            if second.proc is not None and second.proc.poll() is None:
                second.kill()
    logs = rig.dispatch.log_path.read_text() + (tmp_path / "host-b.log").read_text()
    assert "sent to DLQ" not in logs and "handler failed" not in logs
    refs = {first(by_pair[(p, web.provider_id)], ProviderDispatched).request_ref
            for p in probes}
    assert len(refs) == n and set(Counter(vendor.state.accepted.values()).values()) == {1}
    assert refs == set(vendor.state.accepted.values())
