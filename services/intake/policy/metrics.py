"""Policy metrics (``frs_policy_*``). Labels are bounded: outcomes and rule ids."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge


@dataclass(frozen=True)
class PolicyMetrics:
    decisions: Counter
    denials: Counter
    exigent: Counter
    reviews_pending: Gauge
    reviews_overdue: Counter


@cache
def policy_metrics() -> PolicyMetrics:
    return PolicyMetrics(
        decisions=Counter("frs_policy_decisions_total", "Policy decisions, by outcome.",
                          ["outcome"]),
        denials=Counter("frs_policy_rule_denials_total",
                        "Provider denials, by the rule id that fired.", ["rule"]),
        exigent=Counter("frs_policy_exigent_clearances_total",
                        "Clearances on the exigent (emergency) path."),
        reviews_pending=Gauge("frs_policy_exigent_reviews_pending",
                              "Exigent clearances still waiting for a supervisor review."),
        reviews_overdue=Counter("frs_policy_exigent_reviews_overdue_total",
                                "Exigent clearances whose supervisor review is overdue."),
    )
