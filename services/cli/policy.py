"""``frs policy ...``, ``frs exigent ...`` and ``frs registry suspend/activate``.

Exit codes: 0 success, 1 a finding (policies do not validate, a replay differs, an
exigent review pending), 2 misuse (unknown provider or probe, bad arguments)."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.catalog import (
    POLICY_DECISIONS,
    REGISTRY_AGENTS,
    REGISTRY_CASES,
    REGISTRY_PROVIDERS,
)
from schemas.envelope import Envelope
from schemas.events import (
    AgentRecord,
    CaseRecord,
    ExigentReviewOverdue,
    PolicyCleared,
    PolicyDenied,
    ProviderRecord,
    SupervisorReviewRecorded,
)
from schemas.types import probe_id_for
from services.cli.common import CliSettings, Misuse, emit, group, subcommand
from services.intake.policy.engine import (
    POLICY_DIR,
    POLICY_FILE,
    SCHEMA_FILE,
    PolicyEngine,
    PolicyLoadError,
    policy_digest,
    validate,
)
from services.intake.policy.handlers import (
    RegistryRecord,
    check_inputs_against_registries,
    outcome,
    replay,
)
from services.kit.publisher import Publisher
from services.kit.reader import read_topic

Decision = PolicyCleared | PolicyDenied


def _probe_id(text: str) -> str:
    return text if text.startswith("prb-") else probe_id_for(text)


# --- registry suspend / activate ------------------------------------------------------


async def _latest_provider(bootstrap: str, provider_id: str) -> ProviderRecord | None:
    latest: ProviderRecord | None = None
    for _raw, decoded in await read_topic(bootstrap, [REGISTRY_PROVIDERS.name]):
        if (isinstance(decoded, Envelope) and isinstance(decoded.event, ProviderRecord)
                and decoded.event.provider_id == provider_id):
            latest = decoded.event
    return latest


async def _set_status(args: argparse.Namespace, settings: CliSettings, status: str) -> int:
    current = await _latest_provider(settings.kafka_bootstrap, args.provider)
    if current is None:
        raise Misuse(f"provider {args.provider} is not in the registry: "
                     "add it with `frs registry put provider`")
    record = ProviderRecord.model_validate(
        {**current.model_dump(), "status": status, "updated_at": datetime.now(UTC)})
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish([record])
    emit(args, record.model_dump(mode="json"),
          f"provider {record.provider_id} is now {status} (was {current.status})")
    return 0


async def cmd_registry_suspend(args: argparse.Namespace, settings: CliSettings) -> int:
    return await _set_status(args, settings, "suspended")


async def cmd_registry_activate(args: argparse.Namespace, settings: CliSettings) -> int:
    return await _set_status(args, settings, "active")


# --- policy validate / explain -------------------------------------------------------


async def cmd_policy_validate(args: argparse.Namespace, _settings: CliSettings) -> int:
    policy_dir = Path(args.dir)
    try:
        policies = (policy_dir / POLICY_FILE).read_text()
        schema = (policy_dir / SCHEMA_FILE).read_text()
    except OSError:
        raise Misuse(f"no {POLICY_FILE} and {SCHEMA_FILE} in {policy_dir}: pass --dir") \
            from None
    errors = validate(policies, schema)
    rules: list[str] = []
    if not errors:
        try:
            rules = sorted(r.rule_id for r in PolicyEngine.load(policy_dir).rules.values())
        except PolicyLoadError as exc:
            errors = [str(exc)]
    payload = {"valid": not errors, "errors": errors, "digest": policy_digest(policy_dir),
               "rules": rules}
    human = (f"valid: {len(rules)} rules, digest {payload['digest']}" if not errors
             else "\n".join(f"error: {e}" for e in errors))
    emit(args, payload, human)
    return 0 if not errors else 1


async def _decisions(bootstrap: str, probe_id: str) -> list[Decision]:
    out: list[Decision] = []
    for _raw, decoded in await read_topic(bootstrap, [POLICY_DECISIONS.name]):
        if (isinstance(decoded, Envelope)
                and isinstance(decoded.event, PolicyCleared | PolicyDenied)
                and decoded.event.probe_id == probe_id):
            out.append(decoded.event)
    return out


def _explain(decision: Decision) -> dict[str, Any]:
    providers: list[dict[str, Any]] = []
    if isinstance(decision, PolicyCleared):
        providers += [{"provider_id": c.provider_id, "decision": "cleared",
                       "fields": [str(f) for f in c.fields], "rules": []}
                      for c in decision.cleared]
    providers += [{"provider_id": d.provider_id, "decision": "denied",
                   "rules": [{"rule_id": r.rule_id, "message": r.message} for r in d.rules]}
                  for d in decision.denied]
    return {
        "probe_id": decision.probe_id, "case_id": decision.case_id,
        "outcome": "cleared" if isinstance(decision, PolicyCleared) else "denied",
        "decided_at": decision.decided_at.isoformat(),
        "policy_digest": decision.policy_digest,
        "registry_versions": decision.registry_versions.model_dump(),
        "exigent": isinstance(decision, PolicyCleared) and decision.exigent,
        "bypassed_rules": decision.bypassed_rules if isinstance(decision, PolicyCleared)
        else [],
        "providers": sorted(providers, key=lambda p: str(p["provider_id"])),
    }


def _human(report: dict[str, Any]) -> str:
    lines = [f"{report['probe_id']} ({report['case_id']}): {report['outcome']} at "
             f"{report['decided_at']}, policy {report['policy_digest'][:12]}, registries "
             + ", ".join(f"{k}@{v}" for k, v in report["registry_versions"].items())]
    if report["exigent"]:
        lines.append(f"  EXIGENT, bypassed: {', '.join(report['bypassed_rules']) or 'none'}")
    for p in report["providers"]:
        if p["decision"] == "cleared":
            lines.append(f"  {p['provider_id']}: cleared, fields {', '.join(p['fields'])}")
        else:
            lines.append(f"  {p['provider_id']}: denied")
            lines += [f"    {r['rule_id']}: {r['message']}" for r in p["rules"]]
    if "replay" in report:
        r = report["replay"]
        lines.append(f"  replay with policy {r['policy_digest'][:12]}: "
                     + ("same result" if r["same"] else f"DIFFERENT ({r['outcome']})")
                     + ("" if r["digest_matches"] else "; the policy files have changed")
                     + ("" if r.get("registries_consistent", True) else
                        "; the recorded inputs DISAGREE with the registry topics"))
    return "\n".join(lines)


async def cmd_policy_explain(args: argparse.Namespace, settings: CliSettings) -> int:
    probe_id = _probe_id(args.probe)
    deadline = asyncio.get_running_loop().time() + args.wait
    while not (decisions := await _decisions(settings.kafka_bootstrap, probe_id)):
        if asyncio.get_running_loop().time() >= deadline:
            raise Misuse(f"no policy decision for {probe_id} on {POLICY_DECISIONS.name}: "
                         "check the probe id or wait longer with --wait")
        await asyncio.sleep(0.5)
    engine: PolicyEngine | None = None
    if args.replay:
        try:
            engine = PolicyEngine.load(Path(args.dir))
        except PolicyLoadError as exc:
            raise Misuse(f"{exc}: fix the policy files or pass --dir") from None
    history: list[tuple[int, RegistryRecord]] = []
    if engine is not None:
        topics = [t.name for t in (REGISTRY_CASES, REGISTRY_AGENTS, REGISTRY_PROVIDERS)]
        history = [(raw.offset, d.event) for raw, d in
                   await read_topic(settings.kafka_bootstrap, topics)
                   if isinstance(d, Envelope)
                   and isinstance(d.event, CaseRecord | AgentRecord | ProviderRecord)]
    reports = []
    differs = False
    for decision in decisions:  # redeliveries can record a probe's decision twice
        report = _explain(decision)
        if engine is not None:
            if decision.inputs is None:
                report["replay"] = {"same": False, "outcome": "no inputs recorded",
                                    "policy_digest": engine.digest, "digest_matches": False}
                differs = True
            else:
                again = replay(engine, decision)
                same = outcome(again) == outcome(decision)
                # The snapshot must agree with the registry topics at the versions it names.
                registries = check_inputs_against_registries(
                    decision.inputs, decision.registry_versions, history)
                consistent = not ({"mismatch", "omitted"} & set(registries.values()))
                differs = differs or not same or not consistent
                report["replay"] = {"same": same, "outcome": outcome(again)["outcome"],
                                    "policy_digest": engine.digest,
                                    "digest_matches": engine.digest == decision.policy_digest,
                                    "registries_consistent": consistent,
                                    "registries": registries,
                                    "result": _explain(again)}
        reports.append(report)
    emit(args, reports, "\n".join(_human(r) for r in reports))
    return 1 if differs else 0


# --- exigent reviews -----------------------------------------------------------------


async def cmd_exigent_review(args: argparse.Namespace, settings: CliSettings) -> int:
    probe_id = _probe_id(args.probe)
    decisions = await _decisions(settings.kafka_bootstrap, probe_id)
    if not any(isinstance(d, PolicyCleared) and d.exigent for d in decisions):
        raise Misuse(f"{probe_id} has no exigent clearance to review: check the probe id")
    event = SupervisorReviewRecorded(probe_id=probe_id, supervisor_id=args.supervisor,
                                     approved=args.approve, notes=args.notes,
                                     reviewed_at=datetime.now(UTC))
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish([event])
    verdict = "approved" if args.approve else "rejected"
    emit(args, event.model_dump(mode="json"),
          f"recorded supervisor review of {probe_id} by {args.supervisor}: {verdict}")
    return 0


async def cmd_exigent_pending(args: argparse.Namespace, settings: CliSettings) -> int:
    """Derived from the decisions topic alone: exigent clearances without a review."""
    flagged: dict[str, dict[str, Any]] = {}
    reviewed: set[str] = set()
    for _raw, decoded in await read_topic(settings.kafka_bootstrap, [POLICY_DECISIONS.name]):
        if not isinstance(decoded, Envelope):
            continue
        e = decoded.event
        if isinstance(e, PolicyCleared) and e.exigent:
            flagged.setdefault(e.probe_id, {"probe_id": e.probe_id, "case_id": e.case_id,
                                            "decided_at": e.decided_at.isoformat(),
                                            "bypassed_rules": e.bypassed_rules,
                                            "overdue": False})
        elif isinstance(e, SupervisorReviewRecorded):
            reviewed.add(e.probe_id)
        elif isinstance(e, ExigentReviewOverdue) and e.probe_id in flagged:
            flagged[e.probe_id]["overdue"] = True
    pending = [v for k, v in sorted(flagged.items()) if k not in reviewed]
    emit(args, pending, "\n".join(
        f"{p['probe_id']} case {p['case_id']} cleared {p['decided_at']}"
        f"{' OVERDUE' if p['overdue'] else ''} bypassed: {', '.join(p['bypassed_rules']) or '-'}"
        for p in pending) or "no exigent clearance awaits review")
    return 1 if pending else 0


# --- registration --------------------------------------------------------------------


def register_registry(registry_cmds: Any) -> None:
    """Adds ``suspend`` and ``activate`` under ``frs registry``."""
    for name, func, verb in (("suspend", cmd_registry_suspend, "suspend"),
                             ("activate", cmd_registry_activate, "re-activate")):
        p = subcommand(registry_cmds, name,
                 f"{verb} a provider at once: publishes its updated registry entry",
                 f"frs registry {name} va-state --json", func)
        p.add_argument("provider", help="provider id")


def register(commands: Any) -> None:
    register_registry(group(commands, "registry", "publish registry entries"))
    policy = commands.add_parser("policy", help="validate and explain Cedar policy decisions")
    policy_cmds = policy.add_subparsers(dest="policy_command", required=True)
    v = subcommand(policy_cmds, "validate",
             "type-check the Cedar policies against the schema (exit 1 on errors)",
             "frs policy validate --json", cmd_policy_validate)
    v.add_argument("--dir", default=str(POLICY_DIR), help="directory of the policy files")
    e = subcommand(policy_cmds, "explain",
             "print each provider's decision for a probe with its rule ids; --replay "
             "re-evaluates it from its recorded inputs (exit 1 if the result differs)",
             "frs policy explain prb-... --replay", cmd_policy_explain)
    e.add_argument("probe", help="probe id (prb-...) or request id")
    e.add_argument("--replay", action="store_true", help="re-evaluate with the policy files")
    e.add_argument("--dir", default=str(POLICY_DIR), help="policy files to replay with")
    e.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a decision")

    exigent = commands.add_parser("exigent", help="supervisor review of exigent clearances")
    exigent_cmds = exigent.add_subparsers(dest="exigent_command", required=True)
    r = subcommand(exigent_cmds, "review", "record a supervisor's review of an exigent clearance",
             "frs exigent review prb-... --supervisor sup-1 --approve --notes 'justified'",
             cmd_exigent_review)
    r.add_argument("probe", help="probe id (prb-...) or request id")
    r.add_argument("--supervisor", required=True, help="the reviewing supervisor's agent id")
    verdict = r.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", dest="approve", action="store_true")
    verdict.add_argument("--reject", dest="approve", action="store_false")
    r.add_argument("--notes", default="", help="review notes")
    subcommand(exigent_cmds, "pending", "list exigent clearances still awaiting review (exit 1 "
         "if any)", "frs exigent pending --json", cmd_exigent_pending)
