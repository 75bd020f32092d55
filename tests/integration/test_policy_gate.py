"""The policy gate on the real broker, inside a real intake process.

ProbeSubmitted events are published straight to frs.probe.events (the policy route's
input), so these tests do not depend on the intake's image handling. Registry entries
are published with the real `frs registry` command. Ids carry a per-test suffix: the
broker, and so the registries, are shared by the whole session."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.catalog import EXIGENT_REVIEWS, POLICY_DECISIONS, REGISTRY_SUSPENSIONS
from schemas.decisions import unverified
from schemas.envelope import Envelope, encode
from schemas.events import (
    Event,
    ExigentReviewOverdue,
    PolicyCleared,
    PolicyDenied,
    ProbeSubmitted,
    ProviderRecord,
    ProviderSuspensionRequested,
    SupervisorReviewRecorded,
    SuspensionReason,
)
from schemas.types import Transport
from services.intake.policy.engine import POLICY_DIR
from services.intake.policy.signing import load_or_create_signing_key, public_key_path
from services.kit.publisher import Publisher
from tests.conftest import ROOT, ServiceProcess
from tests.factories import trusted
from tests.helpers import metrics_port, wait_records

pytestmark = pytest.mark.integration

# Long enough for the review route to catch up after the restart below on a broker a
# whole suite has filled (6 s was not, twice, in clean-clone runs).
REVIEW_WINDOW_S = 20.0
# The intake follows the registry topics asynchronously (a 200 ms poll): give an
# update that long, and more, before the probe that should see it.
REGISTRY_SETTLE_S = 1.0


def cli(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=120, check=False,
        env={**os.environ, "FRS_KAFKA_BOOTSTRAP": bootstrap, "PYTHONPATH": str(ROOT)},
    )


def cli_ok(bootstrap: str, *args: str) -> Any:
    done = cli(bootstrap, *args, "--json")
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout)


class World:
    """One test's registry entries, with unique ids."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        s = uuid.uuid4().hex[:8]
        self.case, self.agent, self.sup = f"CASE-{s}", f"agent-{s}", f"sup-{s}"
        self.fed, self.va = f"fed-{s}", f"va-{s}"

    def seed(self) -> None:
        year = (datetime.now(UTC) + timedelta(days=365)).isoformat()
        self.put_case("open")
        cli_ok(self.bootstrap, "registry", "put", "agent", "--entry", json.dumps([
            {"agent_id": self.agent, "role": "agent", "training_valid_until": year,
             "supervisor_id": self.sup},
            {"agent_id": self.sup, "role": "supervisor", "training_valid_until": year}]))
        cli_ok(self.bootstrap, "registry", "put", "provider", "--entry", json.dumps([
            {"provider_id": self.fed, "name": "federal", "kind": "federal",
             "transport": "https", "endpoint": "https://127.0.0.1:1/x",
             "attestation_valid_until": year},
            {"provider_id": self.va, "name": "Virginia", "kind": "state_local",
             "jurisdictions": ["VA"], "transport": "smime_email",
             "endpoint": "frs@va.example", "attestation_valid_until": year}]))

    def put_case(self, status: str) -> None:
        cli_ok(self.bootstrap, "registry", "put", "case", "--entry", json.dumps(
            {"case_id": self.case, "status": status, "offense_category": "human_trafficking",
             "roi_refs": ["ROI-1"]}))

    def probe(self, **over: Any) -> ProbeSubmitted:
        now = datetime.now(UTC)
        pid = f"prb-{uuid.uuid4()}"
        base: dict[str, Any] = {
            "probe_id": pid, "request_id": f"req-{pid}", "case_id": self.case,
            "agent_id": self.agent, "purpose": "human_trafficking", "roi_refs": ["ROI-1"],
            "image_source": "surveillance", "nexus": ["VA"], "exigent": False,
            "unedited_attestation": True, "vault_ref": f"vault:{pid}",
            "image_format": "jpeg", "received_sha256": "a" * 64, "sanitized_sha256": "b" * 64,
            "expires_at": now + timedelta(hours=72), "submitted_at": now,
        }
        return ProbeSubmitted(**{**base, **over})


async def publish(bootstrap: str, *events: Event) -> None:
    async with Publisher(bootstrap, source="/frs/test") as publisher:
        await publisher.publish(events)


async def wait_decision(bootstrap: str, probe_id: str,
                        kind: type[Event] | tuple[type[Event], ...],
                        within_s: float = 30.0) -> Event:
    """The first ``kind`` event about the probe on the decisions (or reviews) topic."""
    found = await wait_records(
        bootstrap, [POLICY_DECISIONS.name, EXIGENT_REVIEWS.name],
        lambda _r, d: isinstance(d, Envelope) and isinstance(d.event, kind)
        and d.subject == probe_id, timeout=within_s)
    decoded = found[0][1]
    assert isinstance(decoded, Envelope)
    return decoded.event


async def decide(world: World, **over: Any) -> PolicyCleared | PolicyDenied:
    probe = world.probe(**over)
    await publish(world.bootstrap, probe)
    event = await wait_decision(world.bootstrap, probe.probe_id, (PolicyCleared, PolicyDenied))
    assert isinstance(event, PolicyCleared | PolicyDenied)
    return event


def verdicts(event: PolicyCleared | PolicyDenied, *providers: str) -> dict[str, list[str]]:
    """Per provider of interest: [] if cleared, else the rule ids that denied."""
    out = {d.provider_id: [r.rule_id for r in d.rules] for d in event.denied}
    if isinstance(event, PolicyCleared):
        out.update({c.provider_id: [] for c in event.cleared})
    return {p: out[p] for p in providers}


@pytest.fixture
def intake(services: dict[str, ServiceProcess]) -> ServiceProcess:
    proc = services["intake"].start(
        FRS_POLICY_REVIEW_WINDOW_HOURS=str(REVIEW_WINDOW_S / 3600),
        FRS_POLICY_REVIEW_CHECK_INTERVAL_S="0.3")
    proc.wait_log("service started", timeout=60)
    return proc


async def test_registry_updates_change_the_next_decision_without_restart(
        kafka_bootstrap: str, intake: ServiceProcess) -> None:
    world = World(kafka_bootstrap)
    world.seed()
    await asyncio.sleep(REGISTRY_SETTLE_S)

    first = await decide(world)
    assert isinstance(first, PolicyCleared)
    assert verdicts(first, world.fed, world.va) == {world.fed: [], world.va: []}
    # Signed by the gate with its key (the session's, enrolled by the operator).
    assert unverified(first, {trusted().key_id: trusted()}) is None
    cleared = {c.provider_id: c for c in first.cleared}
    assert [str(f) for f in cleared[world.va].fields] == ["photo", "agent_id", "request_ref"]
    assert str(cleared[world.va].transport) == "smime_email"

    # No nexus: the state provider is denied, the federal one is not.
    no_nexus = await decide(world, nexus=[])
    assert verdicts(no_nexus, world.fed, world.va) == {world.fed: [], world.va: ["REQ-NEXUS"]}

    # An operator suspends the federal provider: the very next probe is denied there.
    suspended = cli_ok(kafka_bootstrap, "registry", "suspend", world.fed)
    assert suspended["status"] == "suspended"
    await asyncio.sleep(REGISTRY_SETTLE_S)
    second = await decide(world)
    assert verdicts(second, world.fed, world.va) == {world.fed: ["REQ-PROVIDER"],
                                                     world.va: []}
    assert second.registry_versions.providers > first.registry_versions.providers

    cli_ok(kafka_bootstrap, "registry", "activate", world.fed)
    world.put_case("closed")
    await asyncio.sleep(REGISTRY_SETTLE_S)
    third = await decide(world)
    assert isinstance(third, PolicyDenied)
    assert verdicts(third, world.fed, world.va) == {world.fed: ["REQ-CASE"],
                                                    world.va: ["REQ-CASE"]}
    assert third.registry_versions.cases > second.registry_versions.cases
    assert intake.proc is not None and intake.proc.poll() is None  # never restarted


async def test_replay_from_the_event_and_a_changed_policy(
        kafka_bootstrap: str, intake: ServiceProcess, tmp_path: Path) -> None:
    world = World(kafka_bootstrap)
    world.seed()
    await asyncio.sleep(REGISTRY_SETTLE_S)
    decision = await decide(world, nexus=[])
    assert verdicts(decision, world.fed, world.va) == {world.fed: [], world.va: ["REQ-NEXUS"]}

    # The registries move on; the replay reads only the event.
    cli_ok(kafka_bootstrap, "registry", "suspend", world.fed)
    [report] = cli_ok(kafka_bootstrap, "policy", "explain", decision.probe_id, "--replay")
    assert report["policy_digest"] == decision.policy_digest
    assert report["replay"] == {**report["replay"], "same": True, "digest_matches": True,
                                "registries_consistent": True}
    # The recorded inputs are exactly the registry entries at the recorded versions.
    checked = report["replay"]["registries"]
    assert checked[f"provider:{world.fed}"] == checked[f"case:{world.case}"] == "match"
    assert set(checked.values()) == {"match"}
    assert report["registry_versions"] == decision.registry_versions.model_dump()
    by_provider = {p["provider_id"]: p for p in report["providers"]}
    assert [r["rule_id"] for r in by_provider[world.va]["rules"]] == ["REQ-NEXUS"]

    # A comment-only change: a new digest, the same result.
    edited = tmp_path / "edited"
    shutil.copytree(POLICY_DIR, edited, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (edited / "policies.cedar").write_text(
        (POLICY_DIR / "policies.cedar").read_text() + "\n// reviewed by the privacy officer\n")
    [report] = cli_ok(kafka_bootstrap, "policy", "explain", decision.probe_id, "--replay",
                      "--dir", str(edited))
    assert report["replay"]["same"] is True
    assert report["replay"]["digest_matches"] is False
    assert report["replay"]["policy_digest"] != decision.policy_digest

    # A stricter rule: federal providers need a nexus too; the replay now differs.
    stricter = tmp_path / "stricter"
    shutil.copytree(edited, stricter)
    text = (edited / "policies.cedar").read_text()
    (stricter / "policies.cedar").write_text(text.replace(
        'resource.kind == "state_local" ||',
        'resource.kind == "federal" || resource.kind == "state_local" ||'))
    done = cli(kafka_bootstrap, "policy", "explain", decision.probe_id, "--replay", "--dir",
               str(stricter), "--json")
    assert done.returncode == 1, done.stderr
    [report] = json.loads(done.stdout)
    assert report["replay"]["same"] is False
    replayed = {p["provider_id"]: p for p in report["replay"]["result"]["providers"]}
    assert [r["rule_id"] for r in replayed[world.fed]["rules"]] == ["REQ-NEXUS"]

    human = cli(kafka_bootstrap, "policy", "explain", decision.probe_id)
    assert human.returncode == 0
    assert f"{world.va}: denied" in human.stdout and "REQ-NEXUS:" in human.stdout


def _metric(log_path: Path, name: str) -> float:
    port = metrics_port(log_path)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_exigent_clearance_is_flagged_until_reviewed(
        kafka_bootstrap: str, intake: ServiceProcess) -> None:
    world = World(kafka_bootstrap)
    world.seed()
    await asyncio.sleep(REGISTRY_SETTLE_S)

    no_reason = await decide(world, roi_refs=[], exigent=True,
                             exigent_bypass=["REQ-LAST-RESORT"])
    assert verdicts(no_reason, world.fed) == {world.fed: ["REQ-EXIGENT", "REQ-LAST-RESORT"]}

    exigent = dict(roi_refs=[], exigent=True, exigent_justification="imminent harm",
                   exigent_bypass=["REQ-LAST-RESORT", "REQ-PROVIDER"])
    late = await decide(world, **exigent)
    assert isinstance(late, PolicyCleared)
    assert late.exigent is True and late.bypassed_rules == ["REQ-LAST-RESORT"]
    assert verdicts(late, world.fed) == {world.fed: []}

    # The flag is durable: a restart of the intake does not lose it.
    assert intake.stop() == 0
    intake.start(FRS_POLICY_REVIEW_WINDOW_HOURS=str(REVIEW_WINDOW_S / 3600),
                 FRS_POLICY_REVIEW_CHECK_INTERVAL_S="0.3")
    intake.wait_log("service started", timeout=60, count=2)

    on_time = await decide(world, **exigent)
    assert isinstance(on_time, PolicyCleared) and on_time.exigent
    await wait_decision(kafka_bootstrap, on_time.probe_id, PolicyCleared)
    reviewed = cli_ok(kafka_bootstrap, "exigent", "review", on_time.probe_id, "--supervisor",
                      world.sup, "--approve", "--notes", "justified")
    assert reviewed["approved"] is True

    overdue = await wait_decision(kafka_bootstrap, late.probe_id, ExigentReviewOverdue,
                                  within_s=REVIEW_WINDOW_S + 30)
    assert isinstance(overdue, ExigentReviewOverdue)
    assert overdue.due_at == late.decided_at + timedelta(seconds=REVIEW_WINDOW_S)
    assert _metric(intake.log_path, "frs_policy_exigent_reviews_overdue_total") >= 1

    # Reviewed in time: no overdue event, even after its window has passed.
    await asyncio.sleep(max(0.0, (on_time.decided_at + timedelta(seconds=REVIEW_WINDOW_S)
                                  - datetime.now(UTC)).total_seconds()) + 2.0)
    with pytest.raises(AssertionError):
        await wait_decision(kafka_bootstrap, on_time.probe_id, ExigentReviewOverdue, within_s=1.0)

    done = cli(kafka_bootstrap, "exigent", "pending", "--json")
    pending = {p["probe_id"]: p for p in json.loads(done.stdout)}
    assert done.returncode == 1 and pending[late.probe_id]["overdue"] is True
    assert on_time.probe_id not in pending

    # A supervisor's review lowers the flag; a non-supervisor's does not count.
    cli_ok(kafka_bootstrap, "exigent", "review", late.probe_id, "--supervisor", world.sup,
           "--reject")
    review = await wait_decision(kafka_bootstrap, late.probe_id, SupervisorReviewRecorded)
    assert isinstance(review, SupervisorReviewRecorded) and review.approved is False
    done = cli(kafka_bootstrap, "exigent", "pending", "--json")
    assert late.probe_id not in {p["probe_id"] for p in json.loads(done.stdout)}

    # Reviewing a probe that had no exigent clearance is a misuse.
    assert cli(kafka_bootstrap, "exigent", "review", no_reason.probe_id, "--supervisor",
               world.sup, "--approve").returncode == 2
    assert cli(kafka_bootstrap, "registry", "suspend", "no-such-provider").returncode == 2


async def test_a_suspension_from_results_denies_at_once_and_replays_consistently(
        kafka_bootstrap: str, intake: ServiceProcess) -> None:
    """Results' one say over a provider (issue 19): a suspension on its own topic, applied
    over the operator's entry until the operator writes a newer one. A provider entry
    smuggled onto that topic changes nothing."""
    world = World(kafka_bootstrap)
    world.seed()
    rogue = f"rogue-{uuid.uuid4().hex[:8]}"
    entry = ProviderRecord(provider_id=rogue, name="rogue", kind="federal",
                           transport=Transport.HTTPS, endpoint="https://203.0.113.9/steal",
                           attestation_valid_until=datetime.now(UTC) + timedelta(days=9),
                           updated_at=datetime.now(UTC))
    smuggled = encode(entry, "/frs/results")
    async with Publisher(kafka_bootstrap, source="/frs/results") as publisher:
        await publisher.publish([ProviderSuspensionRequested(
            provider_id=world.fed, reason=SuspensionReason.DELETION_OVERDUE,
            probe_id="prb-late", requested_at=datetime.now(UTC) + timedelta(seconds=1))])
        await (await publisher.send_raw(REGISTRY_SUSPENSIONS.name, smuggled.key,
                                        smuggled.value, smuggled.headers))
    await asyncio.sleep(REGISTRY_SETTLE_S)

    denied = await decide(world)
    assert verdicts(denied, world.fed, world.va) == {world.fed: ["REQ-PROVIDER"],
                                                     world.va: []}
    assert denied.registry_versions.suspensions >= 0
    assert rogue not in {d.provider_id for d in denied.denied} | (
        {c.provider_id for c in denied.cleared} if isinstance(denied, PolicyCleared) else set())
    # The recorded snapshot (fed suspended) agrees with the registry topics on replay.
    explained = cli(kafka_bootstrap, "policy", "explain", denied.probe_id, "--replay",
                    "--json")
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert json.loads(explained.stdout)[0]["replay"]["registries_consistent"] is True

    activated = cli_ok(kafka_bootstrap, "registry", "activate", world.fed)
    assert activated["status"] == "active"
    await asyncio.sleep(REGISTRY_SETTLE_S)
    assert verdicts(await decide(world), world.fed) == {world.fed: []}


def test_trust_key_enrolls_and_revokes_the_gates_public_key(kafka_bootstrap: str,
                                                            tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "keys" / "policy-decisions.pem")
    public = str(public_key_path(tmp_path / "keys" / "policy-decisions.pem"))
    enrolled = cli_ok(kafka_bootstrap, "registry", "trust-key", "--public-key", public)
    assert (enrolled["status"], enrolled["purpose"]) == ("active", "policy-decisions")
    revoked = cli_ok(kafka_bootstrap, "registry", "trust-key", "--public-key", public,
                     "--revoke")
    assert revoked["key_id"] == enrolled["key_id"] and revoked["status"] == "revoked"
    assert trusted(key).key_id == enrolled["key_id"]
    # Not a public key: a misuse, said in one line.
    done = cli(kafka_bootstrap, "registry", "trust-key", "--public-key",
               str(tmp_path / "keys" / "policy-decisions.pem"))
    assert done.returncode == 2 and "--public-key" in done.stderr
