"""`frs oversight ...`: what the usage oversight found, and a check of it from the topics.

``report`` counts use in a window (searches per agent and case, sends per provider) and the
alerts of each rule; ``replay`` rebuilds the alerts from the pipeline's topics alone with the
service's own rule functions and thresholds (FRS_OVERSIGHT_*) and compares them with the
live ones on frs.oversight.alerts. Exit codes: 0 equal / reported, 1 replay differs, 2
misuse."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.catalog import (
    DISPATCH_EVENTS,
    OVERSIGHT_ALERTS,
    POLICY_DECISIONS,
    PROBE_EVENTS,
    RESULTS_EVENTS,
)
from schemas.envelope import Envelope
from schemas.events import ProbeSubmitted, ProviderDispatched, UsageAlert
from services.cli.common import BENCH_HELP, CliSettings, Misuse, emit, group, subcommand
from services.kit.reader import read_topic
from services.oversight.handlers import Limits, MemoryTables

INPUT_TOPICS = (PROBE_EVENTS.name, POLICY_DECISIONS.name, DISPATCH_EVENTS.name,
                RESULTS_EVENTS.name)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> timedelta:
    found = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not found or int(found.group(1)) == 0:
        raise Misuse(f"--window {text!r}: give a length such as 30m, 24h or 7d")
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])


def envelopes(records: Sequence[tuple[Any, object]]) -> list[Envelope]:
    return [env for _raw, env in records if isinstance(env, Envelope)]


def live_alerts(records: Sequence[Envelope]) -> dict[str, UsageAlert]:
    """The live alerts by id: a redelivered alert is the same alert (same id)."""
    return {e.event.alert_id: e.event for e in records if isinstance(e.event, UsageAlert)}


def replayed_alerts(events: Sequence[Envelope], limits: Limits, now: datetime
                    ) -> dict[str, UsageAlert]:
    tables = MemoryTables(limits)
    found = [a for env in events for a in tables.feed(env.id, env.event)]
    return {a.alert_id: a for a in found + tables.due(now)}


@dataclass(frozen=True)
class Comparison:
    live: int
    replayed: int
    missing_live: list[str]  # replay found it, the service did not publish it
    extra_live: list[str]  # the service published it, the replay does not find it

    @property
    def equal(self) -> bool:
        return not self.missing_live and not self.extra_live


def compare(live: dict[str, UsageAlert], replayed: dict[str, UsageAlert]) -> Comparison:
    return Comparison(len(live), len(replayed), sorted(set(replayed) - set(live)),
                      sorted(set(live) - set(replayed)))


def usage_report(events: Sequence[Envelope], alerts: dict[str, UsageAlert],
                 start: datetime, end: datetime) -> dict[str, Any]:
    """Counts per agent, case and provider in [start, end), and the alerts observed then."""
    agents: Counter[str] = Counter()
    cases: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    for env in events:
        event = env.event
        if isinstance(event, ProbeSubmitted) and start <= event.submitted_at < end:
            agents[event.agent_id] += 1
            cases[event.case_id] += 1
        elif isinstance(event, ProviderDispatched) and start <= event.sent_at < end:
            providers[event.provider_id] += 1
    hits = [a for a in alerts.values() if start <= a.observed_at < end]
    return {
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "searches_by_agent": dict(agents.most_common()),
        "searches_by_case": dict(cases.most_common()),
        "sends_by_provider": dict(providers.most_common()),
        "alerts_by_rule": dict(Counter(a.rule.value for a in hits).most_common()),
        "alerts": [{"alert_id": a.alert_id, "rule": a.rule.value, "reason": a.reason.value,
                    "subject_kind": a.subject_kind, "subject": a.subject,
                    "window_start": a.window_start.isoformat(),
                    "window_end": a.window_end.isoformat(), "count": a.count,
                    "threshold": a.threshold}
                   for a in sorted(hits, key=lambda a: (a.observed_at, a.alert_id))],
    }


def _limits() -> Limits:
    from services.oversight.settings import OversightSettings

    return OversightSettings().limits()


async def cmd_report(args: argparse.Namespace, settings: CliSettings) -> int:
    length = parse_window(args.window)
    bootstrap = settings.kafka_bootstrap
    events = envelopes(await read_topic(bootstrap, [PROBE_EVENTS.name, DISPATCH_EVENTS.name],
                                        kafka=settings))
    alerts = live_alerts(envelopes(await read_topic(bootstrap, [OVERSIGHT_ALERTS.name],
                                                    kafka=settings)))
    end = datetime.now(UTC)
    report = usage_report(events, alerts, end - length, end)
    lines = [f"usage {report['window']['start']} .. {report['window']['end']}",
             f"searches: {sum(report['searches_by_agent'].values())} by "
             f"{len(report['searches_by_agent'])} agents in {len(report['searches_by_case'])} "
             f"cases; sends: {sum(report['sends_by_provider'].values())} to "
             f"{len(report['sends_by_provider'])} providers"]
    lines += [f"  {agent}: {n} searches" for agent, n in report["searches_by_agent"].items()]
    lines += [f"  {p}: {n} sends" for p, n in report["sends_by_provider"].items()]
    lines.append(f"alerts: {len(report['alerts'])}")
    lines += [f"  {a['rule']} {a['subject_kind']} {a['subject']} count {a['count']} over "
              f"{a['threshold']} ({a['alert_id']})" for a in report["alerts"]]
    emit(args, report, "\n".join(lines))
    return 0


async def cmd_replay(args: argparse.Namespace, settings: CliSettings) -> int:
    bootstrap = settings.kafka_bootstrap
    events = envelopes(await read_topic(bootstrap, INPUT_TOPICS, kafka=settings,
                                        max_s=args.max_s))
    live = live_alerts(envelopes(await read_topic(bootstrap, [OVERSIGHT_ALERTS.name],
                                                  kafka=settings, max_s=args.max_s)))
    result = compare(live, replayed_alerts(events, _limits(), datetime.now(UTC)))
    payload = {"equal": result.equal, "events": len(events), "live": result.live,
               "replayed": result.replayed, "missing_live": result.missing_live,
               "extra_live": result.extra_live}
    human = (f"replay of {len(events)} events: {result.replayed} alerts, live "
             f"{result.live}: " + ("equal" if result.equal else
                                   f"DIFFER (missing live {result.missing_live}, "
                                   f"extra live {result.extra_live})"))
    emit(args, payload, human)
    return 0 if result.equal else 1


async def cmd_bench(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.oversight.bench import run
    from services.oversight.settings import OversightSettings

    result = await run(OversightSettings(), probes=args.probes, max_s=args.max_s,
                       kafka=settings)
    emit(args, result, f"oversight: {result['rules']['events_per_s']:.0f} events/s through "
         f"the rules, {result['baseline']['events_per_s']:.0f} events/s counted by a bare "
         f"faust agent: ratio {result['ratio']:.2f} (target {result['target_ratio']})")
    return 0


def register(commands: Any) -> None:
    oversight = commands.add_parser("oversight", help="usage oversight: report, replay")
    cmds = oversight.add_subparsers(dest="oversight_command", required=True)
    report = subcommand(cmds, "report", "use in a window: searches per agent and case, "
                        "sends per provider, usage alerts by rule",
                        "frs --as auditor oversight report --window 24h --json", cmd_report)
    report.add_argument("--window", default="24h",
                        help="how far back from now: 30m, 24h, 7d (default 24h)")
    replay = subcommand(cmds, "replay", "rebuild the usage alerts from the topics with the "
                        "service's rules and thresholds (FRS_OVERSIGHT_*); exit 1 if they "
                        "differ from the live ones", "frs --as auditor oversight replay --json",
                        cmd_replay)
    replay.add_argument("--max-s", type=float, default=120.0,
                        help="longest time to read the topics, seconds (default 120)")
    bench = subcommand(group(commands, "bench", BENCH_HELP), "oversight",
                       "events/s through the oversight rules vs a bare faust agent that "
                       "only counts, same run, same scratch topic",
                       "frs bench oversight --probes 5000 --json", cmd_bench)
    bench.add_argument("--probes", type=int, default=5000,
                       help="probes of ordinary use (3 events each; default 5000)")
    bench.add_argument("--max-s", type=float, default=600.0,
                       help="longest time for either run, seconds (default 600)")
