"""`frs review ...`: examiner review of candidate lists (REQ-EXAMINER).

A conclusion is one of likely_same | inconclusive | likely_different, per candidate: the
vocabulary stays lead-oriented, nothing here turns a candidate into an identification.
Exit codes: 0 recorded / listed, 1 nothing pending when asked to wait, 2 misuse."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.catalog import REGISTRY_AGENTS, RESULTS_EVENTS
from schemas.envelope import Envelope
from schemas.events import (
    AgentRecord,
    CandidatesReceived,
    Conclusion,
    ExaminerConclusion,
    ReviewCompleted,
    ReviewRequested,
)
from services.cli.common import CliSettings, Misuse, emit, subcommand
from services.kit.publisher import Publisher
from services.kit.reader import read_topic


@dataclass
class Pending:
    probe_id: str
    reason: str
    requested_at: datetime
    candidates: dict[tuple[str, str], int] = field(default_factory=dict)  # -> rank
    completed: bool = False


async def _reviews(bootstrap: str) -> dict[str, Pending]:
    records = await read_topic(bootstrap, [RESULTS_EVENTS.name])
    lists: dict[str, list[CandidatesReceived]] = {}
    out: dict[str, Pending] = {}
    done: set[str] = set()
    for _raw, decoded in records:
        if not isinstance(decoded, Envelope):
            continue
        event = decoded.event
        if isinstance(event, CandidatesReceived):
            lists.setdefault(event.probe_id, []).append(event)
        elif isinstance(event, ReviewRequested):
            out.setdefault(event.probe_id, Pending(event.probe_id, event.reason,
                                                   event.requested_at))
        elif isinstance(event, ReviewCompleted):
            done.add(event.probe_id)
    for probe_id, pending in out.items():
        pending.completed = probe_id in done
        for cands in lists.get(probe_id, []):
            for c in cands.candidates:
                pending.candidates[(cands.provider_id, c.candidate_ref)] = c.rank
    return out


def _describe(p: Pending) -> dict[str, Any]:
    return {"probe_id": p.probe_id, "reason": p.reason,
            "requested_at": p.requested_at.isoformat(), "completed": p.completed,
            "candidates": [{"provider_id": prov, "candidate_ref": ref, "rank": rank}
                           for (prov, ref), rank in sorted(p.candidates.items(),
                                                           key=lambda kv: (kv[0][0], kv[1]))]}


async def cmd_review_list(args: argparse.Namespace, settings: CliSettings) -> int:
    reviews = await _reviews(settings.kafka_bootstrap)
    shown = [_describe(p) for p in reviews.values() if args.all or not p.completed]
    lines = [f"{r['probe_id']}  {'done' if r['completed'] else 'PENDING'}  "
             f"{len(r['candidates'])} candidates  ({r['reason']})" for r in shown]
    emit(args, shown, "\n".join(lines) or "no pending reviews")
    return 0


def _parse(spec: str, pending: Pending) -> ExaminerConclusion:
    head, sep, value = spec.rpartition(":")
    if not sep:
        raise Misuse(f"--conclusion {spec!r}: want PROVIDER:CANDIDATE_REF:CONCLUSION")
    try:
        conclusion = Conclusion(value)
    except ValueError:
        raise Misuse(f"--conclusion {spec!r}: conclusion must be one of "
                     f"{', '.join(c.value for c in Conclusion)}") from None
    # Provider ids may contain ':' too: match against the candidates actually received.
    matches = [(p, r) for (p, r) in pending.candidates if f"{p}:{r}" == head]
    if not matches:
        raise Misuse(f"--conclusion {spec!r}: no such candidate for {pending.probe_id}; "
                     "see `frs review list`")
    provider_id, ref = matches[0]
    return ExaminerConclusion(provider_id=provider_id, candidate_ref=ref,
                              conclusion=conclusion)


async def _examiner(bootstrap: str, examiner_id: str) -> AgentRecord:
    agents = [d.event for _, d in await read_topic(bootstrap, [REGISTRY_AGENTS.name])
              if isinstance(d, Envelope) and isinstance(d.event, AgentRecord)
              and d.event.agent_id == examiner_id]
    if not agents or agents[-1].role != "examiner":
        raise Misuse(f"{examiner_id} is not a registered examiner: register the agent with "
                     "role examiner first")
    record = agents[-1]
    valid = record.training_valid_until
    if valid is None or valid < datetime.now(UTC):
        raise Misuse(f"examiner {examiner_id}'s face-examiner training is not current")
    return record


def _vocabulary(spec: str) -> None:
    """Refuse anything outside the lead-oriented scale before touching the bus."""
    _head, sep, value = spec.rpartition(":")
    if not sep or value not in {c.value for c in Conclusion}:
        raise Misuse(f"--conclusion {spec!r}: want PROVIDER:CANDIDATE_REF:CONCLUSION with "
                     f"CONCLUSION one of {', '.join(c.value for c in Conclusion)}")


async def cmd_review_complete(args: argparse.Namespace, settings: CliSettings) -> int:
    for spec in args.conclusion:
        _vocabulary(spec)
    reviews = await _reviews(settings.kafka_bootstrap)
    pending = reviews.get(args.probe)
    if pending is None:
        raise Misuse(f"no review was requested for {args.probe}; see `frs review list`")
    if pending.completed:
        raise Misuse(f"the review of {args.probe} is already recorded")
    await _examiner(settings.kafka_bootstrap, args.examiner)
    conclusions = [_parse(spec, pending) for spec in args.conclusion]
    seen = [(c.provider_id, c.candidate_ref) for c in conclusions]
    if len(set(seen)) != len(seen):
        raise Misuse("one conclusion per candidate: a candidate is given twice")
    missing = sorted(set(pending.candidates) - set(seen))
    if missing:
        raise Misuse(f"{len(missing)} candidate(s) have no conclusion, e.g. "
                     f"{missing[0][0]}:{missing[0][1]}; give one --conclusion per candidate")
    if args.notes:
        conclusions = [c.model_copy(update={"notes": args.notes}) for c in conclusions]
    event = ReviewCompleted(probe_id=args.probe, examiner_id=args.examiner,
                            conclusions=conclusions, completed_at=datetime.now(UTC))
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish([event])
    emit(args, event.model_dump(mode="json"),
          f"recorded {len(conclusions)} conclusion(s) for {args.probe} by {args.examiner}")
    return 0


def register(commands: Any) -> None:
    review = commands.add_parser("review", help="examiner review of candidate lists")
    review_cmds = review.add_subparsers(dest="review_command", required=True)
    listing = subcommand(review_cmds, "list", "list probes waiting for examiner review",
                   "frs review list --json", cmd_review_list)
    listing.add_argument("--all", action="store_true", help="include completed reviews")
    complete = subcommand(
        review_cmds, "complete",
        "record an examiner's conclusion for every candidate of a probe (leads only)",
        "frs review complete prb-... --examiner ex-1 "
        "--conclusion fed-ngi:cand-1:likely_same --conclusion fed-ngi:cand-2:inconclusive",
        cmd_review_complete)
    complete.add_argument("probe", help="probe id (prb-...)")
    complete.add_argument("--examiner", required=True, help="examiner's agent id")
    complete.add_argument("--conclusion", action="append", default=[], required=True,
                          metavar="PROVIDER:CANDIDATE_REF:"
                                  + "|".join(c.value for c in Conclusion),
                          help="one per candidate (repeat)")
    complete.add_argument("--notes", default="", help="examiner's notes (applied to all)")
