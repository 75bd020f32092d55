"""Usage oversight end to end: each rule driven by a scripted scenario through the whole
pipeline (`frs submit`, the policy gate, dispatch to the simulated vendor, its answers and
deletion receipts, the results tracker), one UsageAlert per hit in the audit log, none for
a run of ordinary probes, and `frs oversight replay` equal to the live alerts.

The oversight worker runs with low thresholds (FRS_OVERSIGHT_*) so each scenario is a few
probes, and an app of its own that starts at the topics' beginning, so the replay (which
reads every topic from its beginning) and the worker judge the same events."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from schemas.catalog import PROBE_EVENTS, RESULTS_EVENTS, oversight_topics
from schemas.envelope import Envelope
from schemas.events import ProbeRejected, ProbeSettled, UsageAlert, UsageRule
from schemas.types import ImageSource, Purpose, probe_id_for
from services.cli.client import build_request
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.topics import ensure_topics
from tests.conftest import ROOT
from tests.e2e.conftest import System
from tests.helpers import wait_for

# Once, on the default store: the oversight worker keeps no state in FRS_STATE_URL (its
# tables are changelog topics), so the PostgreSQL e2e run would repeat it for nothing.
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.environ.get("FRS_TEST_STORE", "sqlite") != "sqlite",
                                 reason="oversight keeps no state in the store")]

# Thresholds: searches 3 an hour but 2 a day (so a day's hit needs no second hour), one
# case per agent, one provider per image for TCO (two otherwise), one exigent clearance a
# week, a review due 20 s after its request, overdue receipts over half of a provider's
# sends (at least 2).
LIMITS = {
    "FRS_OVERSIGHT_SEARCHES_PER_HOUR": "3", "FRS_OVERSIGHT_SEARCHES_PER_DAY": "2",
    "FRS_OVERSIGHT_DISTINCT_CASES": "1",
    "FRS_OVERSIGHT_PROVIDER_FANOUT": '{"transnational_criminal_organization": 1}',
    "FRS_OVERSIGHT_PROVIDER_FANOUT_DEFAULT": "2", "FRS_OVERSIGHT_EXIGENT_PER_WEEK": "1",
    "FRS_OVERSIGHT_REVIEW_DEADLINE_S": "20", "FRS_OVERSIGHT_DELETION_OVERDUE_SHARE": "0.5",
    "FRS_OVERSIGHT_DELETION_OVERDUE_MIN": "2",
}
# Ordinary probes: two per agent (the day's limit), one case, one provider, no review.
CLEAN = int(os.environ.get("FRS_TEST_OVERSIGHT_CLEAN", "1000"))
# What each scenario must raise, by (rule, scenario): seven searches in a few seconds put
# exactly one clock hour over 3 (split by an hour's turn, one side still has 4), and a day.
EXPECTED = Counter({
    (UsageRule.SEARCHES_PER_HOUR, "sph"): 1, (UsageRule.SEARCHES_PER_DAY, "sph"): 1,
    (UsageRule.SEARCHES_PER_DAY, "spd"): 1, (UsageRule.DISTINCT_CASES, "dc"): 1,
    (UsageRule.PURPOSE_SHOPPING, "ps"): 1, (UsageRule.PROVIDER_FANOUT, "pf"): 1,
    (UsageRule.EXIGENT_PER_WEEK, "ex"): 1, (UsageRule.REVIEW_MISSING, "rv"): 1,
    (UsageRule.DELETION_OVERDUE_SHARE, "do"): 1,
})


@pytest.fixture
def oversight_env(kafka_bootstrap: str) -> dict[str, str]:
    """The worker's thresholds, and an app of its own (consumer group, tables, observations
    topic): it reads the inputs from their beginning, as the replay does."""
    app_id = f"frs-oversight-e2e{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka_bootstrap, topics=oversight_topics(app_id)))
    return {**LIMITS, "FRS_OVERSIGHT_APP_ID": app_id, "FRS_OVERSIGHT_TICK_S": "0.5",
            "FRS_OVERSIGHT_REVIEW_QUIET_S": "2"}


def photos(face_jpeg: bytes, n: int) -> Iterator[bytes]:
    """The face photo ``n`` times, each with its number in black and white 8x8 blocks
    along the top edge (JPEG keeps them): another digest each (the rules follow images by
    digest), the same face for the quality gate."""
    base = Image.open(io.BytesIO(face_jpeg)).convert("RGB")
    seen: set[str] = set()
    for i in range(n):
        image = base.copy()
        for bit in range(24):
            shade = 255 if (i >> bit) & 1 else 0
            image.paste((shade, shade, shade), (8 * bit, 0, 8 * bit + 8, 8))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        digest = hashlib.sha256(out.getvalue()).hexdigest()
        assert digest not in seen
        seen.add(digest)
        yield out.getvalue()


class Scenarios:
    """Registry entries and submissions of one run; every id carries the run's namespace."""

    def __init__(self, system: System, tmp_path: Path, face_jpeg: bytes) -> None:
        self.system = system
        self.ns = f"ov{uuid.uuid4().hex[:6]}"
        self.dir = tmp_path / "photos"
        self.dir.mkdir()
        self.photos = photos(face_jpeg, 10**6)
        self.photos_lock = threading.Lock()  # submissions run in threads
        self.key = Path(system.env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")
        self.scenario_of: dict[str, str] = {}  # probe id -> scenario
        self.case = f"CASE-{self.ns}"
        # Providers at the simulated vendor: only fed-ngi's answers and deletion receipts
        # reach the webhook (its shared secret), so these two never confirm a deletion.
        self.fanout_provider = f"fed-tco-{self.ns}"
        self.no_receipts = f"fed-nodel-{self.ns}"

    def frs(self, *args: str) -> str:
        done = self.system.frs(*args)
        assert done.returncode == 0, f"frs {' '.join(args[:3])}: {done.stdout}{done.stderr}"
        return done.stdout

    def photo(self) -> bytes:
        with self.photos_lock:
            return next(self.photos)

    def agent(self, name: str) -> str:
        return f"agent-{self.ns}-{name}"

    def register(self, clean_agents: int) -> None:
        year = (datetime.now(UTC) + timedelta(days=365)).isoformat()
        cases = [{"case_id": case, "status": "open", "offense_category": "human_trafficking",
                  "roi_refs": ["ROI-1"]} for case in (self.case, f"{self.case}-b")]
        names = ["sph", "spd", "dc", "ps", "pf", "ex", "rv", "do"]
        names += [f"c{i}" for i in range(clean_agents)]
        agents = [{"agent_id": self.agent(n), "role": "agent", "training_valid_until": year,
                   "supervisor_id": "sup-1"} for n in names]
        common = {"kind": "federal", "transport": "https", "endpoint": self.system.vendor_url,
                  "attestation_valid_until": year}
        providers = [
            {**common, "provider_id": self.fanout_provider, "name": "TCO gallery (sim)",
             "allowed_purposes": [Purpose.TRANSNATIONAL_CRIMINAL_ORGANIZATION.value]},
            {**common, "provider_id": self.no_receipts, "name": "No receipts (sim)",
             "allowed_purposes": [Purpose.CHILD_EXPLOITATION_SUBJECT.value],
             "deletion_deadline_s": 5},
        ]
        self.frs("registry", "demo", "--endpoint", self.system.vendor_url)
        self.frs("registry", "put", "case", "--entry", json.dumps(cases))
        self.frs("registry", "put", "agent", "--entry", json.dumps(agents))
        self.frs("registry", "put", "provider", "--entry", json.dumps(providers))
        time.sleep(2.0)  # the services follow the registry topics asynchronously

    def submit(self, scenario: str, agent: str, *, case: str | None = None,
               purpose: Purpose = Purpose.HUMAN_TRAFFICKING, roi: str = "ROI-1",
               photo: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[str, Path]:
        """`frs submit` as the agent does; the probe id and the photo file."""
        if photo is None:
            photo = self.dir / f"{uuid.uuid4().hex}.jpg"
            photo.write_bytes(self.photo())
        request_id = f"req-{self.ns}-{uuid.uuid4().hex[:12]}"
        self.frs("submit", "--image", str(photo), "--case", case or self.case, "--agent",
                 self.agent(agent), "--purpose", purpose.value, "--roi", roi, "--source",
                 ImageSource.SURVEILLANCE.value, "--request-id", request_id,
                 "--intake-public-key", str(self.key), *extra)
        probe_id = probe_id_for(request_id)
        self.scenario_of[probe_id] = scenario
        return request_id, photo

    def hits(self) -> None:
        """One scenario per rule (all at once but purpose shopping's second step)."""
        # Purpose shopping: the gate denies the photo (it cites no ROI of the case), and
        # the same photo comes back under another purpose.
        denied, photo = self.submit("ps", "ps", roi="ROI-9")
        jobs: list[tuple[str, str, dict[str, Any]]] = [
            *[("sph", "sph", {}) for _ in range(7)],
            *[("spd", "spd", {}) for _ in range(3)],
            ("dc", "dc", {}), ("dc", "dc", {"case": f"{self.case}-b"}),
            ("pf", "pf", {"purpose": Purpose.TRANSNATIONAL_CRIMINAL_ORGANIZATION}),
            *[("ex", "ex", {"extra": ("--exigent", "--justification", "child at risk")})
              for _ in range(2)],
            ("rv", "rv", {"extra": ("--review",)}),  # candidates, and no examiner ever
            *[("do", "do", {"purpose": Purpose.CHILD_EXPLOITATION_SUBJECT})
              for _ in range(2)],
        ]
        with ThreadPoolExecutor(4) as pool:
            done = [pool.submit(self.submit, scenario, agent, **kw)
                    for scenario, agent, kw in jobs]
            self.frs("timeline", denied, "--until", "frs.policy.denied.v1", "--wait", "60")
            self.submit("ps", "ps", photo=photo, purpose=Purpose.IDENTITY_BENEFIT_FRAUD)
            for job in done:
                job.result()

    def clean(self, n: int) -> set[str]:
        """Ordinary use, published as the upstream client does (`frs submit` is one
        process per probe): two searches per agent in one case, each photo once."""
        bootstrap = self.system.env["FRS_KAFKA_BOOTSTRAP"]
        requests = [build_request(self.photo(), self.key, case_id=self.case,
                                  agent_id=self.agent(f"c{i // 2}"),
                                  purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
                                  image_source=ImageSource.SURVEILLANCE,
                                  request_id=f"req-{self.ns}-clean-{i}") for i in range(n)]

        async def send() -> None:
            async with Publisher(bootstrap, source="/frs/upstream") as publisher:
                await publisher.publish(requests)

        asyncio.run(send())
        probes = {probe_id_for(r.request_id) for r in requests}
        self.scenario_of |= dict.fromkeys(probes, "clean")
        return probes


def settled(bootstrap: str, probes: set[str]) -> bool:
    """Every probe settled (its answer in, nothing owed but deletion receipts)."""
    done = {env.event.probe_id for _, env in asyncio.run(read_topic(
        bootstrap, [RESULTS_EVENTS.name, PROBE_EVENTS.name]))
        if isinstance(env, Envelope) and isinstance(env.event, ProbeSettled | ProbeRejected)
        and env.event.probe_id in probes}
    return done == probes


def audited_alerts(system: System) -> list[tuple[str, UsageAlert]]:
    """The alerts in the audit log, as (CloudEvent id, alert), one per leaf."""
    store = system.audit_log()
    try:
        leaves = [json.loads(leaf) for leaf in store.leaves()]
    finally:
        store.close()
    return [(leaf["id"], UsageAlert.model_validate(leaf["data"])) for leaf in leaves
            if leaf.get("type") == UsageAlert.TYPE]


def test_each_rule_alerts_once_ordinary_use_never_and_replay_agrees(
        system: System, tmp_path: Path, face_jpeg: bytes) -> None:
    runs = Scenarios(system, tmp_path, face_jpeg)
    runs.register(clean_agents=(CLEAN + 1) // 2)
    started = time.monotonic()
    runs.hits()
    print(f"hit scenarios submitted in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    clean = runs.clean(CLEAN)
    bootstrap = system.env["FRS_KAFKA_BOOTSTRAP"]
    wait_for(lambda: settled(bootstrap, clean), timeout=240, interval=3.0,
             what=f"{CLEAN} ordinary probes settled")
    took = time.monotonic() - started
    print(f"{CLEAN} ordinary probes through the pipeline in {took:.1f} s")
    rejected = [env.event.probe_id for _, env in asyncio.run(read_topic(
        bootstrap, [PROBE_EVENTS.name])) if isinstance(env, Envelope)
        and isinstance(env.event, ProbeRejected) and env.event.probe_id in clean]
    assert not rejected, f"{len(rejected)} ordinary probes rejected by the intake"

    def ours() -> list[tuple[str, UsageAlert]]:
        return [(ce_id, a) for ce_id, a in audited_alerts(system)
                if any(p in runs.scenario_of for p in a.probe_ids)]

    def by_scenario(found: list[tuple[str, UsageAlert]]) -> Counter[tuple[UsageRule, str]]:
        out: Counter[tuple[UsageRule, str]] = Counter()
        for _, alert in found:
            scenarios = {runs.scenario_of.get(p, "?") for p in alert.probe_ids}
            assert len(scenarios) == 1, (alert.rule, scenarios)
            out[(alert.rule, scenarios.pop())] += 1
        return out

    wait_for(lambda: by_scenario(ours()) >= EXPECTED, timeout=120, interval=2.0,
             what=lambda: f"alerts {EXPECTED} in the audit log, have {by_scenario(ours())}")
    time.sleep(5)  # nothing more comes, nothing twice
    found = ours()
    assert by_scenario(found) == EXPECTED  # one per hit, none for the ordinary probes
    assert all(ce_id == alert.alert_id for ce_id, alert in found)
    assert len({a.alert_id for _, a in found}) == len(found) == sum(EXPECTED.values())

    # `frs oversight replay`: the alerts rebuilt from the topics with the same thresholds
    # are the live ones (the worker may still be judging the last reviews: a few tries).
    env = {**system.env, **LIMITS}

    def replay() -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "services.cli", "oversight", "replay",
                               "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode in (0, 1), done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    result = wait_for(lambda: (r := replay())["equal"] and r, timeout=60, interval=2.0,
                      what=lambda: f"replay equal to the live alerts: {replay()}")
    assert result["live"] == result["replayed"] >= sum(EXPECTED.values())
    print(f"replay: {result['events']} events, {result['live']} alerts, equal")
