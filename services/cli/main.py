"""``frs topics``, ``frs submit``, ``frs timeline``, ``frs registry put|demo``: the
commands of upstream systems and operators."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.catalog import AUDITED_TOPICS
from schemas.envelope import Envelope
from schemas.events import AgentRecord, CaseRecord, Event, ProbeRejected, ProviderRecord
from schemas.types import ImageSource, Purpose, probe_id_for
from services.cli.client import demo_registry, submit_and_wait
from services.cli.common import CliSettings, Misuse, emit, group, subcommand
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.topics import TopicStatus, ensure_topics

# --- topics ---------------------------------------------------------------------------


async def cmd_topics_create(args: argparse.Namespace, settings: CliSettings) -> int:
    statuses = await ensure_topics(settings.kafka_bootstrap, replication=args.replication)
    _emit_statuses(args, statuses)
    return 0


async def cmd_topics_check(args: argparse.Namespace, settings: CliSettings) -> int:
    """Exit 1 when a topic is missing or its settings (retention, segment.ms, cleanup,
    size limit, partitions) differ from the catalog: retention holds only as written."""
    statuses = await ensure_topics(settings.kafka_bootstrap, fix=False)
    _emit_statuses(args, statuses)
    return 1 if any(s.action != "ok" for s in statuses) else 0


def _emit_statuses(args: argparse.Namespace, statuses: list[TopicStatus]) -> None:
    payload = [{"topic": s.name, "action": s.action, "detail": s.detail} for s in statuses]
    emit(args, payload, "\n".join(f"{s.action:8} {s.name} {s.detail}".rstrip()
                                   for s in statuses))


# --- submit ---------------------------------------------------------------------------


async def cmd_submit(args: argparse.Namespace, settings: CliSettings) -> int:
    image = Path(args.image)
    if not image.is_file():
        raise Misuse(f"no such image file: {image}")
    public_key = Path(args.intake_public_key)
    if not public_key.is_file():
        raise Misuse(f"intake public key not found at {public_key}: start the intake first "
                     "or pass --intake-public-key")
    if not args.no_wait and args.wait <= 0:
        raise Misuse("--wait takes a number of seconds above 0 (or use --no-wait)")
    try:
        sent = await submit_and_wait(
            settings.kafka_bootstrap, public_key, image.read_bytes(),
            wait_s=None if args.no_wait else args.wait, kafka=settings,
            request_id=args.request_id, case_id=args.case, agent_id=args.agent,
            purpose=Purpose(args.purpose), roi_refs=args.roi, image_source=ImageSource(args.source),
            nexus=args.nexus, exigent=args.exigent, exigent_justification=args.justification,
            unedited_attestation=not args.not_unedited, review_required=args.review,
        )
    except ValidationError as exc:
        raise Misuse(f"invalid request: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") \
            from None
    request_id, outcome = sent.request.request_id, sent.outcome
    payload: dict[str, str | None] = {
        "request_id": request_id, "probe_id": probe_id_for(request_id),
        "outcome": "sent" if args.no_wait else "timeout", "reason": None, "detail": None}
    if outcome is None and args.no_wait:
        emit(args, payload, f"sent request {request_id} as probe {payload['probe_id']} "
                            "(not waiting for its outcome)")
        return 0
    if outcome is None:
        if args.json:
            emit(args, payload, "")
        sys.stderr.write(f"frs: no outcome for request {request_id} within {args.wait:g}s: "
                         f"is the intake running? `frs timeline {request_id}` shows how far "
                         "it got\n")
        return 1
    payload["probe_id"] = outcome.probe_id
    if isinstance(outcome, ProbeRejected):
        payload.update(outcome="rejected", reason=outcome.reason.value, detail=outcome.detail)
        emit(args, payload, f"rejected request {request_id}: {outcome.reason.value} "
                            f"({outcome.detail})")
        return 1
    payload["outcome"] = "submitted"
    emit(args, payload, f"submitted request {request_id} as probe {outcome.probe_id}")
    return 0


# --- timeline -------------------------------------------------------------------------


def _timeline(
    records: Sequence[Any], probe_id: str, request_id: str | None
) -> list[dict[str, Any]]:
    out = []
    for raw, decoded in records:
        if not isinstance(decoded, Envelope):
            continue
        if decoded.subject not in {probe_id, request_id}:
            continue
        out.append({"time": decoded.time.isoformat(), "type": decoded.type, "topic": raw.topic,
                    "partition": raw.partition, "offset": raw.offset, "id": decoded.id,
                    "causationid": decoded.causation_id, "source": decoded.source})
    return sorted(out, key=lambda e: e["time"])


async def cmd_timeline(args: argparse.Namespace, settings: CliSettings) -> int:
    probe_id = args.probe if args.probe.startswith("prb-") else probe_id_for(args.probe)
    request_id = None if args.probe.startswith("prb-") else args.probe
    topics = [t.name for t in AUDITED_TOPICS if not t.name.startswith("frs.registry.")]
    deadline = asyncio.get_running_loop().time() + args.wait
    while True:
        events = _timeline(await read_topic(settings.kafka_bootstrap, topics), probe_id,
                           request_id)
        if not args.until or any(e["type"] == args.until for e in events):
            break
        if asyncio.get_running_loop().time() > deadline:
            sys.stderr.write(f"frs: {args.until} not seen for {probe_id} within {args.wait}s\n")
            emit(args, events, "\n".join(_line(e) for e in events))
            return 1
        await asyncio.sleep(0.5)
    emit(args, events, "\n".join(_line(e) for e in events) or f"no events for {probe_id}")
    return 0


def _line(e: dict[str, Any]) -> str:
    return (f"{e['time']}  {e['type']:<34} {e['topic']}[{e['partition']}]@{e['offset']}"
            f"  from {e['source']}")


# --- registry -------------------------------------------------------------------------

_REGISTRY_MODELS: dict[str, type[Event]] = {
    "case": CaseRecord, "agent": AgentRecord, "provider": ProviderRecord,
}


async def cmd_registry_put(args: argparse.Namespace, settings: CliSettings) -> int:
    model = _REGISTRY_MODELS[args.kind]
    text = Path(args.file).read_text() if args.file else args.json_entry
    if not text:
        raise Misuse("give the entry with --file FILE or --entry JSON")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Misuse(f"entry is not JSON: {exc.msg} at line {exc.lineno}") from None
    now = datetime.now(UTC).isoformat()
    try:
        records = [model.model_validate({"updated_at": now, **e})
                   for e in (entries if isinstance(entries, list) else [entries])]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise Misuse(f"invalid {args.kind} entry: {'.'.join(map(str, err['loc']))}: "
                     f"{err['msg']}") from None
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish(records)
    payload = [r.model_dump(mode="json") for r in records]
    emit(args, payload, f"published {len(records)} {args.kind} entr"
                         f"{'y' if len(records) == 1 else 'ies'}")
    return 0


async def cmd_registry_demo(args: argparse.Namespace, settings: CliSettings) -> int:
    """Seed one open case, one trained agent and one active provider for the demo, and
    trust this host's policy gate's public key when it is there (the gate makes it at its
    first start): the operator's enrollment, as `frs registry trust-key` does it."""
    from services.cli.policy import local_policy_public_key, trust_record

    records = demo_registry("fed-ngi", "Federal 1:N gallery (simulated)", args.endpoint)
    key_file = local_policy_public_key(settings)
    key_id = None
    if key_file.is_file():
        trusted = trust_record(key_file)
        records.append(trusted)
        key_id = trusted.key_id
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish(records)
    note = (f", trusted policy key {key_id}" if key_id else
            f"; no policy key at {key_file} to trust: start the intake, then run "
            "`frs registry trust-key`")
    emit(args, {"published": len(records), "trusted_key": key_id},
         f"published {len(records)} demo registry entries{note}")
    return 0


# --- parser ---------------------------------------------------------------------------

def register(commands: Any) -> None:
    """topics, submit, timeline and registry put/demo."""
    topics = commands.add_parser("topics", help="manage the catalog's Kafka topics")
    topics_cmds = topics.add_subparsers(dest="topics_command", required=True)
    create = subcommand(topics_cmds, "create", "create or check every catalog topic (idempotent)",
                  "frs topics create --json", cmd_topics_create)
    create.add_argument("--replication", type=int, default=1, help="replication factor")
    subcommand(topics_cmds, "check", "compare every catalog topic with the broker (exit 1 "
               "on a missing topic or drifted settings)", "frs topics check --json",
               cmd_topics_check)

    submit = subcommand(commands, "submit", "encrypt a probe photo to the intake and submit it",
                  "frs submit --image face.jpg --case CASE-1 --agent agent-7 "
                  "--purpose human_trafficking --roi ROI-1 --source surveillance --nexus VA",
                  cmd_submit)
    submit.add_argument("--image", required=True, help="JPEG or PNG file")
    submit.add_argument("--case", required=True)
    submit.add_argument("--agent", required=True)
    submit.add_argument("--purpose", required=True, choices=[p.value for p in Purpose])
    submit.add_argument("--roi", action="append", default=[], help="ROI reference (repeat)")
    submit.add_argument("--source", required=True, choices=[s.value for s in ImageSource])
    submit.add_argument("--nexus", action="append", default=[], help="state code (repeat)")
    submit.add_argument("--exigent", action="store_true")
    submit.add_argument("--justification", default=None, help="required with --exigent")
    submit.add_argument("--review", action="store_true", help="require examiner review")
    submit.add_argument("--not-unedited", action="store_true",
                        help="do not attest that the image is an unedited photo")
    submit.add_argument("--request-id", default=None,
                        help="idempotency key, bound to the request's content: the same id "
                             "with other content is rejected (default: new)")
    submit.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="wait this long for the intake's outcome (default 60); exit 1 "
                             "on a rejection (its reason printed) or when none comes")
    submit.add_argument("--no-wait", action="store_true",
                        help="publish and exit 0 without waiting for the outcome")
    submit.add_argument("--intake-public-key",
                        default=os.environ.get("FRS_INTAKE_PUBLIC_KEY_FILE",
                                               ".state/keys/intake.key.pub.pem"),
                        help="the intake's public key (default $FRS_INTAKE_PUBLIC_KEY_FILE, "
                             "set by the client profiles)")

    timeline = subcommand(commands, "timeline", "print a probe's events in order",
                    "frs timeline prb-... --until frs.candidates.received.v1 --wait 30",
                    cmd_timeline)
    timeline.add_argument("probe", help="probe id (prb-...) or request id")
    timeline.add_argument("--until", default=None, help="wait until this event type appears")
    timeline.add_argument("--wait", type=float, default=30.0, help="seconds to wait")

    registry_cmds = group(commands, "registry", "publish registry entries")
    put = subcommand(registry_cmds, "put", "publish case, agent or provider entries",
               "frs registry put case --entry '{\"case_id\":\"C-1\",\"status\":\"open\","
               "\"offense_category\":\"financial_fraud\",\"roi_refs\":[\"ROI-1\"]}'",
               cmd_registry_put)
    put.add_argument("kind", choices=sorted(_REGISTRY_MODELS))
    put.add_argument("--entry", dest="json_entry", default=None, help="JSON object or list")
    put.add_argument("--file", default=None, help="file with a JSON object or list")
    demo = subcommand(registry_cmds, "demo", "seed a demo case, agents and provider",
                "frs registry demo --endpoint https://127.0.0.1:8443/search", cmd_registry_demo)
    demo.add_argument("--endpoint", default="https://127.0.0.1:8443/search",
                      help="the demo provider's HTTPS search URL (the vendor simulator)")

