"""Generates dashboards/frs-broker.json (Grafana provisioned dashboard).

Run `python deploy/grafana/dashboard.py` after changing a panel; the test suite fails
when the committed JSON differs from what this produces."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "frs-broker.json"
DS = {"type": "prometheus", "uid": "frs-prometheus"}
SVC = "intake|policy|dispatch|results|audit"

# (row title, [(panel title, unit, [(expr, legend)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Flow", [
        ("Events consumed /s", "ops", [
            (f'sum by (__name__) (rate({{__name__=~"frs_({SVC})_events_in_total"}}[5m]))',
             "{{__name__}}")]),
        ("Events published /s", "ops", [
            (f'sum by (__name__) (rate({{__name__=~"frs_({SVC})_events_out_total"}}[5m]))',
             "{{__name__}}")]),
        ("Consumer lag (records)", "short", [
            (f'max by (service, topic) ({{__name__=~"frs_({SVC})_consumer_lag_messages"}})',
             "{{service}} {{topic}}")]),
        ("Dead-lettered /s", "ops", [
            (f'sum by (service, reason) (rate({{__name__=~"frs_({SVC})_dlq_total"}}[5m]))',
             "{{service}} {{reason}}")]),
    ]),
    ("Latency", [
        ("Request to candidates (p50, p99)", "s", [
            ("histogram_quantile(0.5, sum by (le) "
             "(rate(frs_audit_end_to_end_seconds_bucket[5m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) "
             "(rate(frs_audit_end_to_end_seconds_bucket[5m])))", "p99")]),
        ("Handler latency p95", "s", [
            ("histogram_quantile(0.95, sum by (le, service) "
             f'(rate({{__name__=~"frs_({SVC})_handler_seconds_bucket"}}[5m])))', "{{service}}")]),
        ("Handler failures /s", "ops", [
            (f'sum by (service) (rate({{__name__=~"frs_({SVC})_handler_failures_total"}}[5m]))',
             "{{service}}")]),
        ("Prerequisite waits /s", "ops", [
            ("sum by (service) "
             f'(rate({{__name__=~"frs_({SVC})_prerequisite_waits_total"}}[5m]))',
             "{{service}}")]),
    ]),
    ("Providers", [
        ("Dispatch outcomes /s", "ops", [
            ("sum by (provider, outcome) (rate(frs_dispatch_outcomes_total[5m]))",
             "{{provider}} {{outcome}}")]),
        ("Send latency p95", "s", [
            ("histogram_quantile(0.95, sum by (le, provider) "
             "(rate(frs_dispatch_send_seconds_bucket[5m])))", "{{provider}}")]),
        ("Circuit state (0 closed, 1 half-open, 2 open)", "short", [
            ("max by (provider) (frs_dispatch_circuit_state)", "{{provider}}")]),
        ("Sends in flight", "short", [
            ("sum by (provider) (frs_dispatch_in_flight_sends)", "{{provider}}")]),
        ("Answers refused /s", "ops", [
            ('sum by (outcome) (rate(frs_results_webhook_requests_total{outcome!="accepted"}[5m]))',
             "webhook {{outcome}}"),
            ('sum by (outcome) (rate(frs_results_mail_messages_total{outcome!="accepted"}[5m]))',
             "mail {{outcome}}")]),
    ]),
    ("Vault and purge", [
        ("Vault objects", "short", [("max(frs_intake_vault_objects)", "objects")]),
        ("Objects past expiry", "short", [
            ("max(frs_intake_vault_objects_past_expiry)", "past expiry")]),
        ("Images purged /s", "ops", [
            ("sum by (reason) (rate(frs_intake_images_purged_total[5m]))", "{{reason}}")]),
    ]),
    ("Trusted time (the purger follows the broker's clock)", [
        ("Clock skew, intake minus broker", "s", [
            ("max(frs_intake_clock_skew_seconds)", "skew")]),
        ("Purge sweeps skipped (no broker clock) /s", "ops", [
            ("sum(rate(frs_intake_purge_sweeps_skipped_total[5m]))", "skipped")]),
    ]),
    ("Audit", [
        ("Audit tree size", "short", [("max(frs_audit_tree_size)", "leaves"),
                                      ("max(frs_audit_checkpoint_tree_size)", "checkpointed")]),
        ("Checkpoint age", "s", [
            ("time() - max(frs_audit_last_checkpoint_timestamp_seconds)", "age")]),
    ]),
    ("Compliance", [
        ("Compliance violations (1h)", "short", [
            ("sum by (invariant) (increase(frs_audit_violations_total[1h]))", "{{invariant}}")]),
        ("Policy denials by rule /s", "ops", [
            ("sum by (rule) (rate(frs_policy_rule_denials_total[5m]))", "{{rule}}")]),
        ("Pending reviews", "short", [
            ("max(frs_results_reviews_pending)", "examiner reviews"),
            ("max(frs_policy_exigent_reviews_pending)", "exigent (supervisor)")]),
        ("Overdue deletion receipts", "short", [
            ("max(frs_results_deletion_receipts_overdue)", "overdue")]),
    ]),
    ("Instances (frs status lists the members and their partitions)", [
        ("Instances per service", "short", [
            ("count by (service) (frs_instance_info)", "{{service}}")]),
        ("Partitions owned per instance", "short", [
            ("sum by (service, instance, topic) (frs_partitions_owned)",
             "{{service}} {{instance}} {{topic}}")]),
        ("Partitions without an owner", "short", [
            ("max by (service, topic) (frs_topic_partitions) - "
             "sum by (service, topic) (frs_partitions_owned)", "{{service}} {{topic}}")]),
        ("Audit leaders (must be 1)", "short", [("sum(frs_audit_leader)", "leaders")]),
    ]),
    ("Usage oversight", [
        ("Usage alerts by rule (1h)", "short", [
            ("sum by (rule) (increase(frs_oversight_alerts_total[1h]))", "{{rule}}")]),
        ("Observations judged /s", "ops", [
            ("sum by (subject_kind, kind) (rate(frs_oversight_observations_total[5m]))",
             "{{subject_kind}} {{kind}}")]),
        ("Judge latency p95", "s", [
            ("histogram_quantile(0.95, sum by (le) "
             "(rate(frs_oversight_judge_seconds_bucket[5m])))", "p95")]),
        ("Rule failures and dead letters /s", "ops", [
            ("sum by (rule) (rate(frs_oversight_rule_failures_total[5m]))", "{{rule}}"),
            ("sum by (reason) (rate(frs_oversight_dlq_total[5m]))", "dlq {{reason}}")]),
    ]),
]


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        width = 24 // len(row_panels)
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append({
                "id": pid, "type": "timeseries", "title": title, "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": expr,
                             "legendFormat": legend} for j, (expr, legend) in enumerate(targets)],
            })
            pid += 1
        y += 8
    return {
        "uid": "frs-broker", "title": "frs-broker", "tags": ["frs-broker"],
        "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": False,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def expressions() -> list[str]:
    return [expr for _, row in ROWS for _, _, targets in row for expr, _ in targets]


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
