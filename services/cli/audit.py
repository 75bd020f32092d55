"""`frs audit ...`: verify the log offline, replay the topics against it, report.

Exit codes: 0 all good, 1 a finding (verify failed, events missing), 2 misuse."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.catalog import AUDITED_TOPICS
from services.audit.checkpoint import CheckpointError, Verifier
from services.audit.settings import AuditSettings
from services.audit.store import PgLocation, open_store
from services.cli.common import BENCH_HELP, CliSettings, Misuse, emit, group, subcommand


def _store_dir(args: argparse.Namespace) -> Path | PgLocation:
    """--store, else the shared database FRS_STATE_URL names, else FRS_AUDIT_STORE_DIR."""
    directory = Path(args.store) if args.store else AuditSettings().store_at()
    if isinstance(directory, Path):
        if not (directory / "index.sqlite3").exists():
            raise Misuse(f"no audit store at {directory}: pass --store or set "
                         "FRS_AUDIT_STORE_DIR")
        return directory
    try:  # unreachable, refused, or another schema: one line, not a traceback
        open_store(directory, readonly=True).close()
    except Exception as exc:
        raise Misuse(f"cannot read the audit log at {AuditSettings().state().shown()}: "
                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                     ) from None
    return directory


def _vkey_text(args: argparse.Namespace) -> str:
    if args.vkey is not None:
        return str(args.vkey).strip()
    path = Path(args.vkey_file) if args.vkey_file else \
        AuditSettings().key_file().with_suffix(".vkey")
    if not path.is_file():
        raise Misuse(f"no verifier key at {path}: pass --vkey NAME+HASH+KEY")
    return path.read_text().strip()


def _verifier(args: argparse.Namespace) -> Verifier:
    text = _vkey_text(args)
    try:
        return Verifier.parse(text)
    except CheckpointError as exc:
        raise Misuse(f"bad verifier key: {exc}") from None


def _progress(label: str) -> Any:
    """A one-line progress display on stderr when stdout is a terminal; silence if not."""
    if not sys.stdout.isatty():
        return None

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        bar = "#" * (pct // 4)
        sys.stderr.write(f"\r{label} [{bar:<25}] {done}/{total} leaves")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None,
                        help="audit store directory (default: the database FRS_STATE_URL "
                             "names when it is PostgreSQL, else FRS_AUDIT_STORE_DIR)")


# --- verify ---------------------------------------------------------------------------


async def cmd_verify(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.verify import verify_store

    directory, verifier = _store_dir(args), _verifier(args)
    external: list[str] = []
    for name in args.checkpoint:
        path = Path(name)
        if not path.is_file():
            raise Misuse(f"no checkpoint file at {path}")
        external.append(path.read_text())
    if args.checkpoints_from_kafka:
        from schemas.envelope import Envelope
        from schemas.events import CheckpointPublished
        from services.kit.reader import read_topic

        external += [d.event.note for _, d in await read_topic(
            settings.kafka_bootstrap, ["frs.audit.checkpoints"])
            if isinstance(d, Envelope) and isinstance(d.event, CheckpointPublished)]
    report = await asyncio.to_thread(verify_store, directory, verifier, args.origin,
                                     external=external, progress=_progress("verify"))
    payload = report.to_json()
    if report.ok:
        human = (f"ok: {report.tree_size} leaves, {report.checkpoints} checkpoints verified, "
                 f"root {report.root} ({report.seconds:.2f}s)")
    else:
        lines = [f"FAILED: first bad leaf index {report.first_bad_index}"
                 if report.first_bad_index is not None else "FAILED"]
        lines += [f"  {f.kind}: {f.detail}" for f in report.findings[:20]]
        human = "\n".join(lines)
    emit(args, payload, human)
    return 0 if report.ok else 1


async def cmd_vkey(args: argparse.Namespace, settings: CliSettings) -> int:
    _verifier(args)  # refuses a malformed key
    text = _vkey_text(args)
    emit(args, {"verifier_key": text}, text)
    return 0


# --- proofs ---------------------------------------------------------------------------


async def cmd_proof(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.proof import ProofUnavailable, inclusion_bundle

    try:
        bundle = inclusion_bundle(_store_dir(args), args.event_id)
    except ProofUnavailable as exc:
        sys.stderr.write(f"frs: {exc}\n")
        return 1
    text = json.dumps(bundle, indent=None if args.json else 2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


async def cmd_verify_proof(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.merkle import ProofError
    from services.audit.proof import verify_bundle

    path = Path(args.bundle)
    if not path.is_file():
        raise Misuse(f"no proof bundle at {path}: write one with `frs audit proof ID --out F`")
    try:
        bundle = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise Misuse(f"{path} is not JSON") from None
    verifier = _verifier(args)
    try:
        line = verify_bundle(bundle, verifier)
    except (ProofError, CheckpointError) as exc:
        emit(args, {"ok": False, "error": str(exc)}, f"FAILED: {exc}")
        return 1
    emit(args, {"ok": True, "detail": line}, f"ok: {line}")
    return 0


# --- replay ---------------------------------------------------------------------------


async def cmd_replay(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.replay import (
        cross_check,
        for_invariants,
        replay_violations,
        reported_violations,
        selected,
        subjects_for,
        timeline,
    )
    from services.kit.reader import read_topic

    directory = _store_dir(args)
    since = _when(args.since)
    topics = [t.name for t in AUDITED_TOPICS]
    records: list[Any] = await read_topic(settings.kafka_bootstrap, topics)
    subjects = subjects_for(records, args.probe, args.case)
    full = subjects is None and since is None
    audit = AuditSettings()
    # The invariants need each probe's whole history: run them on the selection's
    # subjects from the beginning, whatever --since says.
    found = await replay_violations(for_invariants(records, subjects),
                                    audit.invariant_settings())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    reported = reported_violations(records)
    while True:
        # The store and the violations topic may lag: give the audit service time.
        report = cross_check(records, directory, subjects, since)
        report.violations_found = len(found)
        report.unreported_violations = sorted(found - reported)
        if report.ok or loop.time() >= deadline:
            break
        await asyncio.sleep(0.5)
        reported = reported_violations(
            await read_topic(settings.kafka_bootstrap, ["frs.audit.violations"]))
    payload = report.to_json()
    lines = []
    if not full:
        events = timeline(selected(records, subjects, since), directory)
        payload["timeline"] = events
        lines = [f"{e['time']}  {e['type']:<34} {e['at']:<32} "
                 f"{'logged' if e['in_audit_log'] else 'NOT IN AUDIT LOG'}" for e in events]
    lines.append(
        f"{'ok' if report.ok else 'MISMATCH'}: {report.topic_records} records in the "
        f"topics, {report.store_leaves} leaves in the store, {len(report.missing)} "
        f"missing, {len(report.digest_mismatch)} altered, {len(report.duplicate_ids)} "
        f"duplicated, {report.redelivered} redelivered, {len(report.unknown_to_topics)} "
        f"unknown to the topics, "
        f"{report.aged_out} past retention; invariants found {len(found)} violations, "
        f"{len(report.unreported_violations)} never reported by the audit service")
    emit(args, payload, "\n".join(lines))
    return 0 if report.ok else 1


# --- report ---------------------------------------------------------------------------


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Misuse(f"not an ISO date or time: {text!r} (e.g. 2026-01-31)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def cmd_report(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.report import build_report, csv_report, html_report, text_report

    directory = _store_dir(args)
    late_after = args.late_after if args.late_after is not None else \
        AuditSettings().expiry_grace_s
    report = await asyncio.to_thread(build_report, directory, _when(args.since),
                                     _when(args.until), late_after)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        text = json.dumps(report, default=str)
    elif fmt == "csv":
        text = csv_report(report).rstrip("\n")
    elif fmt == "html":
        text = html_report(report).rstrip("\n")
    else:
        text = text_report(report)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


# --- bench ----------------------------------------------------------------------------


async def cmd_bench(args: argparse.Namespace, settings: CliSettings) -> int:
    from services.audit.bench import run

    if args.append_leaves < 1 or args.verify_leaves < 1:
        raise Misuse("leaf counts must be positive")
    pg = None
    if args.postgres:
        where = AuditSettings().store_at()
        if not isinstance(where, PgLocation):
            raise Misuse("--postgres: FRS_STATE_URL names no PostgreSQL database")
        pg = where
    result = await asyncio.to_thread(
        run, args.append_leaves, args.verify_leaves, tuple(args.batch or (50, 500)),
        Path(args.workdir) if args.workdir else None, pg=pg)
    lines = [f"batch {a['batch']:>5}: service {a['service_appends_per_s']:>7}/s, store "
             f"{a['store_appends_per_s']:>7}/s, raw append+fsync "
             f"{a['raw_append_fsync_per_s']:>7}/s (service/raw {a['service_ratio_vs_raw']})"
             for a in result["appends"]]
    lines += [f"batch {a['batch']:>5}: PostgreSQL service {a['service_appends_per_s']:>7}/s,"
              f" store {a['store_appends_per_s']:>7}/s (service vs SQLite "
              f"{a['service_vs_sqlite']})" for a in result.get("appends_postgres", [])]
    lines += [f"batch {a['batch']:>5}: PostgreSQL ingest+sequence {p['events_per_s']:>7}/s"
              f" (ingest {p['ingest_events_per_s']}/s, sequence {p['sequence_events_per_s']}"
              f"/s; vs SQLite single instance {p['vs_sqlite']}), {name}"
              for a in result.get("ingest_sequence_postgres", [])
              for name in ("store_path", "service") for p in (a[name],)]
    v = result["verify"]
    lines.append(f"verify {v['leaves']} leaves: {v['verify_s']}s (ok={v['ok']})")
    emit(args, result, "\n".join(lines))
    return 0


# --- parser ---------------------------------------------------------------------------


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="verify, replay and report on the audit log")
    cmds = audit.add_subparsers(dest="audit_command", required=True)

    verify = subcommand(cmds, "verify", "recompute the Merkle log, check every signed checkpoint",
                  "frs audit verify --json --vkey \"$(cat .state/keys/audit-checkpoint.vkey)\"",
                  cmd_verify)
    _store_args(verify)
    for p in (verify, vkey := subcommand(cmds, "vkey", "print the log's note verifier key",
                                   "frs audit vkey", cmd_vkey)):
        p.add_argument("--vkey", default=None, help="verifier key NAME+HASH+KEY (trusted)")
        p.add_argument("--vkey-file", default=None, help="file holding the verifier key")
    verify.add_argument("--origin", default=None, help="expected checkpoint origin line")
    verify.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                        help="a checkpoint note kept outside the store (repeat)")
    verify.add_argument("--checkpoints-from-kafka", action="store_true",
                        help="also check every checkpoint published on frs.audit.checkpoints")
    del vkey

    proof = subcommand(cmds, "proof", "print an inclusion proof bundle for one event",
                 "frs audit proof 3f1c...-event-id --out proof.json", cmd_proof)
    _store_args(proof)
    proof.add_argument("event_id", help="CloudEvents id of the event")
    proof.add_argument("--out", default=None, help="also write the bundle to this file")
    vproof = subcommand(cmds, "verify-proof", "check an inclusion proof bundle offline",
                  "frs audit verify-proof proof.json --vkey NAME+HASH+KEY", cmd_verify_proof)
    vproof.add_argument("bundle", help="file written by `frs audit proof --out`")
    vproof.add_argument("--vkey", default=None, help="verifier key NAME+HASH+KEY (trusted)")
    vproof.add_argument("--vkey-file", default=None, help="file holding the verifier key")

    replay = subcommand(cmds, "replay", "read every topic from the start and cross-check the store",
                  "frs audit replay --json --wait 30", cmd_replay)
    _store_args(replay)
    replay.add_argument("--probe", default=None, help="only this probe's events (timeline)")
    replay.add_argument("--case", default=None, help="only this case's probes (timeline)")
    replay.add_argument("--since", default=None, help="only events from this ISO time on")
    replay.add_argument("--wait", type=float, default=0.0,
                        help="seconds to let the audit service catch up")

    report = subcommand(cmds, "report", "accountability report: searches by provider, provider kind"
                  " and purpose, outcomes, denials by rule, rejections by reason, purge timeliness,"
                  " violations; the window is stated in words",
                  "frs audit report --json --from 2026-01-01 --to 2026-02-01", cmd_report)
    _store_args(report)
    report.add_argument("--from", dest="since", default=None, help="ISO start (inclusive)")
    report.add_argument("--to", dest="until", default=None, help="ISO end (exclusive)")
    bench = subcommand(group(commands, "bench", BENCH_HELP),
                 "audit", "audit log append throughput (fsync batching) and verify time",
                 "frs bench audit --json", cmd_bench)
    bench.add_argument("--append-leaves", type=int, default=100_000)
    bench.add_argument("--verify-leaves", type=int, default=1_000_000)
    bench.add_argument("--batch", type=int, action="append", default=None,
                       help="fsync batch size (repeat; default 50 and 500, the kit's batch_max)")
    bench.add_argument("--workdir", default=None, help="where the scratch stores go")
    bench.add_argument("--postgres", action="store_true",
                       help="also run the store and service paths, and the ingest+sequence "
                            "path of many instances, on the PostgreSQL database FRS_STATE_URL "
                            "names (an empty scratch log; emptied after)")

    report.add_argument("--format", choices=("text", "json", "csv", "html"), default="text",
                        help="output format (--json is the same as --format json)")
    report.add_argument("--out", default=None, help="write to this file instead of stdout")
    report.add_argument("--late-after", type=float, default=None,
                        help="seconds past expiry a purge counts as late "
                             "(default FRS_AUDIT_EXPIRY_GRACE_S)")

