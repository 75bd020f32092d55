"""Every policy rule, allowed and denied, evaluated through cedarpy with the shipped
Cedar files. Each row: the inputs and the exact set of rule ids expected to deny."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from schemas.events import DecisionInputs
from schemas.types import Purpose
from services.intake.policy.engine import EVAL_ERROR_RULE, PolicyEngine
from tests.unit.policy_fixtures import (
    PAST,
    agent,
    case,
    inputs,
    provider,
    request,
    state_provider,
)


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load()


@dataclass(frozen=True)
class Row:
    name: str
    inputs: DecisionInputs
    denied_by: frozenset[str]  # empty: allowed


def row(name: str, data: DecisionInputs, *denied_by: str) -> Row:
    return Row(name, data, frozenset(denied_by))


EXIGENT = {"exigent": True, "exigent_justification": "child in imminent danger"}

ROWS = [
    # baseline
    row("all requirements met", inputs()),
    # REQ-CASE
    row("case open", inputs(case_=case(status="open"))),
    row("case closed", inputs(case_=case(status="closed")), "REQ-CASE"),
    # An unknown case also has no ROIs, so last-resort cannot hold either.
    row("case unknown", inputs(case_=None), "REQ-CASE", "REQ-LAST-RESORT"),
    # REQ-LAST-RESORT
    row("cites one ROI of the case", inputs(request(roi_refs=["ROI-2"]))),
    row("cites no ROI", inputs(request(roi_refs=[])), "REQ-LAST-RESORT"),
    row("cites only ROIs of another case", inputs(request(roi_refs=["ROI-99"])),
        "REQ-LAST-RESORT"),
    row("case has no ROI on file", inputs(case_=case(roi_refs=[])), "REQ-LAST-RESORT"),
    # REQ-PURPOSE
    row("purpose allowed by provider",
        inputs(providers=[provider(allowed_purposes=[Purpose.HUMAN_TRAFFICKING])])),
    row("purpose not accepted by provider",
        inputs(providers=[provider(allowed_purposes=[Purpose.FINANCIAL_FRAUD])]),
        "REQ-PURPOSE"),
    row("provider accepts no purpose", inputs(providers=[provider(allowed_purposes=[])]),
        "REQ-PURPOSE"),
    # REQ-NEXUS
    row("state_local with matching nexus",
        inputs(request(nexus=["MD", "VA"]), providers=[state_provider()])),
    row("state_local without nexus", inputs(providers=[state_provider()]), "REQ-NEXUS"),
    row("state_local with other nexus", inputs(request(nexus=["CA"]),
                                               providers=[state_provider()]), "REQ-NEXUS"),
    row("fusion_center with matching nexus",
        inputs(request(nexus=["TX"]),
               providers=[state_provider(kind="fusion_center", jurisdictions=["TX", "OK"])])),
    row("fusion_center without nexus",
        inputs(providers=[state_provider(kind="fusion_center", jurisdictions=["TX"])]),
        "REQ-NEXUS"),
    row("federal needs no nexus", inputs(request(nexus=[]), providers=[provider()])),
    row("commercial needs no nexus",
        inputs(providers=[provider(kind="commercial", transport="rekognition")])),
    # REQ-PROVIDER
    row("provider active with current attestation", inputs(providers=[provider()])),
    row("provider suspended", inputs(providers=[provider(status="suspended")]),
        "REQ-PROVIDER"),
    row("attestation expired", inputs(providers=[provider(attestation_valid_until=PAST)]),
        "REQ-PROVIDER"),
    row("no attestation on file",
        inputs(providers=[provider(attestation_valid_until=None)]), "REQ-PROVIDER"),
    # REQ-TRAINED
    row("training current", inputs(agent_=agent())),
    row("training expired", inputs(agent_=agent(training_valid_until=PAST)), "REQ-TRAINED"),
    row("no training recorded", inputs(agent_=agent(training_valid_until=None)),
        "REQ-TRAINED"),
    row("agent unknown", inputs(agent_=None), "REQ-TRAINED"),
    # REQ-UNEDITED
    row("attested unedited", inputs(request(unedited_attestation=True))),
    row("not attested unedited", inputs(request(unedited_attestation=False)), "REQ-UNEDITED"),
    # REQ-QUALITY
    row("quality passed", inputs(request(quality_passed=True))),
    row("no quality report yet", inputs(request(quality_passed=None))),
    row("quality failed", inputs(request(quality_passed=False)), "REQ-QUALITY"),
    # REQ-EXIGENT
    row("exigent with justification", inputs(request(**EXIGENT))),
    row("exigent without justification", inputs(request(exigent=True)), "REQ-EXIGENT"),
    row("exigent with blank justification",
        inputs(request(exigent=True, exigent_justification="   ")), "REQ-EXIGENT"),
    row("exigent with justification bypasses last-resort",
        inputs(request(roi_refs=[], exigent_bypass=["REQ-LAST-RESORT"], **EXIGENT))),
    row("exigent with justification bypasses nexus",
        inputs(request(exigent_bypass=["REQ-NEXUS"], **EXIGENT),
               providers=[state_provider()])),
    row("exigent without justification bypasses nothing",
        inputs(request(roi_refs=[], exigent=True, exigent_bypass=["REQ-LAST-RESORT"])),
        "REQ-EXIGENT", "REQ-LAST-RESORT"),
    row("exigent bypass only waives the gates it names",
        inputs(request(roi_refs=[], exigent_bypass=["REQ-NEXUS"], **EXIGENT)),
        "REQ-LAST-RESORT"),
    row("bypass named without exigent is ignored",
        inputs(request(roi_refs=[], exigent_bypass=["REQ-LAST-RESORT"],
                       exigent_justification="x")), "REQ-LAST-RESORT"),
    row("exigent cannot bypass REQ-PROVIDER",
        inputs(request(exigent_bypass=["REQ-PROVIDER"], **EXIGENT),
               providers=[provider(status="suspended")]), "REQ-PROVIDER"),
    row("exigent cannot bypass REQ-UNEDITED",
        inputs(request(unedited_attestation=False, exigent_bypass=["REQ-UNEDITED"],
                       **EXIGENT)), "REQ-UNEDITED"),
    row("exigent cannot bypass REQ-TRAINED or REQ-CASE",
        inputs(request(exigent_bypass=["REQ-TRAINED", "REQ-CASE"], **EXIGENT),
               case_=case(status="closed"), agent_=agent(training_valid_until=PAST)),
        "REQ-CASE", "REQ-TRAINED"),
    # combinations: every failing rule is listed, not just the first
    row("closed case, no ROI, expired training, state_local without nexus",
        inputs(request(roi_refs=[]), case_=case(status="closed"),
               agent_=agent(training_valid_until=PAST), providers=[state_provider()]),
        "REQ-CASE", "REQ-LAST-RESORT", "REQ-TRAINED", "REQ-NEXUS"),
    row("suspended state_local with matching nexus",
        inputs(request(nexus=["VA"]), providers=[state_provider(status="suspended")]),
        "REQ-PROVIDER"),
    row("everything wrong",
        inputs(request(roi_refs=[], unedited_attestation=False, quality_passed=False,
                       exigent=True), case_=None, agent_=None,
               providers=[state_provider(status="suspended", allowed_purposes=[],
                                         attestation_valid_until=None)]),
        "REQ-CASE", "REQ-LAST-RESORT", "REQ-PURPOSE", "REQ-NEXUS", "REQ-PROVIDER",
        "REQ-TRAINED", "REQ-UNEDITED", "REQ-QUALITY", "REQ-EXIGENT"),
]


@pytest.mark.parametrize("case_row", ROWS, ids=[r.name for r in ROWS])
def test_rule(engine: PolicyEngine, case_row: Row) -> None:
    [decision] = engine.decide(case_row.inputs)
    fired = {d.rule_id for d in decision.denials}
    assert fired == case_row.denied_by
    assert decision.allowed is (not case_row.denied_by)
    assert EVAL_ERROR_RULE not in fired
    for denial in decision.denials:
        assert denial.message == engine.message(denial.rule_id)
        assert denial.message.endswith(".") and len(denial.message) > 20


def test_every_rule_has_an_allow_and_a_deny_row(engine: PolicyEngine) -> None:
    rule_ids = {r.rule_id for r in engine.rules.values() if r.effect == "forbid"}
    assert rule_ids == {"REQ-CASE", "REQ-LAST-RESORT", "REQ-PURPOSE", "REQ-NEXUS",
                        "REQ-PROVIDER", "REQ-TRAINED", "REQ-UNEDITED", "REQ-QUALITY",
                        "REQ-EXIGENT"}
    denied = set().union(*(r.denied_by for r in ROWS))
    assert denied == rule_ids
    # An allowed row exists for every rule by construction: each rule's section starts
    # with one; the baseline must be allowed for that to mean anything.
    assert any(not r.denied_by for r in ROWS)


def test_decides_per_provider(engine: PolicyEngine) -> None:
    decisions = engine.decide(inputs(request(nexus=["VA"]), providers=[
        provider(), state_provider(), state_provider(provider_id="md-state",
                                                     jurisdictions=["MD"]),
        provider(provider_id="vendor", kind="commercial", status="suspended")]))
    assert [(d.provider_id, d.allowed, [x.rule_id for x in d.denials]) for d in decisions] == [
        ("fed-ngi", True, []), ("va-state", True, []), ("md-state", False, ["REQ-NEXUS"]),
        ("vendor", False, ["REQ-PROVIDER"])]


def test_bypassable_rules_are_declared_in_the_policy(engine: PolicyEngine) -> None:
    assert engine.bypassable == {"REQ-LAST-RESORT", "REQ-NEXUS"}
    req = request(exigent_bypass=["REQ-NEXUS", "REQ-PROVIDER"], **EXIGENT)
    assert engine.bypassed_rules(inputs(req)) == ["REQ-NEXUS"]
    assert engine.bypassed_rules(inputs(request(exigent=True,
                                                exigent_bypass=["REQ-NEXUS"]))) == []


def test_no_providers_no_decisions(engine: PolicyEngine) -> None:
    assert engine.decide(inputs(providers=[])) == []


def test_inputs_the_schema_rejects_fail_closed() -> None:
    # A permit-only set over a schema whose Provider.status is a Long: the registry's
    # string no longer conforms, so evaluation errors, and the search is denied.
    from services.intake.policy.engine import POLICY_DIR

    schema = (POLICY_DIR / "frs.cedarschema").read_text().replace(
        "  status: String,                    // \"active\"", "  status: Long, //")
    permit_all = '@id("PERMIT-SEARCH")\npermit (principal, action == Action::"search", resource);\n'
    [decision] = PolicyEngine(permit_all, schema, "0" * 64).decide(inputs())
    assert not decision.allowed
    assert [d.rule_id for d in decision.denials] == [EVAL_ERROR_RULE]
