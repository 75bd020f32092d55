"""REQ-REPORT: accountability figures computed from the audit store alone.

Searches by provider and by provider kind (which non-federal systems were used), by
purpose; outcomes; denials by rule; candidate list sizes; purge timeliness; compliance
violations. Only ids, counts and times: never an image, never a key."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from schemas.events import (
    CandidatesReceived,
    ComplianceViolation,
    DispatchFailed,
    ImagePurged,
    NoResponse,
    PolicyCleared,
    PolicyDenied,
    ProbeRejected,
    ProbeSubmitted,
    ProviderDispatched,
    ProviderRecord,
)
from services.audit.store import AuditStore

FEDERAL = "federal"


def _in_window(time: str | None, since: datetime | None, until: datetime | None) -> bool:
    if time is None:
        return since is None and until is None
    t = datetime.fromisoformat(time)
    return (since is None or t >= since) and (until is None or t < until)


def build_report(directory: Path, since: datetime | None = None, until: datetime | None = None,
                 late_after_s: float = 0.0) -> dict[str, Any]:
    store = AuditStore(directory, readonly=True)
    try:
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        kinds: dict[str, str] = {}
        names: dict[str, str] = {}
        for _, leaf in store.iter_leaves():
            body = json.loads(leaf)
            etype = body.get("type")
            if etype is None or "error" in body or body.get("topic", "").startswith("frs.dlq."):
                continue  # undecodable records and DLQ copies are not searches
            if etype == ProviderRecord.TYPE:  # registry state: whatever the window
                kinds[body["data"]["provider_id"]] = body["data"]["kind"]
                names[body["data"]["provider_id"]] = body["data"]["name"]
                continue
            if _in_window(body.get("time"), since, until):
                events[etype].append(body["data"])
        size = store.size
    finally:
        store.close()

    purpose_of = {e["probe_id"]: e["purpose"] for e in events[ProbeSubmitted.TYPE]}
    by_provider: dict[str, dict[str, Any]] = {}
    for d in events[ProviderDispatched.TYPE]:
        p = by_provider.setdefault(d["provider_id"], {
            "provider_id": d["provider_id"], "name": names.get(d["provider_id"]),
            "kind": kinds.get(d["provider_id"], "unknown"), "searches": 0,
            "purposes": Counter(), "transports": Counter()})
        p["searches"] += 1
        p["purposes"][purpose_of.get(d["probe_id"], "unknown")] += 1
        p["transports"][d["transport"]] += 1
    by_kind: Counter[str] = Counter()
    for p in by_provider.values():
        by_kind[p["kind"]] += p["searches"]
        p["purposes"] = dict(p["purposes"])
        p["transports"] = dict(p["transports"])

    denials: Counter[str] = Counter()
    for d in events[PolicyDenied.TYPE] + events[PolicyCleared.TYPE]:
        for provider in d.get("denied", []):
            for rule in provider["rules"]:
                denials[rule["rule_id"]] += 1

    sizes = [int(d["list_size"]) for d in events[CandidatesReceived.TYPE]]
    purges = [d for d in events[ImagePurged.TYPE] if d.get("object_kind", "probe") == "probe"]
    lateness = sorted((datetime.fromisoformat(d["purged_at"])
                       - datetime.fromisoformat(d["expires_at"])).total_seconds()
                      for d in purges if d["reason"] == "expired")
    purged_ids = {d["probe_id"] for d in purges}
    return {
        "window": {"from": since.isoformat() if since else None,
                   "to": until.isoformat() if until else None},
        "log_size": size,
        "probes": {
            "submitted": len(events[ProbeSubmitted.TYPE]),
            "rejected": len(events[ProbeRejected.TYPE]),
            "by_purpose": dict(Counter(purpose_of.values())),
            "rejected_by_reason": dict(Counter(d["reason"] for d in
                                               events[ProbeRejected.TYPE])),
        },
        "searches": {
            "total": len(events[ProviderDispatched.TYPE]),
            "by_provider": sorted(by_provider.values(), key=lambda p: -p["searches"]),
            "by_provider_kind": dict(by_kind),
            "non_federal_systems_used": sorted(p["provider_id"] for p in by_provider.values()
                                               if p["kind"] != FEDERAL),
        },
        "outcomes": {
            "cleared": len(events[PolicyCleared.TYPE]),
            "denied": len(events[PolicyDenied.TYPE]),
            "dispatch_failed": dict(Counter(d["reason"] for d in events[DispatchFailed.TYPE])),
            "candidate_lists": len(sizes),
            "no_response": len(events[NoResponse.TYPE]),
        },
        "denials_by_rule": dict(denials.most_common()),
        "candidate_list_sizes": {
            "count": len(sizes), "min": min(sizes, default=None),
            "max": max(sizes, default=None),
            "mean": round(sum(sizes) / len(sizes), 2) if sizes else None,
            "histogram": dict(sorted(Counter(sizes).items())),
        },
        "purge_timeliness": {
            "purged": len(purges),
            "by_reason": dict(Counter(d["reason"] for d in purges)),
            "expired_purges_on_time": sum(1 for s in lateness if s <= late_after_s),
            "expired_purges_late": sum(1 for s in lateness if s > late_after_s),
            "max_late_s": lateness[-1] if lateness else None,
            "submitted_not_yet_purged": len(set(purpose_of) - purged_ids),
        },
        "violations": dict(Counter(d["invariant"] for d in
                                   events[ComplianceViolation.TYPE])),
    }


def text_report(r: dict[str, Any]) -> str:
    lines = [f"audit log: {r['log_size']} leaves; window {r['window']['from'] or '-'} .. "
             f"{r['window']['to'] or '-'}",
             f"probes submitted {r['probes']['submitted']}, rejected {r['probes']['rejected']}",
             f"searches: {r['searches']['total']}"]
    for p in r["searches"]["by_provider"]:
        lines.append(f"  {p['provider_id']:<24} {p['kind']:<14} {p['searches']:>6}")
    lines.append("non-federal systems used: "
                 + (", ".join(r["searches"]["non_federal_systems_used"]) or "none"))
    lines.append(f"by purpose: {r['probes']['by_purpose']}")
    lines.append(f"outcomes: {r['outcomes']}")
    lines.append(f"denials by rule: {r['denials_by_rule']}")
    lines.append(f"candidate list sizes: {r['candidate_list_sizes']}")
    lines.append(f"purge timeliness: {r['purge_timeliness']}")
    lines.append(f"violations: {r['violations'] or 'none'}")
    return "\n".join(lines)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for item in value:
            key = item.get("provider_id", "?")
            _flatten(f"{prefix}[{key}]", {k: v for k, v in item.items() if k != "provider_id"},
                     out)
    elif isinstance(value, list):
        out.append((prefix, ";".join(map(str, value))))
    else:
        out.append((prefix, "" if value is None else str(value)))


def csv_report(r: dict[str, Any]) -> str:
    import csv
    import io

    rows: list[tuple[str, str]] = []
    _flatten("", r, rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "value"])
    writer.writerows(rows)
    return buf.getvalue()


def _bars(title: str, data: dict[str, Any]) -> str:
    from html import escape

    items = [(str(k), float(v)) for k, v in data.items() if isinstance(v, int | float)]
    if not items:
        return f"<h2>{escape(title)}</h2><p class=none>none</p>"
    top = max(v for _, v in items) or 1.0
    row_h, label_w, bar_w = 22, 260, 420
    rows = []
    for i, (label, value) in enumerate(items):
        y = i * row_h
        w = max(1.0, bar_w * value / top)
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:g}</text>')
    height = row_h * len(items)
    return (f"<h2>{escape(title)}</h2><svg role=img aria-label=\"{escape(title)}\" "
            f"width=\"{label_w + bar_w + 60}\" height=\"{height}\">{''.join(rows)}</svg>")


def html_report(r: dict[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG charts, nothing fetched from a network."""
    from html import escape

    s = r["searches"]
    providers = {f"{p['provider_id']} {p['name'] or ''} ({p['kind']})": p["searches"]
                 for p in s["by_provider"]}
    purge = r["purge_timeliness"]
    sections = [
        _bars("Searches by provider kind", s["by_provider_kind"]),
        _bars("Searches by provider", providers),
        _bars("Probes by purpose", r["probes"]["by_purpose"]),
        _bars("Denials by rule", r["denials_by_rule"]),
        _bars("Candidate list sizes", {str(k): v for k, v in
                                       r["candidate_list_sizes"]["histogram"].items()}),
        _bars("Purge timeliness (expired images)",
              {"on time": purge["expired_purges_on_time"], "late": purge["expired_purges_late"],
               "not yet purged": purge["submitted_not_yet_purged"]}),
        _bars("Compliance violations", r["violations"]),
    ]
    non_federal = ", ".join(escape(p) for p in s["non_federal_systems_used"]) or "none"
    window = f"{r['window']['from'] or 'start'} to {r['window']['to'] or 'now'}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>frs-broker accountability report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #222; }}
svg rect {{ fill: #3b6ea5; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.none {{ color: #777; }}
</style></head><body>
<h1>Accountability report</h1>
<p>Window: {escape(window)}. Audit log size: {r['log_size']} leaves.</p>
<table>
<tr><th>Searches</th><td>{s['total']}</td></tr>
<tr><th>Probes submitted / rejected</th><td>{r['probes']['submitted']} /
 {r['probes']['rejected']}</td></tr>
<tr><th>Non-federal systems used</th><td>{non_federal}</td></tr>
<tr><th>Policy cleared / denied</th><td>{r['outcomes']['cleared']} /
 {r['outcomes']['denied']}</td></tr>
<tr><th>Candidate lists</th><td>{r['outcomes']['candidate_lists']}</td></tr>
<tr><th>No response</th><td>{r['outcomes']['no_response']}</td></tr>
</table>
{''.join(sections)}
</body></html>
"""
