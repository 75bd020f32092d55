"""``frs policy ...``, ``frs exigent ...`` and ``frs registry suspend/activate/trust-key``.

Exit codes: 0 success, 1 a finding (policies do not validate, a replay differs, an
exigent review pending), 2 misuse (unknown provider or probe, bad arguments)."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.catalog import (
    EXIGENT_REVIEWS,
    POLICY_DECISIONS,
    REGISTRY_AGENTS,
    REGISTRY_CASES,
    REGISTRY_PROVIDERS,
    REGISTRY_SUSPENSIONS,
)
from schemas.decisions import trusted_key
from schemas.envelope import Envelope
from schemas.events import (
    AgentRecord,
    CaseRecord,
    ExigentReviewOverdue,
    PolicyCleared,
    PolicyDenied,
    ProviderRecord,
    ProviderSuspensionRequested,
    SupervisorReviewRecorded,
    TrustedKey,
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
from services.intake.policy.settings import PolicySettings
from services.intake.policy.signing import load_public_key, public_key_path
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.registry import effective_provider

Decision = PolicyCleared | PolicyDenied


def _probe_id(text: str) -> str:
    return text if text.startswith("prb-") else probe_id_for(text)


# --- registry suspend / activate ------------------------------------------------------


async def _latest_provider(bootstrap: str, provider_id: str
                           ) -> tuple[ProviderRecord | None, str]:
    """The provider's latest entry, and its status as the services see it (a suspension
    from results applied)."""
    latest: ProviderRecord | None = None
    suspension: ProviderSuspensionRequested | None = None
    for raw, decoded in await read_topic(bootstrap, [REGISTRY_PROVIDERS.name,
                                                     REGISTRY_SUSPENSIONS.name]):
        event = decoded.event if isinstance(decoded, Envelope) else None
        if (raw.topic == REGISTRY_PROVIDERS.name and isinstance(event, ProviderRecord)
                and event.provider_id == provider_id):
            latest = event
        elif (raw.topic == REGISTRY_SUSPENSIONS.name
              and isinstance(event, ProviderSuspensionRequested)
              and event.provider_id == provider_id):
            suspension = event
    if latest is None:
        return None, ""
    return latest, effective_provider(latest, suspension).status


async def _set_status(args: argparse.Namespace, settings: CliSettings, status: str) -> int:
    current, was = await _latest_provider(settings.kafka_bootstrap, args.provider)
    if current is None:
        raise Misuse(f"provider {args.provider} is not in the registry: "
                     "add it with `frs registry put provider`")
    # A newer entry also lifts a suspension requested by results before it.
    record = ProviderRecord.model_validate(
        {**current.model_dump(), "status": status, "updated_at": datetime.now(UTC)})
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish([record])
    emit(args, record.model_dump(mode="json"),
          f"provider {record.provider_id} is now {status} (was {was})")
    return 0


def local_policy_public_key(settings: CliSettings) -> Path:
    """Where this host's policy gate writes its public key (FRS_POLICY_SIGNING_KEY_FILE,
    default <FRS_STATE_DIR>/keys/policy-decisions.pem, plus .pub)."""
    return public_key_path(PolicySettings().signing_key_path(settings.state_dir))


def trust_record(path: Path, status: str = "active") -> TrustedKey:
    """The trusted-keys entry for the Ed25519 public key in ``path``."""
    try:
        key = load_public_key(path)
    except (OSError, ValueError) as exc:
        raise Misuse(f"cannot use {path} as the policy gate's public key ({exc}): pass "
                     "--public-key with its .pub.pem file") from None
    return TrustedKey.model_validate({**trusted_key(key, status),
                                      "updated_at": datetime.now(UTC)})


async def cmd_registry_trust_key(args: argparse.Namespace, settings: CliSettings) -> int:
    path = Path(args.public_key) if args.public_key else local_policy_public_key(settings)
    record = trust_record(path, "revoked" if args.revoke else "active")
    async with Publisher(settings.kafka_bootstrap, source="/frs/cli") as publisher:
        await publisher.publish([record])
    emit(args, record.model_dump(mode="json"),
         f"key {record.key_id} ({path}) is now {record.status} for {record.purpose}")
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
    # Decisions are keyed by probe id: one partition holds all of a probe's.
    for _raw, decoded in await read_topic(bootstrap, [POLICY_DECISIONS.name],
                                          key=probe_id.encode()):
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
        kinds = {REGISTRY_CASES.name: CaseRecord, REGISTRY_AGENTS.name: AgentRecord,
                 REGISTRY_PROVIDERS.name: ProviderRecord,
                 REGISTRY_SUSPENSIONS.name: ProviderSuspensionRequested}
        for raw, decoded in await read_topic(settings.kafka_bootstrap, list(kinds)):
            event = decoded.event if isinstance(decoded, Envelope) else None
            # Only the type each topic carries counts, as in every service's registry view.
            if isinstance(event, RegistryRecord) and type(event) is kinds[raw.topic]:
                history.append((raw.offset, event))
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
    """Derived from the decisions and reviews topics: exigent clearances without a review."""
    flagged: dict[str, dict[str, Any]] = {}
    reviewed: set[str] = set()
    for _raw, decoded in await read_topic(settings.kafka_bootstrap,
                                          [POLICY_DECISIONS.name, EXIGENT_REVIEWS.name]):
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
    """Adds ``suspend``, ``activate`` and ``trust-key`` under ``frs registry``."""
    for name, func, verb in (("suspend", cmd_registry_suspend, "suspend"),
                             ("activate", cmd_registry_activate, "re-activate")):
        p = subcommand(registry_cmds, name,
                 f"{verb} a provider at once: publishes its updated registry entry",
                 f"frs registry {name} va-state --json", func)
        p.add_argument("provider", help="provider id")
    t = subcommand(registry_cmds, "trust-key",
                   "enroll (or --revoke) the policy gate's public key: dispatch sends, and "
                   "the audit accepts, only decisions signed by an enrolled key",
                   "frs registry trust-key --public-key .state/keys/policy-decisions.pub.pem",
                   cmd_registry_trust_key)
    t.add_argument("--public-key", default=None,
                   help="the gate's Ed25519 public key (PEM); default: this host's gate's, "
                        "beside FRS_POLICY_SIGNING_KEY_FILE")
    t.add_argument("--revoke", action="store_true", help="mark the key revoked instead")


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
