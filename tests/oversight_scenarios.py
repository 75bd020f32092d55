"""Scripted event sequences for the oversight rules: one hit per rule, and a clean run.

Each scenario is a list of (CloudEvent id, event) with explicit event times, so the unit
tests (MemoryTables) and the broker tests (published to the topics) see the same hits.
LIMITS are the thresholds both use (small, so a scenario stays short)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.events import (
    ClaimCheck,
    DeletionOverdue,
    Event,
    PolicyCleared,
    PolicyDenied,
    ProbeSubmitted,
    ProviderDispatched,
    RegistryVersions,
    ReviewCompleted,
    ReviewRequested,
    UsageRule,
)
from schemas.types import ImageSource, OutboundField, Purpose, Transport
from services.oversight.handlers import Limits

T0 = datetime(2026, 11, 30, 9, 5, tzinfo=UTC)
LIMITS = Limits(searches_per_hour=3, searches_per_day=5, distinct_cases=2,
                distinct_cases_window_s=86400, shopping_window_s=86400,
                provider_fanout={"human_trafficking": 2}, provider_fanout_default=2,
                exigent_per_week=2, review_deadline_s=3600, deletion_overdue_share=0.25,
                deletion_overdue_min=2)
# The same limits as service settings (FRS_OVERSIGHT_*).
LIMIT_ENV = {
    "FRS_OVERSIGHT_SEARCHES_PER_HOUR": "3", "FRS_OVERSIGHT_SEARCHES_PER_DAY": "5",
    "FRS_OVERSIGHT_DISTINCT_CASES": "2", "FRS_OVERSIGHT_DISTINCT_CASES_WINDOW_S": "86400",
    "FRS_OVERSIGHT_SHOPPING_WINDOW_S": "86400",
    "FRS_OVERSIGHT_PROVIDER_FANOUT": '{"human_trafficking": 2}',
    "FRS_OVERSIGHT_PROVIDER_FANOUT_DEFAULT": "2", "FRS_OVERSIGHT_EXIGENT_PER_WEEK": "2",
    "FRS_OVERSIGHT_REVIEW_DEADLINE_S": "3600", "FRS_OVERSIGHT_DELETION_OVERDUE_SHARE": "0.25",
    "FRS_OVERSIGHT_DELETION_OVERDUE_MIN": "2",
}
POLICY_DIGEST = "a" * 64


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class Script:
    """Builds a scenario; ``tag`` keeps ids of different scenarios apart."""

    tag: str
    ns: str = ""  # before every id: runs on one broker keep apart
    events: list[tuple[str, Event]] = field(default_factory=list)

    def add(self, event: Event) -> Event:
        self.events.append((f"ev-{self.ns}{self.tag}-{len(self.events)}", event))
        return event

    def probe(self, n: int | str) -> str:
        return f"prb-{self.ns}{self.tag}-{n}"

    def submit(self, n: int | str, at: datetime, *, agent: str, case: str = "CASE-1",
               image: str | None = None, purpose: Purpose = Purpose.HUMAN_TRAFFICKING,
               nexus: tuple[str, ...] = ()) -> str:
        probe = self.probe(n)
        agent, case, image = self.ns + agent, self.ns + case, self.ns + (image or probe)
        self.add(ProbeSubmitted(
            probe_id=probe, request_id=f"req-{probe}", case_id=case, agent_id=agent,
            purpose=purpose, roi_refs=["ROI-1"], image_source=ImageSource.SURVEILLANCE,
            nexus=list(nexus), exigent=False, unedited_attestation=True,
            vault_ref=f"vault/{probe}", image_format="jpeg",
            received_sha256=digest(image), sanitized_sha256=digest(f"s-{probe}"),
            expires_at=at + timedelta(days=30), submitted_at=at))
        return probe

    def deny(self, probe: str, at: datetime, case: str = "CASE-1") -> None:
        self.add(PolicyDenied(probe_id=probe, case_id=self.ns + case, denied=[],
                              policy_digest=POLICY_DIGEST,
                              registry_versions=RegistryVersions(), decided_at=at))

    def clear(self, probe: str, at: datetime, *, agent: str, exigent: bool = False) -> None:
        self.add(PolicyCleared(
            probe_id=probe, case_id="CASE-1", cleared=[{
                "provider_id": "prov-a", "transport": Transport.HTTPS,
                "fields": list(OutboundField)}],
            exigent=exigent, bypassed_rules=["roi"] if exigent else [],
            policy_digest=POLICY_DIGEST, registry_versions=RegistryVersions(), decided_at=at,
            claim=ClaimCheck(vault_ref=f"vault/{probe}", agent_id=self.ns + agent,
                             sanitized_sha256=digest(f"s-{probe}"),
                             expires_at=at + timedelta(days=30))))

    def send(self, probe: str, provider: str, at: datetime) -> None:
        provider = self.ns + provider
        self.add(ProviderDispatched(
            probe_id=probe, provider_id=provider, dispatch_id=f"d-{probe}-{provider}",
            transport=Transport.HTTPS, fields_sent=list(OutboundField),
            request_ref=f"ref-{probe}-{provider}", sent_at=at,
            response_due_at=at + timedelta(hours=1), deletion_due_at=at + timedelta(days=1)))

    def overdue(self, probe: str, provider: str, at: datetime) -> None:
        self.add(DeletionOverdue(probe_id=probe, provider_id=self.ns + provider, due_at=at))

    def review(self, probe: str, at: datetime) -> None:
        self.add(ReviewRequested(probe_id=probe, reason="provider requires review",
                                 requested_at=at))

    def reviewed(self, probe: str, at: datetime) -> None:
        self.add(ReviewCompleted(probe_id=probe, examiner_id="examiner-1", conclusions=[],
                                 completed_at=at))


M = timedelta(minutes=1)


def searches_per_hour(ns: str = "") -> Script:
    s = Script("sph", ns)  # 4 searches in one clock hour: 1 over 3
    for i in range(4):
        s.submit(i, T0 + i * M, agent="agent-sph", case="CASE-1")
    return s


def searches_per_day(ns: str = "") -> Script:
    s = Script("spd", ns)  # 6 searches over 6 hours, 1 an hour: over 5 a day, never 3 an hour
    for i in range(6):
        s.submit(i, T0 + i * timedelta(hours=1), agent="agent-spd")
    return s


def distinct_cases(ns: str = "") -> Script:
    s = Script("dc", ns)  # 3 cases in a day, 1 search an hour: over 2
    for i in range(3):
        s.submit(i, T0 + i * timedelta(hours=1), agent="agent-dc", case=f"CASE-{i}")
    return s


def purpose_shopping(ns: str = "") -> Script:
    s = Script("ps", ns)  # denied, then the same photo again under another purpose
    first = s.submit(0, T0, agent="agent-ps", image="photo-ps")
    s.deny(first, T0 + M)
    s.submit(1, T0 + 30 * M, agent="agent-ps", image="photo-ps",
             purpose=Purpose.FINANCIAL_FRAUD)
    return s


def provider_fanout(ns: str = "") -> Script:
    s = Script("pf", ns)  # one photo, two probes, three providers: over 2
    a = s.submit(0, T0, agent="agent-pf", image="photo-pf")
    b = s.submit(1, T0 + 10 * M, agent="agent-pf2", image="photo-pf", case="CASE-2")
    s.send(a, "prov-a", T0 + M)
    s.send(a, "prov-b", T0 + 2 * M)
    s.send(b, "prov-c", T0 + 11 * M)
    return s


def exigent_per_week(ns: str = "") -> Script:
    s = Script("ex", ns)  # 3 exigent clearances in a week: over 2
    for i in range(3):
        probe = s.submit(i, T0 + i * timedelta(hours=5), agent="agent-ex")
        s.clear(probe, T0 + i * timedelta(hours=5) + M, agent="agent-ex", exigent=True)
    return s


def review_missing(ns: str = "") -> Script:
    s = Script("rv", ns)  # review requested, none by the deadline (a second one is on time)
    late = s.submit(0, T0, agent="agent-rv")
    done = s.submit(1, T0 + M, agent="agent-rv2")
    s.review(late, T0 + 2 * M)
    s.review(done, T0 + 2 * M)
    s.reviewed(done, T0 + 30 * M)
    return s


def deletion_overdue_share(ns: str = "") -> Script:
    s = Script("do", ns)  # 4 sends, 2 overdue receipts: 0.5 > 0.25 and at least 2
    for i in range(4):
        probe = s.submit(i, T0 + i * M, agent=f"agent-do{i}", case=f"CASE-{i}")
        s.send(probe, "prov-do", T0 + i * M + M)
    s.overdue(s.probe(0), "prov-do", T0 + timedelta(days=1))
    s.overdue(s.probe(1), "prov-do", T0 + timedelta(days=1))
    return s


HITS = {
    UsageRule.SEARCHES_PER_HOUR: searches_per_hour,
    UsageRule.SEARCHES_PER_DAY: searches_per_day,
    UsageRule.DISTINCT_CASES: distinct_cases,
    UsageRule.PURPOSE_SHOPPING: purpose_shopping,
    UsageRule.PROVIDER_FANOUT: provider_fanout,
    UsageRule.EXIGENT_PER_WEEK: exigent_per_week,
    UsageRule.REVIEW_MISSING: review_missing,
    UsageRule.DELETION_OVERDUE_SHARE: deletion_overdue_share,
}


def clean(probes: int = 1000, agents: int = 400, ns: str = "") -> Script:
    """Ordinary use: each agent a few searches a day in one case, each photo once, sent to
    one provider, reviewed on time, deletion receipts on time."""
    s = Script("clean", ns)
    for i in range(probes):
        agent = i % agents
        at = T0 + timedelta(days=i // agents, hours=(i // 1) % 3, minutes=i % 60)
        probe = s.submit(i, at, agent=f"agent-c{agent}", case=f"CASE-c{agent}")
        s.clear(probe, at + M, agent=f"agent-c{agent}", exigent=(i % 97 == 0))
        s.send(probe, f"prov-{i % 5}", at + 2 * M)
        if i % 50 == 0:
            s.review(probe, at + 3 * M)
            s.reviewed(probe, at + 10 * M)
    return s
