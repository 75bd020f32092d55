"""The history checker: reads what a run left on every topic (and, when given, what the
provider simulators counted, what the audit store holds and what the vault still keeps)
and reports every broken promise, per request.

What "terminal" means, from the event model in schemas/events.py:
- A request ends in exactly one *probe-level* outcome: ``ProbeRejected`` (intake refused
  it), ``PolicyDenied`` (no provider cleared) or ``ProbeSettled`` (results accounted for
  every cleared provider). Zero is a lost request; two different ones (or two settlements)
  is a double effect.
- A cleared provider ends in exactly one *provider-level* outcome: ``DispatchFailed``,
  ``CandidatesReceived`` or ``NoResponse``. ``ProviderResponseRejected`` is not terminal
  (a malformed answer leaves the provider waiting for its deadline). A later outcome for
  the same provider (a vendor answering twice) does not change the first one; the
  settlement must agree with the first outcomes.
- Processing is at-least-once: a redelivered input may be handled twice, and both outputs
  are on the log. Two records of the same type derived from the same input (same
  CloudEvents ``causationid``) are one effect, not two. Everything else counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.catalog import AUDITED_TOPICS
from schemas.envelope import DecodeError, Envelope
from schemas.events import (
    CandidatesReceived,
    ComplianceViolation,
    DeletionConfirmed,
    DeletionOverdue,
    DispatchFailed,
    ImagePurged,
    NoResponse,
    PolicyCleared,
    PolicyDenied,
    ProbeRejected,
    ProbeRequested,
    ProbeSettled,
    ProbeSubmitted,
    ProviderDispatched,
    ReviewCompleted,
)
from schemas.types import probe_id_for
from services.kit.reader import read_topic
from services.kit.routing import RawRecord

Record = tuple[RawRecord, "Envelope | DecodeError"]
PROBE_TERMINAL = (ProbeRejected, PolicyDenied, ProbeSettled)
PROVIDER_TERMINAL = (DispatchFailed, CandidatesReceived, NoResponse)


@dataclass(frozen=True)
class Problem:
    kind: str
    subject: str
    detail: str


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # probe id -> terminal type
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, subject: str, detail: str) -> None:
        self.problems.append(Problem(kind, subject, detail))

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def headline(self) -> dict[str, int]:
        """The promises of issue 18's chaos set, one count each (all must be 0)."""
        k = self.kinds()
        return {"lost": k["lost_request"] + k["no_terminal_outcome"],
                "double_sends": k["duplicate_send"],
                "settled_without_review": k["settled_without_review"],
                "false_no_response": k["false_no_response"],
                "false_deletion_overdue": k["false_deletion_overdue"],
                "images_past_expiry": k["image_past_expiry"],
                "audit_gaps": k["audit_missing"] + k["audit_gap"],
                "audit_forks": k["audit_duplicate"] + k["audit_mismatch"] + k["audit_fork"]}

    def summary(self) -> dict[str, object]:
        return {"ok": self.ok, "headline": self.headline(), "problems": dict(self.kinds()),
                "outcomes": dict(Counter(self.outcomes.values())), "stats": dict(self.stats),
                "first_problems": [p.__dict__ for p in self.problems[:20]]}


def effect_key(env: Envelope) -> tuple[str, str, str]:
    """Same type, same input, same provider: one effect (one input may fan out to one
    event per provider, and those are distinct effects). A probe's settlement is one
    decision whatever input a replay derives it from: the results tracker, replaying a
    batch whose outputs were acknowledged but whose state was not yet committed, may
    settle from its read-back of its own candidates instead of the provider's answer, and
    says the same. The same settlement saying something else is still a second one."""
    if isinstance(env.event, ProbeSettled):
        said = env.event.model_dump(exclude={"settled_at"})
        return (env.type, str(env.subject), repr(sorted(said.items())))
    return (env.type, env.causation_id or env.id, str(getattr(env.event, "provider_id", "")))


def _dedup(envelopes: Iterable[Envelope]) -> list[Envelope]:
    """One per effect: a redelivery's repeated output collapses to one."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for env in envelopes:
        key = effect_key(env)
        if key in seen:
            continue
        seen.add(key)
        out.append(env)
    return out


def check(
    records: Sequence[Record],
    *,
    expected_requests: Iterable[str] = (),
    sends: Mapping[tuple[str, str], int] | None = None,
    audit_positions: Iterable[tuple[str, int, int, str | None]] | None = None,
    audited_topics: Iterable[str] | None = None,
    audit_records: Sequence[Record] | None = None,
    vault_objects: Mapping[str, datetime] | None = None,
    now: datetime | None = None,
    purge_grace: timedelta = timedelta(minutes=2),
    provoked_violations: Iterable[tuple[str, str]] = (),
    probes: Iterable[str] | None = None,
) -> Report:
    """Check one run's history. ``probes`` limits the per-request checks to a run's own
    probes (a shared broker holds other tests' too); ``expected_requests`` are request ids
    whose submission was acknowledged; ``sends`` is the simulators' count per
    (probe, provider); ``audit_positions`` the audit store's (topic, partition, offset, id)
    rows, checked against ``audit_records`` (default: every record); ``vault_objects``
    vault refs still stored with their expiry."""
    report = Report()
    by_probe: dict[str, list[Envelope]] = defaultdict(list)
    requested: dict[str, str] = {}  # probe id -> request id
    for raw, dec in records:
        if raw.topic.startswith("frs.dlq."):
            # Which service gave up on what, and why: every DLQ entry shows in the figures.
            head = dict(raw.headers)
            report.stats[f"dlq {head.get('frs_error_service', b'?').decode()} "
                         f"{head.get('frs_error_code', b'?').decode()}"] += 1
        if isinstance(dec, DecodeError):
            report.stats["undecodable"] += 1
            continue
        report.stats["events"] += 1
        event = dec.event
        if isinstance(event, ProbeRequested):
            pid = probe_id_for(event.request_id)
            requested[pid] = event.request_id
            by_probe[pid].append(dec)
        elif hasattr(event, "probe_id"):
            by_probe[str(event.probe_id)].append(dec)
        if raw.topic.startswith("frs.dlq."):
            report.stats["dlq"] += 1

    wanted = set(probes) if probes is not None else set(by_probe) | set(requested)
    for request_id in expected_requests:
        pid = probe_id_for(request_id)
        wanted.add(pid)
        if pid not in requested:
            report.add("lost_request", pid, f"acknowledged request {request_id} not on the log")

    for pid in sorted(wanted):
        _check_probe(pid, by_probe.get(pid, []), pid in requested, report)
    _check_deadlines(records, wanted, report)

    if sends is not None:
        for (pid, provider), n in sends.items():
            if probes is not None and pid not in wanted:
                continue
            report.stats["sends"] += n
            if n > 1:
                report.add("duplicate_send", pid, f"{provider} received it {n} times")

    if audit_positions is not None:
        _check_audit(records if audit_records is None else audit_records, audit_positions,
                     audited_topics, report)

    provoked = set(provoked_violations)
    for pid in wanted:  # a shared broker holds other runs' violations too
        for env in by_probe.get(pid, []):
            if isinstance(env.event, ComplianceViolation):
                v = env.event
                if (v.probe_id, v.invariant.value) not in provoked:
                    report.add("unprovoked_violation", v.probe_id,
                               f"{v.invariant.value}: {v.detail[:200]}")

    if now is not None:
        _check_expiry(by_probe, wanted, vault_objects or {}, now, purge_grace, report)
    return report


def _check_probe(pid: str, envs: list[Envelope], requested: bool, report: Report) -> None:
    if not requested and not any(isinstance(e.event, ProbeSubmitted) for e in envs):
        return  # not a request of this run (registry noise, another test's probe)
    report.stats["requests"] += 1
    effects = _dedup(envs)
    report.stats["redelivered_effects"] += len(envs) - len(effects)
    terminal = [e for e in effects if isinstance(e.event, PROBE_TERMINAL)]
    if not terminal:
        seen = ", ".join(f"{k} x{n}" for k, n in Counter(type(e.event).__name__
                                                         for e in effects).items())
        report.add("no_terminal_outcome", pid, "no ProbeRejected, PolicyDenied or "
                   f"ProbeSettled; on the log: {seen}")
        return
    kinds = Counter(type(e.event).__name__ for e in terminal)
    report.outcomes[pid] = type(terminal[0].event).__name__
    if len(terminal) > 1:
        report.add("multiple_terminal_outcomes", pid, ", ".join(f"{k} x{n}"
                                                                for k, n in kinds.items()))
    submitted = [e for e in effects if isinstance(e.event, ProbeSubmitted)]
    if len({e.event.vault_ref for e in submitted if isinstance(e.event, ProbeSubmitted)}) > 1:
        report.add("duplicate_submission", pid, "intake stored the image more than once")
    cleared = [e.event for e in effects if isinstance(e.event, PolicyCleared)]
    dispatched: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for e in effects:
        ev = e.event
        if isinstance(ev, ProviderDispatched):
            dispatched[ev.provider_id].add(ev.dispatch_id)
        if isinstance(ev, PROVIDER_TERMINAL):
            first.setdefault(ev.provider_id, type(ev).__name__)
    for provider, ids in dispatched.items():
        if len(ids) > 1:
            report.add("duplicate_dispatch", pid, f"{provider}: {len(ids)} distinct dispatches")
    if isinstance(terminal[0].event, ProbeSettled):
        settled = terminal[0].event
        _check_review(pid, effects, report)
        if not cleared:
            report.add("settled_without_clearance", pid, "ProbeSettled but no PolicyCleared")
            return
        want = {c.provider_id for c in cleared[0].cleared}
        got = {"CandidatesReceived": set(settled.answered), "DispatchFailed": set(settled.failed),
               "NoResponse": set(settled.no_response)}
        if set().union(*got.values()) != want:
            report.add("settlement_mismatch", pid,
                       f"cleared {sorted(want)}, settled {sorted(set().union(*got.values()))}")
            return
        for provider in want:
            outcome = first.get(provider)
            if outcome is None:
                report.add("provider_without_outcome", pid, provider)
            elif provider not in got[outcome]:
                report.add("settlement_mismatch", pid, f"{provider}: first outcome {outcome}")


def _check_review(pid: str, effects: list[Envelope], report: Report) -> None:
    """A probe whose request or clearance asked for examiner review, and that got
    candidates, settles only after a ReviewCompleted (services/results/tracking.py)."""
    required = any(getattr(e.event, "review_required", False) for e in effects
                   if isinstance(e.event, ProbeRequested | ProbeSubmitted | PolicyCleared))
    if not required:
        return
    report.stats["review_required"] += 1
    leads = any(isinstance(e.event, CandidatesReceived) and e.event.list_size > 0
                for e in effects)
    if leads and not any(isinstance(e.event, ReviewCompleted) for e in effects):
        report.add("settled_without_review", pid, "candidates, review required, settled "
                   "with no ReviewCompleted")


def _check_deadlines(records: Sequence[Record], wanted: set[str], report: Report) -> None:
    """A NoResponse is false when it was emitted before its deadline or after the
    provider's answer, received before the deadline, was on the log; a DeletionOverdue
    likewise with the deletion receipt. Answers, receipts and the deadline events of a
    probe share one partition of frs.results.events, so offset order is log order."""
    # What settles a deadline (the answer, the receipt) by (probe, provider), and when.
    settled_by: dict[tuple[str, str, str], datetime] = {}
    ordered = sorted(((raw, dec) for raw, dec in records
                      if raw.topic == "frs.results.events" and isinstance(dec, Envelope)),
                     key=lambda rd: (rd[0].partition, rd[0].offset))
    for _raw, env in ordered:
        ev = env.event
        if getattr(ev, "probe_id", None) not in wanted:
            continue
        pair = (str(getattr(ev, "probe_id", "")), str(getattr(ev, "provider_id", "")))
        if isinstance(ev, CandidatesReceived):
            settled_by.setdefault(("false_no_response", *pair), ev.received_at)
        elif isinstance(ev, DeletionConfirmed):
            settled_by.setdefault(("false_deletion_overdue", *pair), ev.confirmed_at)
        elif isinstance(ev, NoResponse | DeletionOverdue):
            kind = "false_no_response" if isinstance(ev, NoResponse) \
                else "false_deletion_overdue"
            due = ev.deadline if isinstance(ev, NoResponse) else ev.due_at
            report.stats[kind.removeprefix("false_")] += 1
            before = settled_by.get((kind, *pair))
            if env.time < due or (before is not None and before < due):
                report.add(kind, pair[0], f"{pair[1]}: due {due.isoformat()}, emitted "
                           f"{env.time.isoformat()}, answered or confirmed {before}")


def _check_audit(
    records: Sequence[Record],
    positions: Iterable[tuple[str, int, int, str | None]],
    audited_topics: Iterable[str] | None,
    report: Report,
) -> None:
    topics = set(audited_topics) if audited_topics is not None else None
    stored = Counter((t, p, o) for t, p, o, _ in positions)
    ids = {(t, p, o): i for t, p, o, i in positions}
    for (pos, n) in stored.items():
        if n > 1:
            report.add("audit_duplicate", f"{pos[0]}/{pos[1]}@{pos[2]}", f"stored {n} times")
    for raw, dec in records:
        if topics is not None and raw.topic not in topics:
            continue
        pos = (raw.topic, raw.partition, raw.offset)
        report.stats["audit_expected"] += 1
        if pos not in stored:
            report.add("audit_missing", f"{raw.topic}/{raw.partition}@{raw.offset}",
                       dec.type if isinstance(dec, Envelope) else "undecodable")
        elif isinstance(dec, Envelope) and ids[pos] != dec.id:
            report.add("audit_mismatch", f"{raw.topic}/{raw.partition}@{raw.offset}",
                       f"stored id {ids[pos]}, log id {dec.id}")


def _check_expiry(
    by_probe: Mapping[str, list[Envelope]], wanted: set[str],
    vault_objects: Mapping[str, datetime], now: datetime, grace: timedelta, report: Report,
) -> None:
    for pid in wanted:
        envs = by_probe.get(pid, [])
        subs = [e.event for e in envs if isinstance(e.event, ProbeSubmitted)]
        purges = [e.event for e in envs if isinstance(e.event, ImagePurged)
                  and e.event.object_kind == "probe"]
        for sub in subs:
            if not isinstance(sub, ProbeSubmitted):
                continue
            mine = [p for p in purges if p.vault_ref == sub.vault_ref]
            report.stats["images_purged"] += bool(mine)
            if sub.expires_at + grace < now and not mine:
                report.add("image_past_expiry", pid, f"expired {sub.expires_at.isoformat()}, "
                           "no ImagePurged")
            for p in mine:
                if p.reason.value == "expired" and p.purged_at < sub.expires_at:
                    report.add("purged_early", pid, f"purged {p.purged_at.isoformat()} before "
                               f"expiry {sub.expires_at.isoformat()}")
    for ref, expires_at in vault_objects.items():
        if expires_at + grace < now:
            report.add("image_past_expiry", ref, f"still in the vault, expired "
                       f"{expires_at.isoformat()}")


def check_relay(inputs: Sequence[Envelope], outputs: Sequence[Envelope],
                acknowledged: Iterable[str]) -> Report:
    """A relay stream (one output per input): no acknowledged input missing from the log,
    no input written twice, exactly one output effect per input after dedup by causation."""
    report = Report()
    counts = Counter(e.id for e in inputs)
    report.stats["inputs"] = len(counts)
    for ce_id, n in counts.items():
        if n > 1:
            report.add("duplicate_input", ce_id, f"on the input log {n} times")
    for ce_id in acknowledged:
        report.stats["acknowledged"] += 1
        if ce_id not in counts:
            report.add("lost_acknowledged", ce_id, "acknowledged by the broker, not on the log")
    by_cause = Counter(e.causation_id for e in outputs)
    report.stats["outputs"] = len(outputs)
    report.stats["redelivered_effects"] = len(outputs) - len(by_cause)
    for cause in by_cause:
        if cause not in counts:
            report.add("output_without_input", str(cause), "no such input on the log")
    for ce_id in counts:
        if ce_id not in by_cause:
            report.add("lost_message", ce_id, "input on the log, no output")
    return report


async def collect(bootstrap: str, topics: Sequence[str] | None = None,
                  max_s: float = 120.0) -> list[Record]:
    """Every record of every catalog topic, from the beginning to the current end."""
    names = list(topics) if topics is not None else [t.name for t in AUDITED_TOPICS]
    return await read_topic(bootstrap, names, max_s=max_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.history",
        description="Check the history of a run on a broker; exit 1 on any problem.",
        epilog="example:\n  python -m tests.chaos.history --bootstrap 127.0.0.1:19092 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = check(asyncio.run(collect(args.bootstrap)))
    if args.json:
        json.dump(report.summary(), sys.stdout)
        print()
    else:
        for p in report.problems:
            print(f"{p.kind}\t{p.subject}\t{p.detail}")
        print(f"{report.stats['requests']} requests, {len(report.problems)} problems")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
