"""The Cedar policy engine: loads the policy set and schema, evaluates one request per
(probe, candidate provider) with cedarpy, and names every denial by its rule's ``@id``.

Pure: no Kafka, no clock. Inputs are a ``DecisionInputs`` snapshot (probe statements,
registry entries, decision time), so a decision can be replayed from its event."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cedarpy

from schemas.events import (
    AgentRecord,
    CaseRecord,
    DecisionInputs,
    ProviderRecord,
    RuleDenial,
)

POLICY_DIR = Path(__file__).resolve().parent
POLICY_FILE = "policies.cedar"
SCHEMA_FILE = "frs.cedarschema"
ACTION = {"type": "Action", "id": "search"}
# Any evaluation error fails closed: Cedar skips an erroring `forbid`, so an error
# must never let a search through.
EVAL_ERROR_RULE = "POLICY-ERROR"
EVAL_ERROR_MESSAGE = "The policy could not be evaluated for this provider; denied to be safe."


class PolicyLoadError(Exception):
    """The policy files are missing, do not parse, or do not type-check."""


@dataclass(frozen=True)
class Rule:
    rule_id: str
    effect: str
    message: str
    bypassable: bool


@dataclass(frozen=True)
class ProviderDecision:
    provider_id: str
    allowed: bool
    denials: tuple[RuleDenial, ...]


def policy_digest(policy_dir: Path) -> str:
    """SHA-256 over the policy and schema files: (name, length, bytes) of each, in a
    fixed order, so no two different file sets share a digest."""
    h = hashlib.sha256()
    for name in (POLICY_FILE, SCHEMA_FILE):
        data = (policy_dir / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def validate(policies: str, schema: str) -> list[str]:
    """Type-check the policies against the schema; returns the errors (empty: valid)."""
    try:
        result = cedarpy.validate_policies(policies, schema)
    except ValueError as exc:  # the text does not even parse
        return [str(exc)]
    ids: dict[str, str] = result.id_annotations_by_policy_id
    return [f"{ids.get(e.policy_id, e.policy_id)}: {e.error}" if e.policy_id else e.error
            for e in result.errors]


def _rules(policies: str) -> dict[str, Rule]:
    """Rules by Cedar's generated policy id (policy0, ...), with their annotations."""
    est = json.loads(cedarpy.policies_to_json_str(policies))
    rules: dict[str, Rule] = {}
    for pid, policy in est["staticPolicies"].items():
        notes: dict[str, str] = policy.get("annotations", {})
        rule_id = notes.get("id")
        if not rule_id:
            raise PolicyLoadError(f"policy {pid} has no @id naming its requirement")
        rules[pid] = Rule(rule_id=rule_id, effect=policy["effect"],
                          message=notes.get("message", rule_id),
                          bypassable=notes.get("bypassable") == "exigent")
    seen = [r.rule_id for r in rules.values()]
    duplicates = sorted({r for r in seen if seen.count(r) > 1})
    if duplicates:
        raise PolicyLoadError(f"duplicate @id: {', '.join(duplicates)}")
    return rules


def _dt(value: datetime) -> dict[str, Any]:
    text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Cedar datetimes take milliseconds at most.
    return {"__extn": {"fn": "datetime", "arg": text[:-4] + "Z"}}


def _agent_entity(agent_id: str, agent: AgentRecord | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"role": agent.role if agent else "unknown"}
    if agent is not None and agent.training_valid_until is not None:
        attrs["training_valid_until"] = _dt(agent.training_valid_until)
    return {"uid": {"type": "Agent", "id": agent_id}, "attrs": attrs, "parents": []}


def _case_entity(case_id: str, case: CaseRecord | None) -> dict[str, Any]:
    attrs = {"status": case.status if case else "unknown",
             "roi_refs": sorted(case.roi_refs) if case else []}
    return {"uid": {"type": "Case", "id": case_id}, "attrs": attrs, "parents": []}


def _provider_entity(p: ProviderRecord) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "kind": p.kind.value, "status": p.status, "jurisdictions": sorted(p.jurisdictions),
        "allowed_purposes": sorted(x.value for x in p.allowed_purposes),
    }
    if p.attestation_valid_until is not None:
        attrs["attestation_valid_until"] = _dt(p.attestation_valid_until)
    return {"uid": {"type": "Provider", "id": p.provider_id}, "attrs": attrs, "parents": []}


def context_for(inputs: DecisionInputs) -> dict[str, Any]:
    req = inputs.request
    context: dict[str, Any] = {
        "now": _dt(inputs.evaluated_at),
        "case": {"__entity": {"type": "Case", "id": req.case_id}},
        "purpose": req.purpose.value,
        "roi_refs": sorted(set(req.roi_refs)),
        "nexus": sorted(set(req.nexus)),
        "unedited_attestation": req.unedited_attestation,
        "exigent": req.exigent,
        "exigent_justified": bool(req.exigent_justification
                                  and req.exigent_justification.strip()),
        "exigent_bypass": sorted(set(req.exigent_bypass)),
    }
    if req.quality_passed is not None:
        context["quality_passed"] = req.quality_passed
    return context


class PolicyEngine:
    """A loaded, validated policy set. Immutable: a changed file needs a new engine."""

    def __init__(self, policies: str, schema: str, digest: str) -> None:
        errors = validate(policies, schema)
        if errors:
            raise PolicyLoadError("policies do not type-check: " + "; ".join(errors))
        self.policies_text = policies
        self.schema_text = schema
        self.digest = digest
        self.rules = _rules(policies)
        self._policy_set = cedarpy.PolicySet.from_str(policies)
        self._schema = cedarpy.Schema.from_str(schema)

    @classmethod
    def load(cls, policy_dir: Path = POLICY_DIR) -> PolicyEngine:
        try:
            policies = (policy_dir / POLICY_FILE).read_text()
            schema = (policy_dir / SCHEMA_FILE).read_text()
        except OSError as exc:
            raise PolicyLoadError(f"cannot read policy files in {policy_dir}: "
                                  f"{type(exc).__name__}") from None
        return cls(policies, schema, policy_digest(policy_dir))

    @property
    def bypassable(self) -> frozenset[str]:
        return frozenset(r.rule_id for r in self.rules.values() if r.bypassable)

    def message(self, rule_id: str) -> str:
        for rule in self.rules.values():
            if rule.rule_id == rule_id:
                return rule.message
        return EVAL_ERROR_MESSAGE if rule_id == EVAL_ERROR_RULE else rule_id

    def bypassed_rules(self, inputs: DecisionInputs) -> list[str]:
        """The gates the emergency path waives for this request: named, bypassable, and
        only with a justification. A named gate that is not bypassable still holds."""
        context = context_for(inputs)
        if not (context["exigent"] and context["exigent_justified"]):
            return []
        return sorted(self.bypassable & set(inputs.request.exigent_bypass))

    def decide(self, inputs: DecisionInputs) -> list[ProviderDecision]:
        """One decision per provider in ``inputs.providers``, in that order."""
        if not inputs.providers:
            return []
        req = inputs.request
        entities = [_agent_entity(req.agent_id, inputs.agent),
                    _case_entity(req.case_id, inputs.case),
                    *(_provider_entity(p) for p in inputs.providers)]
        context = context_for(inputs)
        requests = [{"principal": {"type": "Agent", "id": req.agent_id}, "action": ACTION,
                     "resource": {"type": "Provider", "id": p.provider_id},
                     "context": context} for p in inputs.providers]
        try:
            results = cedarpy.is_authorized_batch(requests, self._policy_set, entities,
                                                  schema=self._schema)
        except ValueError:
            # Inputs the schema rejects as a whole: every provider denied, fail closed.
            denial = (RuleDenial(rule_id=EVAL_ERROR_RULE, message=EVAL_ERROR_MESSAGE),)
            return [ProviderDecision(p.provider_id, False, denial) for p in inputs.providers]
        return [self._decision(p.provider_id, r) for p, r in zip(inputs.providers, results,
                                                                   strict=True)]

    def _decision(self, provider_id: str, result: cedarpy.AuthzResult) -> ProviderDecision:
        denials: dict[str, RuleDenial] = {}
        if not result.allowed:
            for pid in result.diagnostics.reasons:
                rule = self.rules.get(pid)
                if rule is not None and rule.effect == "forbid":
                    denials[rule.rule_id] = RuleDenial(rule_id=rule.rule_id,
                                                       message=rule.message)
        if result.diagnostics.errors or (not result.allowed and not denials):
            # An erroring rule or a deny without a named reason: fail closed, say so.
            denials[EVAL_ERROR_RULE] = RuleDenial(rule_id=EVAL_ERROR_RULE,
                                                  message=EVAL_ERROR_MESSAGE)
        ordered = tuple(sorted(denials.values(), key=lambda d: d.rule_id))
        return ProviderDecision(provider_id=provider_id, allowed=not ordered, denials=ordered)
