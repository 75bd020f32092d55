"""``frs bench pipeline``: the whole pipeline against raw Kafka on the same broker, in one
invocation.

(a) baseline: raw aiokafka relays (one process per hop: consume, produce with acks=all,
    commit) move N messages through the same number of hops as the pipeline;
(b) the pipeline (intake -> policy -> dispatch -> vendor simulator -> results webhook ->
    results) at its maximum rate, N probes submitted at once;
(c) the pipeline at a fixed low rate (default 50 probes/s): per-stage and end-to-end
    latency;
and each service's resident memory at both loads. The ratio is (b)'s probes/s over (a)'s
messages/s: items through the same chain of hops per second.

``--store sqlite,postgres`` runs (b) and (c) once per store in the same invocation, the
PostgreSQL server started for it by deploy/postgres/pg.sh (from a checkout) on a free
port, schema applied, each service as its own role; the JSON then holds each store's
figures under ``by_store`` and PostgreSQL's throughput and p99 over SQLite's.

``--instances 1,2 --store postgres`` runs (b) and (c) once per N with N processes of each
service, each with its own state dir as on hosts of its own, sharing what hosts share
(PostgreSQL, the vault's S3 bucket and KMS key: s3proxy and moto's KMS started for the
run); the JSON holds each N's figures under ``by_instances`` and ``scaling_efficiency``,
probes/s at N=2 over twice N=1's."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.catalog import RESULTS_EVENTS, TOPICS, Topic
from schemas.envelope import Envelope
from schemas.events import (
    CandidatesReceived,
    PolicyCleared,
    ProbeSettled,
    ProbeSubmitted,
    ProviderDispatched,
)
from schemas.types import probe_id_for
from services.cli import bench_cost
from services.cli.common import Misuse
from services.cli.pipeline_rig import (
    ROOT,
    PipelineRig,
    Service,
    VaultServers,
    machine,
    percentile,
    process_cpu_s,
)
from services.kit.reader import all_partitions, read_topic
from services.kit.settings import ServiceSettings
from services.kit.topics import ensure_topics

# Only in a checkout of the repository: the servers are not part of the installed package.
BROKER_SCRIPT = ROOT / "deploy" / "kafka" / "broker.sh"
PG_SCRIPT = ROOT / "deploy" / "postgres" / "pg.sh"
STORES = ("sqlite", "postgres")
HOPS = 4  # intake, policy, dispatch (+ vendor + webhook), results normalizer
STAGES = (("submitted", ProbeSubmitted), ("cleared", PolicyCleared),
          ("dispatched", ProviderDispatched), ("candidates", CandidatesReceived),
          ("settled", ProbeSettled))
# The kit's default FRS_<SERVICE>_COMMIT_INTERVAL_S: the low-rate relay commits as often.
KIT_COMMIT_INTERVAL_S: float = ServiceSettings.model_fields["commit_interval_s"].default
# Issue 21: all-in CPU per probe (services + broker + this process) and the ratio.
COST_TARGETS = {"all_in_ms_max_rate": 10.0, "all_in_ms_low_rate": 15.0, "ratio_min": 0.25}
TARGETS = {"ratio_min": 0.30, "probes_per_s_min": 200.0, "p99_ms_max_at_low_rate": 250.0,
           "rss_mb_max": 300.0}


# --- (a) raw relay -----------------------------------------------------------------------


async def relay_hop(bootstrap: str, source: str, target: str, group: str, count: int,
                    commit_interval_s: float = 0.0) -> None:
    """One raw hop: what the kit's Processor does, minus decoding and handlers. It commits
    after every batch, or (``commit_interval_s`` > 0) at most that often, as the kit does
    (``FRS_<SERVICE>_COMMIT_INTERVAL_S``); it prints its CPU seconds from ready to done."""
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True,
                                acks="all", linger_ms=2, max_batch_size=256 * 1024,
                                max_request_size=16 * 1024 * 1024)
    await consumer.start()
    await producer.start()
    print("relay ready", flush=True)
    cpu0 = time.process_time()
    done = 0
    pending: dict[Any, int] = {}
    committed = time.monotonic()
    try:
        while done < count:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            futures = []
            for records in batch.values():
                for r in records:
                    futures.append(await producer.send(target, value=r.value, key=r.key,
                                                       headers=list(r.headers or ())))
                    done += 1
            if futures:
                await asyncio.gather(*futures)
                pending |= {tp: rs[-1].offset + 1 for tp, rs in batch.items()}
            if pending and (done >= count
                            or time.monotonic() - committed >= commit_interval_s):
                await consumer.commit(pending)
                pending, committed = {}, time.monotonic()
    finally:
        await producer.stop()
        await consumer.stop()
    print(f"relay cpu {time.process_time() - cpu0:.6f}", flush=True)


async def raw_baseline(bootstrap: str, count: int, first_bytes: bytes, event_bytes: int,
                       hops: int, rate: float | None = None, commit_interval_s: float = 0.0,
                       broker_pid: int | None = None) -> dict[str, Any]:
    """N messages through ``hops`` relay processes, sent at once or at ``rate``/s; their
    CPU all-in (relays, broker when known, this process's sender) per message."""
    run = uuid.uuid4().hex[:8]
    names = [f"frs.bench.raw-{run}.{i}" for i in range(hops + 1)]
    await ensure_topics(bootstrap, topics=tuple(
        Topic(n, "key", 3, 3_600_000, "delete", (), "bench relay") for n in names))
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.bench_pipeline", "relay-hop", bootstrap,
        names[i], names[i + 1], f"frs-bench-raw-{run}-{i}", str(count), str(commit_interval_s),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(hops)]
    relay_cpu = 0.0
    try:
        for p in procs:
            assert p.stdout is not None
            await p.stdout.readline()  # "relay ready"
        await asyncio.sleep(2)  # group joins settle
        other0 = other_cpu_s(broker_pid)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True,
                                    acks="all", linger_ms=2, max_request_size=16 * 1024 * 1024)
        await producer.start()
        filler = b"x" * event_bytes
        started = time.monotonic()
        try:
            # The first hop carries the request's size, later hops an event's size: the
            # relays forward what they get, so hop 0 messages are request-sized throughout
            # (a conservative baseline: it moves more bytes than the pipeline does).
            futures = []
            for i in range(count):
                if rate is not None:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                futures.append(await producer.send(names[0], value=first_bytes or filler,
                                                   key=f"k{i}".encode()))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        for p in procs:
            assert p.stdout is not None
            out = (await asyncio.wait_for(p.stdout.read(), 600)).decode().split()
            relay_cpu += float(out[-1]) if out[-2:-1] == ["cpu"] else 0.0
            await asyncio.wait_for(p.wait(), 60)
        seconds = time.monotonic() - started
        other = {n: c - other0[n] for n, c in other_cpu_s(broker_pid).items()}
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    cpu = {"relays": relay_cpu, **other}
    return {"messages": count, "hops": hops, "message_bytes": len(first_bytes),
            "rate_offered": rate, "seconds": round(seconds, 3),
            "messages_per_s": round(count / seconds, 1),
            "cpu_ms_per_message": {n: round(c * 1000 / count, 3) for n, c in cpu.items()},
            "all_in_cpu_ms_per_message": round(sum(cpu.values()) * 1000 / count, 3)}


# --- (b), (c) the pipeline --------------------------------------------------------------


class SettledWatch:
    """Follows frs.results.events from its current end; records ProbeSettled arrivals."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.arrived: dict[str, float] = {}  # probe id -> wall time seen
        self._task: asyncio.Task[None] | None = None
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def start(self) -> None:
        await self._consumer.start()
        parts = await all_partitions(self._consumer, [RESULTS_EVENTS.name])
        self._consumer.assign(parts)
        await self._consumer.seek_to_end(*parts)
        for tp in parts:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for r in records:
                    if dict(r.headers or ()).get("ce_type") == ProbeSettled.TYPE.encode():
                        self.arrived[(r.key or b"").decode()] = now

    async def wait(self, probes: set[str], timeout: float) -> bool:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not probes <= set(self.arrived):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


class RssSampler:
    """Peak VmRSS of each service while a phase runs."""

    def __init__(self, procs: dict[str, Service]) -> None:
        self.procs = procs
        self.peak: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.peak = {}
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for name, proc in self.procs.items():
                rss = proc.rss_mb().get("rss_mb")
                if rss is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), rss)
            await asyncio.sleep(0.25)

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return dict(self.peak)


def stage_latencies(records: Sequence[Any], rig: PipelineRig,
                    probes: set[str]) -> dict[str, dict[str, float | None]]:
    """Per stage: time from submission to the stage's event (its CloudEvents time)."""
    by_probe: dict[str, dict[str, float]] = {}
    request_of = {probe_id_for(r): r for r in rig.acked}
    for _raw, dec in records:
        if not isinstance(dec, Envelope) or dec.subject not in probes:
            continue
        for stage, cls in STAGES:
            if isinstance(dec.event, cls):
                by_probe.setdefault(dec.subject, {}).setdefault(stage, dec.time.timestamp())
    out: dict[str, dict[str, float | None]] = {}
    for stage, _cls in STAGES:
        values = [(times[stage] - rig.submitted_at[request_of[p]]) * 1000
                  for p, times in by_probe.items() if stage in times]
        out[stage] = {"p50": percentile(values, 50), "p95": percentile(values, 95),
                      "p99": percentile(values, 99), "n": len(values)}
    return out


def other_cpu_s(broker_pid: int | None) -> dict[str, float]:
    """CPU of what shares the machine with the services: the broker (when this bench
    started it) and this process (submitter, vendor simulator, settlement watch)."""
    out = {"bench_process": process_cpu_s(os.getpid())}
    if broker_pid is not None:
        out["broker"] = process_cpu_s(broker_pid)
    return out


async def pipeline_phase(rig: PipelineRig, watch: SettledWatch, count: int,
                         rate: float | None, tag: str,
                         broker_pid: int | None = None) -> dict[str, Any]:
    before = len(rig.acked)
    cpu0 = {n: p.cpu_s() for n, p in rig.procs.items()}
    other0 = other_cpu_s(broker_pid)
    steps0 = await bench_cost.snapshot(rig.procs)
    sampler = RssSampler(rig.procs)
    sampler.start()
    started = time.time()
    await rig.submit(count, rate, tag=tag)
    probes = {probe_id_for(r) for r in rig.acked[before:]}
    complete = await watch.wait(probes, timeout=120.0 + count / 5)
    last = max((watch.arrived[p] for p in probes if p in watch.arrived), default=time.time())
    seconds = last - started
    rss = await sampler.stop()
    cpu_by = {n: p.cpu_s() - cpu0[n] for n, p in rig.procs.items()}
    other = {n: c - other0[n] for n, c in other_cpu_s(broker_pid).items()}
    cpu = sum(cpu_by.values())
    e2e = [(watch.arrived[probe_id_for(r)] - rig.submitted_at[r]) * 1000
           for r in rig.acked[before:] if probe_id_for(r) in watch.arrived]
    # By step, with each service's whole process tree (its image workers too).
    cost = bench_cost.breakdown(steps0, await bench_cost.snapshot(rig.procs), len(e2e))
    cost["all_in_cpu_ms_per_probe"] = round(cost["services_cpu_ms_per_probe"] + sum(
        c * 1000 / max(1, len(e2e)) for c in other.values()), 2)
    return {"probes": count, "settled": sum(1 for p in probes if p in watch.arrived),
            "complete": complete, "rate_offered": rate, "seconds": round(seconds, 3),
            "probes_per_s": round(len(e2e) / seconds, 1) if seconds > 0 else None,
            "end_to_end_ms": {"p50": percentile(e2e, 50), "p95": percentile(e2e, 95),
                              "p99": percentile(e2e, 99)},
            "cpu_ms_per_probe": round(cpu * 1000 / max(1, len(e2e)), 2),
            "cpu_ms_per_probe_by_service": {n: round(c * 1000 / max(1, len(e2e)), 2)
                                            for n, c in cpu_by.items()},
            "cpu_ms_per_probe_outside_services": {n: round(c * 1000 / max(1, len(e2e)), 2)
                                                  for n, c in other.items()},
            "rss_peak_mb": rss, "cost": cost, "_probes": probes}


async def pipeline_run(bootstrap: str, services: tuple[str, ...], image: bytes,
                       broker_pid: int | None, warmup: int, low_rate: float,
                       low_probes: int, probes: int,
                       service_env: dict[str, dict[str, str]], instances: int = 1,
                       extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """(b) and (c) on one store: warm-up, the low-rate phase, then the max-rate phase."""
    workdir = Path(tempfile.mkdtemp(prefix="frs-bench-pipeline-"))
    failed = True
    try:
        result = await _pipeline_run(workdir, bootstrap, services, image, broker_pid, warmup,
                                     low_rate, low_probes, probes, service_env, instances,
                                     extra_env)
        failed = False
        return result
    finally:
        discard(workdir, failed)


def discard(path: Path, failed: bool) -> None:
    """A run's directory goes when the run ends: it holds the keys beside the images they
    open (and ``--image`` may be a real photo). After a failure its logs stay, for the
    reader of the error, and nothing else."""
    if not failed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in sorted(path.rglob("*"), reverse=True):  # children before their parents
        if entry.is_dir() and not entry.is_symlink():
            with contextlib.suppress(OSError):  # a directory that keeps a log stays
                entry.rmdir()
        elif entry.suffix != ".log" or entry.is_symlink():
            entry.unlink(missing_ok=True)
    sys.stderr.write(f"frs: the failed run's logs are kept in {path}\n")


async def _pipeline_run(workdir: Path, bootstrap: str, services: tuple[str, ...],
                        image: bytes, broker_pid: int | None, warmup: int, low_rate: float,
                        low_probes: int, probes: int,
                        service_env: dict[str, dict[str, str]], instances: int,
                        extra_env: dict[str, str] | None) -> dict[str, Any]:
    rig = PipelineRig(bootstrap, workdir, image, services=services, service_env=service_env,
                      instances=instances, extra_env=extra_env or {})
    await rig.start()
    watch = SettledWatch(bootstrap)
    await watch.start()
    try:
        # Warm-up: connections, registries, the vendor's TLS sessions, and the broker's JIT
        # (on a cold JVM the broker spent 4x the CPU per probe of a warm one).
        await pipeline_phase(rig, watch, warmup, None, "w")
        low = await pipeline_phase(rig, watch, low_probes, low_rate, "l", broker_pid)
        high = await pipeline_phase(rig, watch, probes, None, "h", broker_pid)
        records = await read_topic(bootstrap, [t.name for t in TOPICS
                                               if t.name.startswith(("frs.probe.", "frs.policy.",
                                                                     "frs.dispatch.",
                                                                     "frs.results."))],
                                   max_s=300)
        low["stages_ms"] = stage_latencies(records, rig, low.pop("_probes"))
        high["stages_ms"] = stage_latencies(records, rig, high.pop("_probes"))
        request_bytes = next((len(r.value or b"") for r, d in records
                              if r.topic == "frs.probe.requests"), 0)
        peaks = {n: p.rss_mb().get("peak_rss_mb") for n, p in rig.procs.items()}
        # Distinct live processes per service at the end: proof that N instances ran.
        processes = {n: len({p.proc.pid for p in rig.procs.values()
                             if p.name == n and p.alive and p.proc is not None})
                     for n in services}
    finally:
        await watch.stop()
        await rig.stop()
    rss = {n: {"low_load": low["rss_peak_mb"].get(n), "max_load": high["rss_peak_mb"].get(n),
               "process_peak": peaks.get(n)} for n in services}
    return {"pipeline_max_rate": high, "pipeline_low_rate": low, "rss_mb": rss,
            "request_bytes": request_bytes, "instances": instances, "processes": processes}


async def run_bench(bootstrap: str, probes: int, low_rate: float, low_probes: int,
                    with_audit: bool, image: bytes,
                    broker_pid: int | None = None, warmup: int = 300,
                    stores: Sequence[str] = ("sqlite",),
                    store_env: dict[str, dict[str, dict[str, str]]] | None = None,
                    instances: Sequence[int] = (1,), vault_env: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    await ensure_topics(bootstrap)
    services = ("intake", "dispatch", "results", "audit") if with_audit \
        else ("intake", "dispatch", "results")
    runs = {store: await pipeline_run(bootstrap, services, image, broker_pid, warmup,
                                      low_rate, low_probes, probes,
                                      (store_env or {}).get(store, {}), instances[0], vault_env)
            for store in stores}
    # Each further N: the same phases on the (one) store with N processes per service.
    scaled = {instances[0]: runs[stores[0]]}
    for n in instances[1:]:
        scaled[n] = await pipeline_run(bootstrap, services, image, broker_pid, warmup,
                                       low_rate, low_probes, probes,
                                       (store_env or {}).get(stores[0], {}), n, vault_env)
    sample = await read_topic(bootstrap, ["frs.probe.requests"], max_s=60)
    request = next((r.value for r, d in sample if isinstance(d, Envelope)), b"") or b""
    raw = await raw_baseline(bootstrap, probes, request, 1024, HOPS, broker_pid=broker_pid)
    # The floor at the low rate: the same hops, nothing else, committing as the kit does.
    raw_low = await raw_baseline(bootstrap, low_probes, request, 1024, HOPS, low_rate,
                                 KIT_COMMIT_INTERVAL_S, broker_pid)
    for run in [*runs.values(), *scaled.values()]:
        high = run["pipeline_max_rate"]
        run["ratio_pipeline_to_raw"] = round(high["probes_per_s"] / raw["messages_per_s"], 3) \
            if high["probes_per_s"] else None
    first = runs[stores[0]]
    high, low, ratio = first["pipeline_max_rate"], first["pipeline_low_rate"], \
        first["ratio_pipeline_to_raw"]
    worst_rss = max((v for r in first["rss_mb"].values() for v in r.values() if v is not None),
                    default=0)
    result: dict[str, Any] = {
        "bench": "pipeline", "machine": machine(), "hops": HOPS, "services": list(services),
        "warmup_probes": warmup, "store": stores[0],
        "request_bytes": first["request_bytes"] or len(request),
        "baseline_raw_relay": raw, "baseline_raw_relay_low_rate": raw_low,
        "pipeline_max_rate": high, "pipeline_low_rate": low,
        "rss_mb": first["rss_mb"],
        "ratio_pipeline_to_raw": ratio,
        "targets": TARGETS,
        "met": {
            "ratio": ratio is not None and ratio >= TARGETS["ratio_min"],
            "probes_per_s": (high["probes_per_s"] or 0) >= TARGETS["probes_per_s_min"],
            "p99_at_low_rate": (low["end_to_end_ms"]["p99"] or 1e9)
            < TARGETS["p99_ms_max_at_low_rate"],
            "rss": worst_rss <= TARGETS["rss_mb_max"],
        },
        "cost_targets": COST_TARGETS,
        "met_cost": cost_met(high, low, ratio),
        # What the same hops cost with no work in them, at each phase's rate: a floor the
        # pipeline's all-in figure cannot go under (it moves at least as many records).
        "relay_floor_ms_per_item": {
            "max_rate": raw["all_in_cpu_ms_per_message"],
            "low_rate": raw_low["all_in_cpu_ms_per_message"]},
    }
    if len(scaled) > 1:
        result |= scaling(scaled)
    if len(runs) > 1:
        result["by_store"] = runs
        result["postgres_to_sqlite"] = store_ratios(runs["sqlite"], runs["postgres"]) \
            if {"sqlite", "postgres"} <= set(runs) else None
    return result


def cost_met(high: dict[str, Any], low: dict[str, Any], ratio: float | None) -> dict[str, bool]:
    """Issue 21's targets, judged on one run (all-in needs the broker's CPU: --own-broker)."""
    def all_in(phase: dict[str, Any]) -> float:
        return float(phase["cost"]["all_in_cpu_ms_per_probe"])

    return {"all_in_max_rate": all_in(high) <= COST_TARGETS["all_in_ms_max_rate"],
            "all_in_low_rate": all_in(low) <= COST_TARGETS["all_in_ms_low_rate"],
            "ratio": ratio is not None and ratio >= COST_TARGETS["ratio_min"]}


def scaling(scaled: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Figures per N, and the scaling efficiency: probes/s at N=2 over twice N=1's."""
    by_n = {str(n): {"instances": n, "processes": run["processes"],
                     "probes_per_s": run["pipeline_max_rate"]["probes_per_s"],
                     "p99_ms_at_max_rate": run["pipeline_max_rate"]["end_to_end_ms"]["p99"],
                     "p99_ms_at_low_rate": run["pipeline_low_rate"]["end_to_end_ms"]["p99"],
                     "cpu_ms_per_probe": run["pipeline_max_rate"]["cpu_ms_per_probe"],
                     **run} for n, run in scaled.items()}
    one, two = scaled.get(1), scaled.get(2)
    efficiency = None
    if one is not None and two is not None and one["pipeline_max_rate"]["probes_per_s"]:
        efficiency = round((two["pipeline_max_rate"]["probes_per_s"] or 0)
                           / (2 * one["pipeline_max_rate"]["probes_per_s"]), 3)
    return {"by_instances": by_n, "scaling_efficiency": efficiency}


def store_ratios(sqlite: dict[str, Any], postgres: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL over SQLite, same run: throughput (target >= 0.8) and p99 at low rate."""
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    pg_high, sq_high = postgres["pipeline_max_rate"], sqlite["pipeline_max_rate"]
    throughput = div(pg_high["probes_per_s"], sq_high["probes_per_s"])
    return {"probes_per_s": throughput,
            "p99_ms_at_low_rate": div(postgres["pipeline_low_rate"]["end_to_end_ms"]["p99"],
                                      sqlite["pipeline_low_rate"]["end_to_end_ms"]["p99"]),
            "p99_ms_at_max_rate": div(pg_high["end_to_end_ms"]["p99"],
                                      sq_high["end_to_end_ms"]["p99"]),
            "target_probes_per_s_min": 0.8,
            "met": throughput is not None and throughput >= 0.8}


async def cmd_bench_pipeline(args: argparse.Namespace, settings: Any) -> int:
    if args.probes < 1 or args.low_rate <= 0 or args.low_probes < 1 or args.warmup < 1:
        sys.stderr.write("frs: --probes, --low-rate, --low-probes, --warmup must be positive\n")
        return 2
    image = Path(args.image).read_bytes() if args.image else default_image()
    bootstrap = settings.kafka_bootstrap
    broker_env: dict[str, str] | None = None
    broker_pid: int | None = None
    stores = tuple(dict.fromkeys(s.strip() for s in args.store.split(",") if s.strip()))
    if not stores or not set(stores) <= set(STORES):
        raise Misuse(f"--store takes {' or '.join(STORES)}, or both comma-separated; "
                     f"not {args.store!r}")
    instances = parse_instances(args.instances, stores)
    if "postgres" in stores and not PG_SCRIPT.is_file():
        raise Misuse("--store postgres starts deploy/postgres/pg.sh from a checkout of the "
                     "repository, which this installation is not: run it there")
    if args.own_broker:
        if not BROKER_SCRIPT.is_file():
            raise Misuse("--own-broker starts deploy/kafka/broker.sh from a checkout of the "
                         "repository, which this installation is not: run it there, or "
                         "give a broker with FRS_KAFKA_BOOTSTRAP")
        env, bootstrap = await asyncio.to_thread(start_own_broker)
        broker_env = env
        broker_pid = int((Path(env["FRS_KAFKA_STATE"]) / "broker.pid").read_text())
    pg_env: dict[str, str] | None = None
    vault = VaultServers(Path(tempfile.mkdtemp(prefix="frs-bench-vault-"))) \
        if max(instances) > 1 else None
    try:
        store_env: dict[str, dict[str, dict[str, str]]] = {}
        if "postgres" in stores:
            pg_env, store_env["postgres"] = await asyncio.to_thread(start_own_postgres)
        # Many instances share the vault as many hosts do (S3, KMS); every N uses it, so
        # N=1 and N=2 differ only in the number of processes.
        vault_env = await asyncio.to_thread(vault.start) if vault is not None else None
        result = await run_bench(bootstrap, args.probes, args.low_rate, args.low_probes,
                                 args.with_audit, image, broker_pid, args.warmup, stores,
                                 store_env, instances, vault_env)
    finally:
        if vault is not None:
            await asyncio.to_thread(vault.stop)
            discard(vault.state, failed=False)
        for script, script_env, state in ((BROKER_SCRIPT, broker_env, "FRS_KAFKA_STATE"),
                                          (PG_SCRIPT, pg_env, "FRS_PG_STATE")):
            if script_env is not None:
                await asyncio.to_thread(subprocess.run, [str(script), "stop"], env=script_env,
                                        check=False, capture_output=True)
                # The broker's log segments hold the run's (encrypted) requests; pg's own
                # state dir sits in a temp dir made for it.
                directory = Path(script_env[state])
                discard(directory if state == "FRS_KAFKA_STATE" else directory.parent,
                        failed=False)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        high, low, raw = (result["pipeline_max_rate"], result["pipeline_low_rate"],
                          result["baseline_raw_relay"])
        sys.stdout.write(
            f"pipeline {high['probes_per_s']} probes/s, raw relay {raw['messages_per_s']} "
            f"msgs/s through {raw['hops']} hops, ratio {result['ratio_pipeline_to_raw']}; "
            f"p99 at {low['rate_offered']}/s {low['end_to_end_ms']['p99']} ms; "
            f"peak RSS {result['rss_mb']} ({result['machine']['nproc']} cpus)\n")
        floor = result["relay_floor_ms_per_item"]
        sys.stdout.write(
            f"all-in CPU ms a probe: {high['cost']['all_in_cpu_ms_per_probe']} at max rate, "
            f"{low['cost']['all_in_cpu_ms_per_probe']} at {low['rate_offered']}/s; the raw "
            f"relay's a message: {floor['max_rate']} and {floor['low_rate']}\n")
        sys.stdout.write(bench_cost.table({"max rate": high["cost"],
                                           f"{low['rate_offered']}/s": low["cost"]}))
        if result.get("postgres_to_sqlite"):
            ratios = result["postgres_to_sqlite"]
            sys.stdout.write(f"postgres / sqlite: throughput {ratios['probes_per_s']}, "
                             f"p99 at low rate {ratios['p99_ms_at_low_rate']}\n")
        for n, run in result.get("by_instances", {}).items():
            sys.stdout.write(f"N={n}: {run['probes_per_s']} probes/s, p99 "
                             f"{run['p99_ms_at_max_rate']} ms\n")
        if "scaling_efficiency" in result:
            sys.stdout.write(f"scaling efficiency {result['scaling_efficiency']}\n")
    return 0


def parse_instances(text: str, stores: Sequence[str]) -> tuple[int, ...]:
    """--instances: one N or several comma-separated, each >= 1; N > 1 on postgres only
    (instances on separate hosts share their state there, not in a state dir)."""
    try:
        instances = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        instances = ()
    if not instances or min(instances) < 1:
        raise Misuse(f"--instances takes numbers >= 1, comma-separated; not {text!r}")
    if max(instances) > 1 and tuple(stores) != ("postgres",):
        raise Misuse("--instances above 1 needs --store postgres (alone): instances on "
                     "separate hosts share their state in PostgreSQL")
    return instances


def start_own_broker() -> tuple[dict[str, str], str]:
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        break
    env = {**os.environ, "FRS_KAFKA_PORT": str(port),
           "FRS_KAFKA_STATE": tempfile.mkdtemp(prefix="frs-bench-kafka-")}
    subprocess.run([str(BROKER_SCRIPT), "start"], env=env,
                   check=True, capture_output=True, timeout=300)
    return env, f"127.0.0.1:{port}"


def start_own_postgres() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """A PostgreSQL server for the run (pg.sh, temp state, free port), this build's schema
    applied as the owner; its script env and each service's FRS_STATE_* settings."""
    import psycopg

    from services.kit.migrate import migrate
    from services.kit.state import read_password

    state = Path(tempfile.mkdtemp(prefix="frs-bench-pg-"))
    state.chmod(0o711)  # the server's OS user enters it; nobody lists it
    env = {**os.environ, "FRS_PG_STATE": str(state / "pg"),
           "FRS_PG_PORT": str(start_port())}
    subprocess.run([str(PG_SCRIPT), "start"], env=env, check=True, capture_output=True,
                   timeout=600)

    def settings(role: str) -> dict[str, str]:
        lines = (state / "pg" / "env" / f"{role}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    owner = settings("owner")

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(
                owner["FRS_STATE_URL"],
                password=read_password(Path(owner["FRS_STATE_PASSWORD_FILE"]))) as conn:
            await migrate(conn)

    asyncio.run(apply())
    return env, {role: settings(role) for role in ("intake", "dispatch", "results", "audit")}


def start_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_image() -> bytes:
    """A small real face photo: scikit-image's astronaut cropped to her head (175 px, about
    8 KB as JPEG; the face is ~98 px, above the quality gate's 64 px minimum)."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    photo = data.astronaut()  # type: ignore[no-untyped-call]
    Image.fromarray(photo).crop((137, 26, 312, 201)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _bench_commands(commands: Any) -> Any:
    """The ``bench`` group's subparsers, shared with other areas' benchmarks."""
    existing = commands.choices.get("bench")
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    bench = commands.add_parser("bench", help="benchmarks, as JSON with same-run baselines")
    return bench.add_subparsers(dest="bench_command", required=True)


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = _bench_commands(commands).add_parser(
        "pipeline", help="the whole pipeline vs a raw aiokafka relay of as many hops",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  frs bench pipeline --json --probes 2000 --low-rate 50\n"
               "  frs bench pipeline --json --own-broker --store sqlite,postgres\n"
               "  frs bench pipeline --json --own-broker --store postgres --instances 1,2",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--probes", type=int, default=1000, help="probes at max rate; as "
                        "many messages for the raw relay")
    parser.add_argument("--low-rate", type=float, default=50.0, help="probes/s, latency phase")
    parser.add_argument("--low-probes", type=int, default=500, help="probes, latency phase")
    parser.add_argument("--warmup", type=int, default=300,
                        help="probes first, unmeasured (connections, the broker's JIT)")
    parser.add_argument("--with-audit", action="store_true",
                        help="also run the audit service (it reads every topic)")
    parser.add_argument("--own-broker", action="store_true",
                        help="start a fresh broker for the run (deploy/kafka/broker.sh)")
    parser.add_argument("--image", default=None, help="probe photo (default: a 175 px face)")
    parser.add_argument("--store", default="sqlite", metavar="sqlite|postgres|sqlite,postgres",
                        help="where the services keep their state; both: one run each, "
                        "compared (postgres starts its own server from a checkout)")
    parser.add_argument("--instances", default="1", metavar="N[,N...]",
                        help="processes per service; several: one run each (e.g. 1,2), "
                        "with the scaling efficiency; above 1 needs --store postgres and "
                        "starts s3proxy and a KMS (moto) for the shared vault")
    parser.set_defaults(func=cmd_bench_pipeline)


def _relay_main(argv: Sequence[str]) -> None:
    bootstrap, source, target, group, count, interval = argv
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.run(relay_hop(bootstrap, source, target, group, int(count), float(interval)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay-hop":
        _relay_main(sys.argv[2:])
