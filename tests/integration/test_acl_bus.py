"""Least privilege on a real secured broker (broker.sh start --secure, ACLs applied).

The denials the ACL file promises are refused by the broker with an authorization error,
each service's own work is allowed (the whole pipeline runs, every process on its own
identity), clients without TLS, with a wrong password or with another principal's
certificate cannot connect, and no secret shows up in any log of the run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.catalog import TOPICS
from schemas.decisions import sign
from schemas.envelope import Envelope
from schemas.events import (
    CaseRecord,
    ComplianceViolation,
    DispatchFailed,
    DispatchFailure,
    Event,
    Invariant,
    PolicyCleared,
    ProviderDispatched,
)
from schemas.types import Purpose
from services.audit.store import AuditStore
from services.kit.acls import allows, load
from services.kit.kafka import KafkaSettings, client_options
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.topics import ensure_topics
from services.simulators.demo import setup
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import free_port_block, free_port_pair, wait_for

pytestmark = pytest.mark.integration

BROKER = ROOT / "deploy" / "kafka" / "broker.sh"
ACLS = load()
PRINCIPALS = sorted(ACLS.principals)
TOPIC_NAMES = [t.name for t in TOPICS]
# A producer of a principal with no WRITE anywhere is refused one step earlier: the
# idempotent producer's InitProducerId needs cluster IDEMPOTENT_WRITE, implied by any WRITE.
WRITE_DENIED = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)


@dataclass
class SecureBroker:
    state: Path
    port: int
    logs: list[Path] = field(default_factory=list)
    # Filled by the pipeline test: the loopback capture and what must not be in it.
    capture: Path | None = None
    sensitive: dict[str, bytes] = field(default_factory=dict)
    key_files: list[Path] = field(default_factory=list)  # other private keys of the run

    def env(self, principal: str) -> dict[str, str]:
        text = (self.state / "env" / f"{principal}.env").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def identity_env(self, principal: str, prefix: str) -> dict[str, str]:
        """``principal``'s own identity as a second one of a process (``FRS_POLICY_``:
        the policy gate in the intake process), as deploy/up.sh passes it."""
        return {f"{prefix}KAFKA_{name}": value for key, value in self.env(principal).items()
                for name in ("CERT_FILE", "KEY_FILE", "SASL_USERNAME", "SASL_PASSWORD_FILE")
                if key == f"FRS_KAFKA_{name}"}

    def settings(self, principal: str, **override: str) -> KafkaSettings:
        return KafkaSettings(**{**self.env(principal), **override})  # type: ignore[arg-type]

    def cli(self, principal: str, *args: str, extra: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        # The identity's settings last: nothing inherited may point it elsewhere.
        env = {**os.environ, **(extra or {}), **self.env(principal), "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180, check=False)
        out = self.state / f"cli-{principal}-{len(self.logs)}.log"
        out.write_text(done.stdout + done.stderr)
        self.logs.append(out)
        return done


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    port = free_port_block(3)  # client, controller, internal listeners
    state = tmp_path_factory.mktemp("kafka-secure")
    env = {**os.environ, "FRS_KAFKA_PORT": str(port), "FRS_KAFKA_STATE": str(state),
           "FRS_PYTHON": sys.executable}
    subprocess.run([str(BROKER), "start", "--secure"], env=env, check=True, timeout=300,
                   capture_output=True)
    broker = SecureBroker(state, port)
    try:
        asyncio.run(ensure_topics("", kafka=broker.settings("admin")))
        applied = broker.cli("admin", "acl", "apply", "--json", "--admin-config",
                             str(state / "admin.properties"))
        assert applied.returncode == 0, applied.stderr
        yield broker
    finally:
        subprocess.run([str(BROKER), "stop"], env=env, check=False, timeout=60,
                       capture_output=True)


# --- probes of what a principal may do ------------------------------------------------


async def try_write(settings: KafkaSettings, topic: str) -> None:
    producer = AIOKafkaProducer(**client_options(settings), request_timeout_ms=10000,
                                enable_idempotence=True, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"{}", key=b"acl-test")
    finally:
        await producer.stop()


async def try_read(settings: KafkaSettings, topics: str | list[str],
                   group: str | None = None) -> int:
    """Records read from the topics (partition 0 without a group), or the broker's
    authorization error."""
    names = [topics] if isinstance(topics, str) else topics
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                request_timeout_ms=10000)
    await consumer.start()
    try:
        # Ask the broker for these topics' metadata first: one the principal may not even
        # describe comes back TOPIC_AUTHORIZATION_FAILED (aiokafka keeps that silently).
        for name in names:
            await consumer._client.add_topic(name)
        denied = [n for n in names if n in consumer._client.cluster.unauthorized_topics]
        if denied:
            raise TopicAuthorizationFailedError(", ".join(denied))
        if group is not None:
            consumer.subscribe(names)
        else:
            consumer.assign([TopicPartition(n, 0) for n in names])
            await consumer.seek_to_beginning()
        batch = await consumer.getmany(timeout_ms=1000)
        if group is not None:
            await consumer.commit()
        return sum(len(records) for records in batch.values())
    finally:
        await consumer.stop()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- the ACLs on the broker are exactly the file --------------------------------------


def test_acl_apply_is_idempotent_and_the_broker_matches_the_file(secure: SecureBroker) -> None:
    config = str(secure.state / "admin.properties")
    again = secure.cli("admin", "acl", "apply", "--json", "--admin-config", config)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["created"], summary["deleted"]) == (0, 0)
    assert summary["unchanged"] == summary["bindings"] > 30
    check = secure.cli("admin", "acl", "check", "--json", "--admin-config", config)
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout) == {"missing": [], "extra": []}


# --- the examples: refused with an authorization error --------------------------------

NOT_INTAKE_READERS = [p for p in PRINCIPALS if p not in {"intake", "audit", "auditor"}]


@pytest.mark.parametrize("principal", NOT_INTAKE_READERS)
def test_only_intake_reads_probe_requests(secure: SecureBroker, principal: str) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        run(try_read(secure.settings(principal), "frs.probe.requests"))


def test_no_group_but_intakes_consumes_probe_requests(secure: SecureBroker) -> None:
    # dispatch may use its own groups, but not intake's, and not this topic in its own.
    with pytest.raises(GroupAuthorizationFailedError):
        run(try_read(secure.settings("dispatch"), "frs.policy.decisions", "frs-intake"))
    with pytest.raises(TopicAuthorizationFailedError):
        run(try_read(secure.settings("dispatch"), "frs.probe.requests", "frs-dispatch"))


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "upstream"])
def test_only_upstream_writes_probe_requests(secure: SecureBroker, principal: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), "frs.probe.requests"))


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "audit"])
@pytest.mark.parametrize("topic", ["frs.audit.checkpoints", "frs.audit.violations"])
def test_nobody_but_audit_writes_audit_topics(secure: SecureBroker, principal: str,
                                              topic: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), topic))


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "intake"])
def test_only_intake_writes_the_clock_topic(secure: SecureBroker, principal: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), "frs.clock"))


@pytest.mark.parametrize("topic", TOPIC_NAMES)
def test_auditor_writes_nothing(secure: SecureBroker, topic: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings("auditor"), topic))


def test_auditor_reads_everything(secure: SecureBroker) -> None:
    run(try_write(secure.settings("upstream"), "frs.probe.requests"))
    records = run(read_topic("", TOPIC_NAMES, kafka=secure.settings("auditor"), max_s=20))
    assert isinstance(records, list)
    assert {r.topic for r, _ in records} >= {"frs.probe.requests"}


@pytest.mark.parametrize("topic", ["frs.policy.decisions"])
def test_dispatch_cannot_write_policy_topics(secure: SecureBroker, topic: str) -> None:
    assert all(not allows(ACLS, "dispatch", "WRITE", t) for t in TOPIC_NAMES
               if t.startswith("frs.policy."))
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings("dispatch"), topic))


# --- issue 19: the rights taken away, each refused by the broker ------------------------

REMOVED_WRITES = [("supervisor", "frs.policy.decisions"), ("intake", "frs.policy.decisions"),
                  ("intake", "frs.dlq.policy"), ("results", "frs.registry.providers")]


@pytest.mark.parametrize(("principal", "topic"), REMOVED_WRITES)
def test_removed_write_rights_are_refused(secure: SecureBroker, principal: str,
                                          topic: str) -> None:
    assert not allows(ACLS, principal, "WRITE", topic)
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), topic))


def test_intake_no_longer_reads_decisions_nor_joins_the_policy_groups(
        secure: SecureBroker) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        run(try_read(secure.settings("intake"), "frs.policy.decisions"))
    with pytest.raises(GroupAuthorizationFailedError):
        run(try_read(secure.settings("intake"), "frs.probe.events", "frs-policy"))
    # The policy gate's own principal does both.
    assert isinstance(run(try_read(secure.settings("policy"), "frs.probe.events",
                                   "frs-policy-acl-test")), int)


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "policy"])
def test_only_the_policy_gate_writes_decisions(secure: SecureBroker, principal: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), "frs.policy.decisions"))


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "supervisor"])
def test_only_supervisors_write_exigent_reviews(secure: SecureBroker, principal: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), "frs.exigent.reviews"))


@pytest.mark.parametrize("principal", [p for p in PRINCIPALS if p != "operator"])
@pytest.mark.parametrize("topic", ["frs.registry.providers", "frs.registry.trusted_keys"])
def test_only_the_operator_writes_provider_entries_and_trusted_keys(
        secure: SecureBroker, principal: str, topic: str) -> None:
    with pytest.raises(WRITE_DENIED):
        run(try_write(secure.settings(principal), topic))


def test_own_work_is_allowed_for_each_principal(secure: SecureBroker) -> None:
    """Every write and group read the file grants works (the denials above are not
    a broker that refuses everything)."""
    for principal in PRINCIPALS:
        grants = ACLS.principals[principal]
        settings = secure.settings(principal)
        for topic in (t for t in TOPIC_NAMES if allows(ACLS, principal, "WRITE", t)):
            run(try_write(settings, topic))
        readable = [t for t in TOPIC_NAMES if allows(ACLS, principal, "READ", t)]
        if readable:
            assert isinstance(run(try_read(settings, readable)), int)
        for group in grants.groups:
            name = group.rstrip("*") + ("-acl-test" if group.endswith("*") else "")
            assert isinstance(run(try_read(settings, readable, name)), int)


# --- who cannot connect at all --------------------------------------------------------


def test_a_client_without_tls_cannot_connect(secure: SecureBroker) -> None:
    for port in (secure.port, secure.port + 1, secure.port + 2):
        plain = KafkaSettings(kafka_bootstrap=f"127.0.0.1:{port}")
        with pytest.raises(KafkaConnectionError):
            run(try_write(plain, "frs.probe.requests"))


def test_a_client_with_a_wrong_password_cannot_connect(secure: SecureBroker) -> None:
    wrong = secure.state / "wrong.password"
    wrong.write_text("not-the-password")
    with pytest.raises(KafkaConnectionError):
        run(try_write(secure.settings("upstream", FRS_KAFKA_SASL_PASSWORD_FILE=str(wrong)),
                      "frs.probe.requests"))


def test_a_client_with_another_services_certificate_cannot_connect(secure: SecureBroker
                                                                   ) -> None:
    pki = secure.state / "pki"
    # upstream's own password, intake's certificate: refused, though both are valid.
    borrowed = secure.settings("upstream", FRS_KAFKA_CERT_FILE=str(pki / "intake.pem"),
                               FRS_KAFKA_KEY_FILE=str(pki / "intake.key"))
    with pytest.raises(KafkaConnectionError):
        run(try_write(borrowed, "frs.probe.requests"))
    # No certificate at all, right password: refused in the TLS handshake.
    bare = secure.settings("upstream", FRS_KAFKA_CERT_FILE="", FRS_KAFKA_KEY_FILE="")
    with pytest.raises(KafkaConnectionError):
        run(try_write(bare, "frs.probe.requests"))
    # A service certificate on the certificate-only internal listener: refused.
    internal = KafkaSettings(
        kafka_bootstrap=f"127.0.0.1:{secure.port + 2}", kafka_security_protocol="SSL",
        kafka_ca_file=pki / "ca.pem", kafka_cert_file=pki / "intake.pem",
        kafka_key_file=pki / "intake.key")
    with pytest.raises(KafkaConnectionError):
        run(try_write(internal, "frs.probe.requests"))
    # The same client with its own certificate gets in (the refusals are not a broken setup).
    run(try_write(secure.settings("upstream"), "frs.probe.requests"))


# --- the whole pipeline, each process on its own identity -----------------------------


FLOW = ["frs.probe.requested.v1", "frs.probe.submitted.v1", "frs.policy.cleared.v1",
        "frs.provider.dispatched.v1", "frs.candidates.received.v1"]


def start_capture(secure: SecureBroker) -> subprocess.Popen[bytes] | None:
    """tcpdump on loopback, the broker's three ports (Debian's tcpdump; skipped if absent)."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        return None
    secure.capture = secure.state / "loopback.pcap"
    ports = " or ".join(f"tcp port {secure.port + k}" for k in range(3))
    proc = subprocess.Popen([tcpdump, "-i", "lo", "-U", "-Z", "root", "-s", "0", "-w",
                             str(secure.capture), ports],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not secure.capture.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not secure.capture.exists():  # no capture rights (not root, no CAP_NET_RAW)
        proc.kill()
        proc.wait(timeout=30)
        secure.capture = None
        return None
    return proc


def test_the_pipeline_runs_in_secured_mode(secure: SecureBroker, tmp_path: Path,
                                           face_jpeg: bytes) -> None:
    keys = tmp_path / "keys"
    base = {**os.environ, "PYTHONPATH": str(ROOT), "FRS_STATE_DIR": str(tmp_path / "state"),
            "FRS_INTAKE_PRIVATE_KEY_FILE": str(keys / "intake.key.pem"),
            "FRS_AUDIT_STORE_DIR": str(tmp_path / "audit"), "FRS_LOG_LEVEL": "INFO",
            # Forged decisions are judged within seconds, not the default grace.
            "FRS_AUDIT_CLEARANCE_GRACE_S": "5"}
    for name in ("intake", "dispatch", "results", "audit"):
        base[f"FRS_{name.upper()}_METRICS_PORT"] = "0"
    # The provider: the vendor simulator, answering on the results webhook (as up.sh does).
    demo_env = setup(tmp_path / "demo", webhook_port=free_port_pair())
    base.update(demo_env.service_env)
    vendor = subprocess.Popen(demo_env.vendor_args, cwd=ROOT, env=base, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    assert vendor.stdout is not None
    vendor_url = json.loads(vendor.stdout.readline())["url"]
    # Ids that occur nowhere else, so finding them in the capture means the bus leaked.
    tag = uuid.uuid4().hex[:12]
    case_id, agent_id, request_id = f"CASE-{tag}", f"agent-{tag}", f"req-{tag}"
    capture = start_capture(secure)
    secure.key_files.append(keys / "intake.key.pem")
    # The policy gate's signing key: made by the intake at its start, enrolled by the
    # operator's `frs registry demo` below.
    secure.key_files.append(tmp_path / "state" / "keys" / "policy-decisions.pem")
    procs = {}
    for name in ("intake", "dispatch", "results", "audit"):
        log = secure.state / f"{name}.log"
        secure.logs.append(log)
        # The intake process holds two identities: its own and the policy gate's.
        policy = secure.identity_env("policy", "FRS_POLICY_") if name == "intake" else {}
        procs[name] = ServiceProcess(name, {**base, **secure.env(name), **policy}, log).start()
    try:
        for proc in procs.values():
            proc.wait_log('"consumer started"', timeout=90)
        demo = secure.cli("operator", "registry", "demo", "--endpoint", vendor_url, extra=base)
        assert demo.returncode == 0, demo.stderr
        assert "trusted policy key ed25519:" in demo.stdout
        year = "2099-01-01T00:00:00Z"
        for kind, entry in (
            ("case", {"case_id": case_id, "status": "open", "roi_refs": ["ROI-1"],
                      "offense_category": "human_trafficking"}),
            ("agent", {"agent_id": agent_id, "role": "agent", "supervisor_id": "sup-1",
                       "training_valid_until": year}),
        ):
            put = secure.cli("operator", "registry", "put", kind, "--entry", json.dumps(entry),
                             extra=base)
            assert put.returncode == 0, put.stderr
        image = tmp_path / "face.jpg"
        image.write_bytes(face_jpeg)
        submitted = secure.cli(
            "upstream", "submit", "--json", "--image", str(image), "--case", case_id,
            "--agent", agent_id, "--purpose", "human_trafficking", "--roi", "ROI-1",
            "--source", "surveillance", "--nexus", "VA", "--request-id", request_id,
            "--intake-public-key", str(keys / "intake.key.pub.pem"), extra=base)
        assert submitted.returncode == 0, submitted.stderr
        timeline = secure.cli("auditor", "timeline", request_id, "--json", "--until",
                              FLOW[-1], "--wait", "90", extra=base)
        assert timeline.returncode == 0, timeline.stderr
        events = json.loads(timeline.stdout)
        assert [e["type"] for e in events if e["type"] in FLOW] == FLOW
        # The intake read the broker's clock on its own identity (it would not have started
        # otherwise) and its purger swept by it.
        clock = run(read_topic("", ["frs.clock"], kafka=secure.settings("auditor")))
        assert b"intake" in {r.key for r, _ in clock}
        intake_log = procs["intake"].log_path.read_text()
        assert '"job":"purge sweep"' in intake_log
        assert "broker clock sample failed" not in intake_log
        assert "purge sweep skipped" not in intake_log
        # The decisions came from the policy gate's own principal, signed; a forged one
        # from a principal that may write the topic is refused by dispatch, flagged by audit.
        decisions = run(read_topic("", ["frs.policy.decisions"],
                                   kafka=secure.settings("auditor")))
        assert isinstance(decisions, list)
        decided = [d.event for _, d in decisions if isinstance(d, Envelope)
                   and isinstance(d.event, PolicyCleared)]
        assert decided and all(e.signature for e in decided)
        forged_clearance_is_refused_and_flagged(secure, decided[0])
        # The audit service, on its own identity, records each of them exactly once.
        ids = {e["id"] for e in events}
        deadline = time.monotonic() + 60
        while True:
            procs["audit"].stop()
            store = AuditStore(tmp_path / "audit")
            recorded = [r.ce_id for r in store.rows()]
            store.close()
            if ids <= set(recorded) or time.monotonic() > deadline:
                break
            procs["audit"].start()
            procs["audit"].wait_log('"consumer started"', timeout=60,
                                    count=procs["audit"].log_path.read_text().count(
                                        '"consumer started"') + 1)
            time.sleep(2)
        assert ids <= set(recorded)
        # (the raw test records written above have no CloudEvents id)
        decoded = [i for i in recorded if i is not None]
        assert len(decoded) == len(set(decoded))
        # The operator cannot read the pipeline's events: a refusal, said in one line.
        refused = secure.cli("operator", "timeline", request_id, "--json", extra=base)
        assert refused.returncode != 0
        # The ids did cross the wire (the auditor reads them back from the bus).
        records = run(read_topic("", TOPIC_NAMES, kafka=secure.settings("auditor")))
        assert isinstance(records, list)
        on_bus = b"".join(r.value or b"" for r, _ in records)
        assert case_id.encode() in on_bus and agent_id.encode() in on_bus
    finally:
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
        vendor.terminate()
        vendor.wait(timeout=30)
        if capture is not None:
            capture.send_signal(signal.SIGTERM)
            capture.wait(timeout=30)
    for name, proc in procs.items():
        assert proc.proc is not None and proc.proc.returncode == 0, name
    secure.sensitive = {"case id": case_id.encode(), "agent id": agent_id.encode(),
                        "request id": request_id.encode(),
                        "probe bytes": face_jpeg[len(face_jpeg) // 2:][:48]}


def forged_clearance_is_refused_and_flagged(secure: SecureBroker, genuine: PolicyCleared
                                            ) -> None:
    """Issue 19's forged clearance, published by a principal that may write decisions
    (admin, a super user): a real provider, a zero digest, no signature; and the same with
    another key's signature. Dispatch refuses both, the audit flags both."""
    assert genuine.claim is not None
    tag = uuid.uuid4().hex[:8]
    unsigned = genuine.model_copy(update={
        "probe_id": f"prb-forged-{tag}", "policy_digest": "0" * 64, "signature": None,
        "key_id": None, "claim": genuine.claim.model_copy(update={"sanitized_sha256": "0" * 64})})
    other_key = sign(unsigned.model_copy(update={"probe_id": f"prb-forged-{tag}-2"}),
                     Ed25519PrivateKey.generate())
    forged = [unsigned, other_key]

    async def publish() -> None:
        async with Publisher("", source="/frs/intake", kafka=secure.settings("admin")) as pub:
            await pub.publish(forged)

    run(publish())
    ids = {e.probe_id for e in forged}
    auditor = secure.settings("auditor")

    def seen(topic: str) -> list[Event]:
        found = run(read_topic("", [topic], kafka=auditor))
        assert isinstance(found, list)
        return [d.event for _, d in found if isinstance(d, Envelope)
                and getattr(d.event, "probe_id", None) in ids]

    def refusals() -> list[DispatchFailed]:
        out = [e for e in seen("frs.dispatch.events") if isinstance(e, DispatchFailed)]
        return out if {e.probe_id for e in out} == ids else []

    def flagged() -> list[ComplianceViolation]:
        out = [v for v in seen("frs.audit.violations") if isinstance(v, ComplianceViolation)
               and v.invariant is Invariant.UNVERIFIED_DECISION]
        return out if {v.probe_id for v in out} == ids else []

    refused = wait_for(refusals, timeout=60, what="dispatch to refuse both forged clearances")
    assert {e.reason for e in refused} == {DispatchFailure.UNVERIFIED_DECISION}
    assert not [e for e in seen("frs.dispatch.events") if isinstance(e, ProviderDispatched)]
    assert len(wait_for(flagged, timeout=60, what="the audit to flag both")) == 2


def test_loopback_capture_shows_nothing_in_clear(secure: SecureBroker) -> None:
    if secure.capture is None:
        pytest.skip("tcpdump is not installed (Debian package tcpdump)")
    assert secure.sensitive, "the pipeline test did not run"
    pcap = secure.capture.read_bytes()
    assert len(pcap) > 50_000  # the whole run went through it
    assert b"\x17\x03\x03" in pcap  # TLS application data records
    for what, needle in secure.sensitive.items():
        assert needle not in pcap, f"{what} in clear on the wire"
    # Plaintext bus metadata the broker would otherwise carry in clear.
    for clear in (b"frs.probe.requests", b"ce_type", b"frs.probe.submitted.v1"):
        assert clear not in pcap


def test_the_capture_would_see_ids_on_a_plaintext_bus(kafka_bootstrap: str,
                                                     tmp_path: Path) -> None:
    """Control for the capture test: the same search finds an id sent over plaintext."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        pytest.skip("tcpdump is not installed (Debian package tcpdump)")
    port = kafka_bootstrap.rsplit(":", 1)[1]
    pcap = tmp_path / "plain.pcap"
    proc = subprocess.Popen([tcpdump, "-i", "lo", "-U", "-Z", "root", "-s", "0", "-w",
                             str(pcap), f"tcp port {port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not pcap.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        case_id = f"CASE-{uuid.uuid4().hex[:12]}"
        run(_publish_plain(kafka_bootstrap, case_id))
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert case_id.encode() in pcap.read_bytes()


async def _publish_plain(bootstrap: str, case_id: str) -> None:
    # A valid, closed case: harmless to the other tests sharing the plaintext broker.
    record = CaseRecord(case_id=case_id, status="closed", roi_refs=["ROI-1"],
                        offense_category=Purpose.FINANCIAL_FRAUD, updated_at=datetime.now(UTC))
    async with Publisher(bootstrap, "/test/acl", kafka=KafkaSettings(kafka_bootstrap=bootstrap)
                         ) as publisher:
        await publisher.publish([record])


# --- no secret in any log of the run (keep this test last in the module) --------------


def test_no_secret_in_any_log_of_the_run(secure: SecureBroker) -> None:
    secrets = {f.name: f.read_text().strip() for f in (secure.state / "secrets").iterdir()}
    assert len(secrets) == len(PRINCIPALS)
    key_lines: dict[str, list[str]] = {}
    for key in [*(secure.state / "pki").glob("*.key"), *secure.key_files]:
        lines = [line for line in key.read_text().splitlines() if "-----" not in line]
        # The first base64 line of a PKCS#8 key is mostly a header common to all keys.
        key_lines[key.name] = lines[1:] or lines
    logs = [secure.state / "broker.log", secure.state / "format.log", *secure.logs]
    assert len(logs) > 6 and len(key_lines) > len(PRINCIPALS)
    for log in logs:
        text = log.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, log.name
        for name, password in secrets.items():
            assert password not in text, f"password {name} in {log.name}"
        for name, lines in key_lines.items():
            assert not any(line in text for line in lines), f"key {name} in {log.name}"
    # The scan can fail: the logs do record this run's refusals and the pipeline's work.
    assert "to STARTED" in (secure.state / "broker.log").read_text()
    assert any('"consumer started"' in log.read_text() for log in secure.logs)
