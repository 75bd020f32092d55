"""``frs bench dispatch``: sends in flight and sends/s of one dispatch process against the
HTTPS vendor simulator with simulated latency, next to raw aiohttp sends to the same
simulator in the same run (the baseline). Also the synthetic clearances it (and the
dispatch tests) publish: what intake and policy would emit for a probe."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.catalog import POLICY_DECISIONS
from schemas.decisions import sign, trusted_key
from schemas.events import (
    ClaimCheck,
    ClearedProvider,
    DecisionInputs,
    Event,
    PolicyCleared,
    PolicyRequest,
    ProbeSubmitted,
    ProviderRecord,
    RegistryVersions,
    TrustedKey,
)
from schemas.types import ImageSource, OutboundField, Purpose, Transport
from services.cli.common import BENCH_HELP, group, subcommand
from services.dispatch.transports.https import client_tls_context
from services.kit.kafka import client_options
from services.kit.publisher import Publisher
from services.kit.reader import all_partitions
from services.kit.settings import ServiceSettings
from services.kit.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]


def synthetic_clearance(probe_id: str, cleared: Sequence[ClearedProvider], *,
                        agent_id: str = "agent-7", vault_ref: str | None = None,
                        now: datetime | None = None, key: Ed25519PrivateKey | None = None
                        ) -> tuple[ProbeSubmitted, PolicyCleared]:
    """A probe and its clearance as intake and policy would emit them; signed with ``key``
    (dispatch sends only when that key is enrolled in frs.registry.trusted_keys). Its
    inputs name the probe's purpose and a stand-in entry per provider allowing it."""
    now = now or datetime.now(UTC)
    submitted = ProbeSubmitted(
        probe_id=probe_id, request_id=f"req-{probe_id}", case_id="CASE-1", agent_id=agent_id,
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
        image_source=ImageSource.SURVEILLANCE, nexus=[], exigent=False,
        unedited_attestation=True, vault_ref=vault_ref or f"vault:{probe_id}",
        image_format="jpeg", received_sha256="0" * 64, sanitized_sha256="0" * 64,
        expires_at=now + timedelta(hours=1), submitted_at=now)
    inputs = DecisionInputs(
        request=PolicyRequest(agent_id=agent_id, case_id="CASE-1", purpose=submitted.purpose,
                              roi_refs=["ROI-1"], nexus=[], unedited_attestation=True),
        evaluated_at=now, providers=[ProviderRecord(
            provider_id=c.provider_id, name=c.provider_id, kind="commercial",
            transport=c.transport, endpoint="-", updated_at=now) for c in cleared])
    decision = PolicyCleared(
        probe_id=probe_id, case_id="CASE-1", cleared=list(cleared), policy_digest="0" * 64,
        registry_versions=RegistryVersions(), decided_at=now, inputs=inputs,
        claim=ClaimCheck(vault_ref=submitted.vault_ref, agent_id=agent_id,
                         sanitized_sha256=submitted.sanitized_sha256,
                         expires_at=submitted.expires_at))
    if key is not None:
        signed = sign(decision, key)
        assert isinstance(signed, PolicyCleared)
        decision = signed
    return submitted, decision


def cleared(provider_id: str, transport: Transport,
            fields: Sequence[OutboundField] = tuple(OutboundField)) -> ClearedProvider:
    return ClearedProvider(provider_id=provider_id, transport=transport, fields=list(fields))


def _test_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 100, 90)).save(buf, format="JPEG")
    return buf.getvalue()


async def _sim_state(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/_sim/state") as r:
        state: dict[str, Any] = await r.json()
        return state


async def _wait_accepted(session: aiohttp.ClientSession, base: str, n: int,
                         timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = await _sim_state(session, base)
        if state["accepted"] >= n or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.25)


def _summary(state: dict[str, Any], n: int) -> dict[str, Any]:
    busy = state.get("busy_s") or 0.0
    return {"sends": state["accepted"], "expected": n, "seconds": round(busy, 3),
            "sends_per_s": round(state["accepted"] / busy, 1) if busy else 0.0,
            "peak_in_flight": state["peak_in_flight"]}


async def _baseline(session: aiohttp.ClientSession, url: str, n: int, concurrency: int,
                    photo: bytes) -> None:
    """Raw aiohttp sends of the same body shape, ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        ref = f"ref-{uuid.uuid4()}"
        body = {"photo": base64.b64encode(photo).decode(), "agent_id": "agent-7",
                "request_ref": ref}
        async with slots, session.post(url, json=body,
                                       headers={"Idempotency-Key": f"base-{i}-{ref}"}) as r:
            await r.read()
    await asyncio.gather(*(one(i) for i in range(n)))


async def start_groups_at_end(bootstrap: str, groups: list[tuple[str, str]],
                              timeout_s: float = 60.0) -> None:
    """Commit each group at its topic's end. A group still holding a member that died
    (until its session times out) refuses a commit from outside: retried meanwhile."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    for group_id, topic in groups:
        while True:
            consumer = AIOKafkaConsumer(**client_options(bootstrap=bootstrap),
                                        group_id=group_id, enable_auto_commit=False)
            await consumer.start()
            try:
                partitions = await all_partitions(consumer, [topic])
                consumer.assign(partitions)
                end = await consumer.end_offsets(partitions)
                await consumer.commit({tp: offset for tp, offset in end.items()})
                break
            except KafkaError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            finally:
                await consumer.stop()
            await asyncio.sleep(1.0)


def _spawn(module_args: list[str], env: dict[str, str], stdout: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *module_args], cwd=ROOT, env=env,
                            stdout=stdout, stderr=subprocess.DEVNULL)


async def cmd_bench_dispatch(args: argparse.Namespace, settings: ServiceSettings) -> int:
    await ensure_topics(settings.kafka_bootstrap)
    run_id = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="frs-bench-dispatch-") as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "probe.jpg"
        image.write_bytes(_test_jpeg())
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        vendor = _spawn(["services.simulators.vendor", "--latency", str(args.latency),
                         "--pki-dir", str(tmp / "pki")], env, subprocess.PIPE)
        dispatch: subprocess.Popen[bytes] | None = None
        provider_id = f"bench-{run_id}"
        try:
            assert vendor.stdout is not None
            info = json.loads(await asyncio.to_thread(vendor.stdout.readline))
            url, ca_file = info["url"], info["ca_file"]
            base = url.rsplit("/", 1)[0]
            tls = client_tls_context(Path(ca_file))
            connector = aiohttp.TCPConnector(ssl=tls, limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                await _baseline(session, url, args.probes, args.in_flight, image.read_bytes())
                baseline = _summary(await _sim_state(session, base), args.probes)
                async with session.post(f"{base}/_sim/reset") as r:
                    await r.read()
                now = datetime.now(UTC)
                record = ProviderRecord(
                    provider_id=provider_id, name="bench vendor (simulated)",
                    kind="commercial", transport=Transport.HTTPS, endpoint=url,
                    attestation_valid_until=now + timedelta(days=1), updated_at=now)
                # The clearance carries its claim check: dispatch needs nothing else. It is
                # signed with a key of this run, enrolled as the operator would.
                key = Ed25519PrivateKey.generate()
                trust = TrustedKey.model_validate({**trusted_key(key.public_key()),
                                                   "updated_at": now})
                decisions: list[Event] = [
                    synthetic_clearance(f"prb-bench-{run_id}-{i}",
                                        [cleared(provider_id, Transport.HTTPS)], now=now,
                                        key=key)[1]
                    for i in range(args.probes)]
                group = f"frs-bench-{run_id}"
                # Only this run's clearances: the group starts at the current log end.
                await start_groups_at_end(settings.kafka_bootstrap,
                                          [(group, POLICY_DECISIONS.name)])
                async with Publisher(settings.kafka_bootstrap, source="/frs/bench") as pub:
                    await pub.publish([record, trust])
                    await pub.publish(decisions)
                dispatch = _spawn(
                    ["services.dispatch"],
                    {**env, "FRS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                         "FRS_STATE_DIR": str(tmp / "state"),
                         "FRS_DISPATCH_GROUP_ID": group,
                         "FRS_DISPATCH_INSTANCE_ID": "bench",
                         "FRS_DISPATCH_METRICS_PORT": "0",
                         "FRS_DISPATCH_IMAGE_SOURCE": "test-file",
                         "FRS_DISPATCH_TEST_IMAGE_FILE": str(image),
                         "FRS_DISPATCH_CA_FILE": ca_file,
                         "FRS_DISPATCH_CONCURRENCY": str(max(args.in_flight * 2, 64)),
                         "FRS_DISPATCH_PROVIDER_CONCURRENCY": str(args.in_flight),
                         "FRS_DISPATCH_BATCH_MAX": str(max(args.probes, 500)),
                         "FRS_LOG_LEVEL": "WARNING"},
                    subprocess.DEVNULL)
                state = await _wait_accepted(session, base, args.probes, args.timeout)
                measured = _summary(state, args.probes)
                async with Publisher(settings.kafka_bootstrap, source="/frs/bench") as pub:
                    await pub.publish([record.model_copy(update={
                        "status": "suspended", "updated_at": datetime.now(UTC)})])
        finally:
            for proc in (dispatch, vendor):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.to_thread(proc.wait, 30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    ratio = (measured["sends_per_s"] / baseline["sends_per_s"]) if baseline["sends_per_s"] \
        else 0.0
    ok = measured["sends"] == args.probes and measured["peak_in_flight"] >= args.min_in_flight
    payload = {"bench": "dispatch", "latency_s": args.latency, "probes": args.probes,
               "target_in_flight": args.in_flight, "dispatch": measured,
               "baseline_raw_aiohttp": baseline, "ratio_sends_per_s": round(ratio, 3),
               "min_in_flight": args.min_in_flight, "ok": ok}
    if args.json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(
            f"dispatch: {measured['sends_per_s']} sends/s, peak {measured['peak_in_flight']} "
            f"in flight ({measured['sends']}/{args.probes} sent)\n"
            f"baseline: {baseline['sends_per_s']} sends/s, peak "
            f"{baseline['peak_in_flight']} in flight\nratio: {ratio:.3f}  "
            f"{'ok' if ok else 'BELOW TARGET'}\n")
    return 0 if ok else 1


def register(commands: Any) -> None:
    bench_cmds = group(commands, "bench", BENCH_HELP)
    p = subcommand(bench_cmds, "dispatch",
             "sends in flight and sends/s of one dispatch process vs raw aiohttp",
             "frs bench dispatch --json --latency 1 --probes 600", cmd_bench_dispatch)
    p.add_argument("--latency", type=float, default=1.0, help="vendor latency per send, s")
    p.add_argument("--probes", type=int, default=600, help="sends to make")
    p.add_argument("--in-flight", type=int, default=256, help="per-provider send limit")
    p.add_argument("--min-in-flight", type=int, default=200, help="target peak (exit 1 below)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after, s")
