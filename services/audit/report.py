"""REQ-REPORT: accountability figures computed from the audit store alone.

Searches by provider and by provider kind (which non-federal systems were used), by
purpose; outcomes; denials by rule; candidate list sizes; purge timeliness; compliance
violations; rejections by reason; usage alerts by rule, with their ids. Only ids, counts
and times: never an image, never a key.
Every format says its window in words."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime
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
    UsageAlert,
)
from services.audit.store import PgLocation, open_store

FEDERAL = "federal"


def _utc(t: datetime) -> datetime:
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def _words(t: datetime) -> str:
    seconds = f":{t.second:02d}" if t.second or t.microsecond else ""
    fraction = f".{t.microsecond:06d}" if t.microsecond else ""
    return f"{t:%Y-%m-%d %H:%M}{seconds}{fraction} UTC"


def window_words(since: datetime | None, until: datetime | None) -> str:
    if since and until:
        return f"from {_words(since)} to {_words(until)}"
    if since:
        return f"since {_words(since)}"
    if until:
        return f"until {_words(until)}"
    return "all events in the log (no window given)"


def _in_window(time: str | None, since: datetime | None, until: datetime | None) -> bool:
    if time is None:
        return since is None and until is None
    t = datetime.fromisoformat(time)
    return (since is None or t >= since) and (until is None or t < until)


def build_report(directory: Path | PgLocation, since: datetime | None = None,
                 until: datetime | None = None,
                 late_after_s: float = 0.0) -> dict[str, Any]:
    since, until = (_utc(t) if t else None for t in (since, until))
    store = open_store(directory, readonly=True)
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
    # By alert id: an alert published again after a crash is the same alert.
    alerts = {d["alert_id"]: d["rule"] for d in events[UsageAlert.TYPE]}
    alert_ids: dict[str, list[str]] = defaultdict(list)
    for alert_id, rule in sorted(alerts.items()):
        alert_ids[rule].append(alert_id)
    return {
        # `from` is inclusive, `to` exclusive; the words are for people.
        "window": {"from": since.isoformat() if since else None,
                   "to": until.isoformat() if until else None,
                   "description": window_words(since, until)},
        "log_size": size,
        "probes": {
            "submitted": len(events[ProbeSubmitted.TYPE]),
            "rejected": len(events[ProbeRejected.TYPE]),
            "by_purpose": dict(Counter(purpose_of.values())),
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
        # Whatever codes the log holds, not only the ones this version knows.
        "rejections_by_reason": dict(Counter(d["reason"] for d in
                                             events[ProbeRejected.TYPE]).most_common()),
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
        "usage_alerts": {
            "total": len(alerts),
            "by_rule": dict(Counter(alerts.values()).most_common()),
            "alert_ids": dict(sorted(alert_ids.items())),
        },
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def text_report(r: dict[str, Any]) -> str:
    lines = [f"audit log: {r['log_size']} leaves; window: {r['window']['description']}",
             f"probes submitted {r['probes']['submitted']}, rejected {r['probes']['rejected']}",
             f"searches: {r['searches']['total']}"]
    for p in r["searches"]["by_provider"]:
        lines.append(f"  {p['provider_id']:<24} {p['kind']:<14} {p['searches']:>6}")
    lines.append("non-federal systems used: "
                 + (", ".join(r["searches"]["non_federal_systems_used"]) or "none"))
    lines.append(f"by purpose: {r['probes']['by_purpose']}")
    lines.append(f"outcomes: {r['outcomes']}")
    lines.append(f"denials by rule: {_counts(r['denials_by_rule'])}")
    lines.append(f"rejections by reason: {_counts(r['rejections_by_reason'])}")
    lines.append(f"candidate list sizes: {r['candidate_list_sizes']}")
    lines.append(f"purge timeliness: {r['purge_timeliness']}")
    lines.append(f"violations: {r['violations'] or 'none'}")
    alerts = r["usage_alerts"]
    lines.append(f"usage alerts: {alerts['total']}; by rule: {_counts(alerts['by_rule'])}")
    lines += [f"  {rule}: {', '.join(ids)}" for rule, ids in alerts["alert_ids"].items()]
    return "\n".join(lines)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
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
        out.append((prefix, "" if value is None else value))


# OWASP CSV injection: a spreadsheet reads a cell starting with one of these as a formula
# (NUL from ASVS 1.2.10). Text that starts so gets a leading single quote. Numbers the
# report computed (an int or float, e.g. a negative max_late_s) stay numbers: they
# cannot carry a formula. Text that merely looks numeric ("-1" as a provider's name) is
# still text and is neutralized.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")


def _cell(value: Any) -> str:
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_report(r: dict[str, Any]) -> str:
    import csv
    import io

    rows: list[tuple[str, Any]] = []
    _flatten("", r, rows)
    buf = io.StringIO()
    # RFC 4180 line ends: the writer then quotes any cell holding a CR or LF, so no cell
    # can start a row of its own in a spreadsheet (ASVS 1.2.10).
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["metric", "value"])
    writer.writerows((_cell(metric), _cell(value)) for metric, value in rows)
    return buf.getvalue()


def _bars(title: str, data: dict[str, Any]) -> str:
    """A bar chart whose labels are HTML text in a grid column that sizes to them and
    wraps the long ones: SVG text neither wraps nor measures itself, and cut names off."""
    from html import escape

    items = [(str(k), float(v)) for k, v in data.items() if isinstance(v, int | float)]
    if not items:
        return f"<h2>{escape(title)}</h2><p class=none>none</p>"
    top = max(v for _, v in items) or 1.0
    rows = []
    for label, value in items:
        share = max(0.3, 100 * value / top)  # a hairline for zero, so the row reads
        rows.append(
            f"<div class=label>{escape(label)}</div>"
            f'<svg class=bar viewBox="0 0 100 1" preserveAspectRatio="none" aria-hidden="true">'
            f'<rect width="{share:.1f}" height="1"/></svg>'
            f"<div class=value>{value:g}</div>")
    return (f"<h2>{escape(title)}</h2><div class=bars role=group "
            f"aria-label=\"{escape(title)}\">{''.join(rows)}</div>")


def html_report(r: dict[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG bars, nothing fetched from a network."""
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
        _bars("Rejections by reason", r["rejections_by_reason"]),
        _bars("Candidate list sizes", {str(k): v for k, v in
                                       r["candidate_list_sizes"]["histogram"].items()}),
        _bars("Purge timeliness (expired images)",
              {"on time": purge["expired_purges_on_time"], "late": purge["expired_purges_late"],
               "not yet purged": purge["submitted_not_yet_purged"]}),
        _bars("Compliance violations", r["violations"]),
        _bars("Usage alerts by rule", r["usage_alerts"]["by_rule"]),
    ]
    alert_rows = "".join(f"<tr><th>{escape(rule)}</th><td>{escape(', '.join(ids))}</td></tr>"
                         for rule, ids in r["usage_alerts"]["alert_ids"].items())
    non_federal = ", ".join(escape(p) for p in s["non_federal_systems_used"]) or "none"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>frs-broker accountability report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
td {{ overflow-wrap: anywhere; }}
.none {{ color: #777; }}
/* Labels size the first column up to 32em and wrap past it; nothing is clipped. */
.bars {{ display: grid; grid-template-columns: fit-content(32em) minmax(8em, 30em) max-content;
        gap: 4px 8px; align-items: center; font-size: 12px; }}
.bars .label {{ text-align: right; overflow-wrap: anywhere; }}
.bars .bar {{ display: block; width: 100%; height: 16px; }}
.bars rect {{ fill: #3b6ea5; }}
</style></head><body>
<h1>Accountability report</h1>
<p>Window: {escape(r['window']['description'])}. Audit log size: {r['log_size']} leaves.</p>
<table>
<tr><th>Searches</th><td>{s['total']}</td></tr>
<tr><th>Probes submitted / rejected</th><td>{r['probes']['submitted']} /
 {r['probes']['rejected']}</td></tr>
<tr><th>Non-federal systems used</th><td>{non_federal}</td></tr>
<tr><th>Policy cleared / denied</th><td>{r['outcomes']['cleared']} /
 {r['outcomes']['denied']}</td></tr>
<tr><th>Candidate lists</th><td>{r['outcomes']['candidate_lists']}</td></tr>
<tr><th>No response</th><td>{r['outcomes']['no_response']}</td></tr>
<tr><th>Usage alerts</th><td>{r['usage_alerts']['total']}</td></tr>
</table>
{''.join(sections)}
<h2>Usage alert ids</h2>
{f"<table>{alert_rows}</table>" if alert_rows else "<p class=none>none</p>"}
</body></html>
"""
