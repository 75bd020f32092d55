"""`frs bench audit`: append throughput with fsync batching, and verify time at scale.

The baseline, measured in the same run on the same disk, is a plain sequential file
append of the very same leaf bytes with one fsync per batch: the ratio says what the
index, the hashing and the Merkle frontier cost on top of the unavoidable disk work.

With a PostgreSQL location (``--postgres``), the store and service paths also run on
PgAuditStore, interleaved with the SQLite runs, so both figures come from the same run.
That log must be empty (a scratch database): each run deletes what it wrote. So does
the path of many instances (sequencer.py): ingest into the queue, batch by batch, then
the lease holder's sequencing of it (leaves, tree, invariants), each stage timed."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.catalog import topic_for
from schemas.decisions import sign, trusted_key
from schemas.envelope import Envelope, Headers, decode, encode
from schemas.events import (
    Candidate,
    CandidatesReceived,
    ClearedProvider,
    DecisionInputs,
    Event,
    PolicyCleared,
    PolicyRequest,
    ProbeRequested,
    ProbeSettled,
    ProbeSubmitted,
    ProviderAnswered,
    ProviderDispatched,
    ProviderRecord,
    RegistryVersions,
    TrustedKey,
)
from schemas.types import MINIMAL_FIELDS, ImageSource, Purpose, Transport
from services.audit import handlers
from services.audit.checkpoint import Signer, Verifier
from services.audit.invariants import Invariants, InvariantSettings
from services.audit.store import AuditLog, LeafMeta, PgLocation, canonical, open_store
from services.audit.verify import verify_store

ORIGIN = "frs-broker.bench/audit"


def _body(i: int) -> tuple[LeafMeta, dict[str, Any]]:
    # About the size of a real ProviderDispatched leaf (~700 bytes).
    pid = f"prb-{i:012d}-5b1c-4a57-9d0e-2f3c4b5a6d7e"
    meta = LeafMeta("frs.dispatch.events", i % 3, i, f"ev-{i}", "frs.provider.dispatched.v1",
                    pid, "2026-03-01T12:00:00+00:00")
    body = {"topic": meta.topic, "partition": meta.partition, "offset": i, "id": meta.ce_id,
            "source": "/frs/dispatch", "type": meta.ce_type, "subject": pid,
            "time": meta.time, "causationid": f"cause-{i}",
            "traceparent": f"00-{i:032x}-{i:016x}-01",
            "value_sha256": f"{i:064x}",
            "data": {"probe_id": pid, "provider_id": "fed-ngi", "dispatch_id": f"d-{i}",
                     "transport": "https", "fields_sent": ["photo", "agent_id", "request_ref"],
                     "request_ref": f"ref-{i:024d}", "sent_at": meta.time,
                     "response_due_at": meta.time, "deletion_due_at": meta.time,
                     "schema_version": 1}}
    return meta, body


def _appends(directory: Path | PgLocation, n: int, batch: int,
             on_batch: Callable[[AuditLog], None] | None = None) -> tuple[float, float]:
    """Store path: leaf bytes, index row, hash, frontier; fsync (or a commit) per batch.
    (wall, cpu) s."""
    bodies = [_body(i) for i in range(n)]
    store = open_store(directory)
    started, cpu = time.perf_counter(), time.process_time()
    for i, (meta, body) in enumerate(bodies):
        store.append(meta, body)
        if (i + 1) % batch == 0:
            store.commit()
            if on_batch is not None:
                on_batch(store)
    store.commit()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    store.close()
    return elapsed, cpu


_POLICY_KEY = Ed25519PrivateKey.generate()


def _inputs(now: datetime) -> DecisionInputs:
    return DecisionInputs(
        request=PolicyRequest(agent_id="agent-7", case_id="CASE-1",
                              purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"], nexus=[],
                              unedited_attestation=True),
        evaluated_at=now, providers=[ProviderRecord(
            provider_id="fed-ngi", name="fed", kind="federal", transport=Transport.HTTPS,
            endpoint="https://127.0.0.1/", updated_at=now)])


def _lifecycle(i: int, now: datetime) -> list[Event]:
    """One probe's events through the pipeline, as the audit service sees them."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from schemas.sealed import encrypt_image

    rid, pid = f"req-{i:012d}", f"prb-{i:012d}-5b1c-4a57-9d0e-2f3c4b5a6d7e"
    fields = list(MINIMAL_FIELDS)
    common: dict[str, Any] = {"case_id": "CASE-1", "agent_id": "agent-7",
                              "purpose": Purpose.FINANCIAL_FRAUD,
                              "roi_refs": ["ROI-1"], "image_source": ImageSource.SURVEILLANCE}
    return [
        ProbeRequested(request_id=rid, unedited_attestation=True, **common,
                       image=encrypt_image(b"\xff\xd8" + os.urandom(2048),
                                           X25519PrivateKey.generate().public_key(), rid)),
        ProbeSubmitted(probe_id=pid, request_id=rid, nexus=[], exigent=False,
                       unedited_attestation=True, vault_ref=f"v/{pid}", image_format="jpeg",
                       received_sha256="0" * 64, sanitized_sha256="0" * 64,
                       expires_at=now + timedelta(days=1), submitted_at=now,
                       **common),
        # Signed, with its inputs, as the policy gate publishes it: the invariants verify it.
        sign(PolicyCleared(probe_id=pid, case_id="CASE-1", policy_digest="0" * 64,
                           cleared=[ClearedProvider(provider_id="fed-ngi",
                                                    transport=Transport.HTTPS, fields=fields)],
                           registry_versions=RegistryVersions(), decided_at=now,
                           inputs=_inputs(now)), _POLICY_KEY),
        ProviderDispatched(probe_id=pid, provider_id="fed-ngi", dispatch_id=f"d-{i}",
                           transport=Transport.HTTPS, fields_sent=fields,
                           request_ref=f"ref-{i:024d}", sent_at=now, response_due_at=now,
                           deletion_due_at=now),
        ProviderAnswered(probe_id=pid, provider_id="fed-ngi", channel="webhook",
                         payload={"candidates": [{"rank": 1, "score": 0.9}]}, received_at=now),
        CandidatesReceived(probe_id=pid, provider_id="fed-ngi", channel="webhook",
                           candidates=[Candidate(rank=1, score=0.9, score_scale="0-1",
                                                 gallery="g", candidate_ref="c-1")],
                           threshold=0.0, list_size=1, algorithm="a", algorithm_version="1",
                           received_at=now),
        ProbeSettled(probe_id=pid, answered=["fed-ngi"], failed=[], no_response=[],
                     settled_at=now),
    ]


# A consumed record: topic, headers, key, value, and its decoding.
Consumed = tuple[str, Headers, bytes | None, bytes, Envelope]


def _envelopes(n: int, mix: bool) -> list[Consumed]:
    """n decoded records: ProviderDispatched only (the invariants' heaviest type), or the
    mix of a probe's whole life (seven events per probe)."""
    now = datetime.now(UTC)
    out: list[Consumed] = []
    if mix:  # the operator's enrollment of the gate's key, as on the registry topic
        trust = TrustedKey.model_validate({**trusted_key(_POLICY_KEY.public_key()),
                                           "updated_at": now})
        rec = encode(trust, "/frs/bench")
        out.append((topic_for(trust).name, rec.headers, rec.key, rec.value,
                    decode(rec.headers, rec.key, rec.value)))
    i = 0
    while len(out) < n:
        events = _lifecycle(i, now) if mix else [_lifecycle(i, now)[3]]
        for event in events:
            rec = encode(event, "/frs/bench")
            out.append((topic_for(event).name, rec.headers, rec.key, rec.value,
                        decode(rec.headers, rec.key, rec.value)))
        i += 1
    return out[:n]


def _service(directory: Path | PgLocation, records: list[Consumed],
             batch: int) -> tuple[float, float]:
    """What the audit service does per decoded record: leaf, savepoint, index, hash,
    frontier and the invariants' state; fsync (or a commit) per batch. (wall, cpu) s."""
    store = open_store(directory)
    ports = handlers.AuditPorts(store, Invariants(
        store, InvariantSettings(30.0, 300.0), lambda: datetime.now(UTC)))

    async def feed() -> None:
        for i, (topic, _headers, _key, value, env) in enumerate(records):
            await handlers.on_record(topic, 0, i, value, env, ports)
            if (i + 1) % batch == 0:
                store.commit()
        store.commit()

    started, cpu = time.perf_counter(), time.process_time()
    asyncio.run(feed())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    store.close()
    return elapsed, cpu


def _ingest_sequence(pg: PgLocation, records: list[Consumed] | None, n: int,
                     batch: int) -> tuple[float, float]:
    """Many instances' path: every record ingested into the queue (a commit per consumer
    batch), then sequenced by the lease holder in its batches (leaves, tree, invariants).
    ``records`` None: the store path's leaves, which no invariant concerns. (ingest s,
    sequence s), wall."""
    from services.audit.pg_store import PgAuditStore
    from services.audit.sequencer import (
        SEQUENCE_BATCH,
        IngestQueue,
        Lease,
        PgLeaseTable,
        sequence_batch,
    )

    store = PgAuditStore.connect(pg)
    invariants = Invariants(store, InvariantSettings(30.0, 300.0), lambda: datetime.now(UTC))
    queue, lease = IngestQueue(pg), Lease(PgLeaseTable(pg), "frs-audit-bench", 60.0)
    entries: list[tuple[LeafMeta, dict[str, Any], bytes | None]] = []
    for i in range(n):
        if records is None:
            entries.append((*_body(i), None))
            continue
        topic, headers, key, value, env = records[i]
        meta, body = handlers.leaf_for(topic, 0, i, value, env, headers)
        kept = handlers.invariant_input(headers, key, value, env) \
            if invariants.concerns(topic, env) else None
        entries.append((meta, body, kept))
    started = time.perf_counter()
    for i, (meta, body, kept) in enumerate(entries):
        queue.add(meta, body, kept)
        if (i + 1) % batch == 0:
            queue.commit()
    queue.commit()
    ingest_s = time.perf_counter() - started
    assert lease.keep()
    store.fence = lease.epoch
    started = time.perf_counter()
    while sequence_batch(store, invariants, SEQUENCE_BATCH)[0] == SEQUENCE_BATCH:
        pass
    sequence_s = time.perf_counter() - started
    assert store.size == n
    lease.release()
    queue.close()
    store.close()
    return ingest_s, sequence_s


def _raw(path: Path, n: int, batch: int) -> tuple[float, float]:
    leaves = [canonical({**_body(i)[1], "index": i}) for i in range(n)]
    started, cpu = time.perf_counter(), time.process_time()
    with open(path, "ab") as f:
        for i, leaf in enumerate(leaves):
            f.write(leaf)
            if (i + 1) % batch == 0:
                f.flush()
                os.fsync(f.fileno())
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started, time.process_time() - cpu


def _on_pg(pg: PgLocation, run: Callable[[PgLocation], tuple[float, float]]
           ) -> tuple[float, float]:
    """One run on an empty PostgreSQL log, emptied again after it."""
    from services.audit.pg_store import clear_log

    clear_log(pg, refuse_if_not_empty=True)
    try:
        return run(pg)
    finally:
        clear_log(pg, refuse_if_not_empty=False)


def run(append_leaves: int = 100_000, verify_leaves: int = 1_000_000,
        batches: tuple[int, ...] = (50, 500), workdir: Path | None = None,
        repeats: int = 3, pg: PgLocation | None = None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="frs-bench-audit-", dir=workdir))
    results: dict[str, Any] = {
        "append_leaves": append_leaves, "cpus": os.cpu_count(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "baseline": "sequential append of the same leaf bytes + fsync per batch, same disk,"
                    " same run",
        "paths": {"store": "AuditStore.append + commit (leaf bytes, index row, leaf hash,"
                           " frontier, fsync of segment and index per batch)",
                  "service": "handlers.on_record (leaf, invariants) + commit per batch, on"
                             " decoded records in the mix of a probe's life: requested,"
                             " submitted, cleared, dispatched, answered, candidates, settled",
                  "service_dispatch_only": "the same on ProviderDispatched records only,"
                                           " the invariants' heaviest type",
                  "ingest_sequence_postgres": "many instances: IngestQueue.add + commit per"
                                              " batch, then sequence_batch (leaves by COPY,"
                                              " tree, invariants, fenced) until the queue is"
                                              " empty; store_path on the store path's"
                                              " leaves (no invariant concerns them)"},
        "appends": []}
    dispatches, lifecycle = _envelopes(append_leaves, False), _envelopes(append_leaves, True)
    for batch in batches:
        # Interleaved repeats, medians reported: the machine is shared and noisy, so the
        # CPU time per append is given as well (it does not depend on the neighbours).
        runs: dict[str, list[tuple[float, float]]] = {"store": [], "service": [],
                                                      "dispatch": [], "raw": []}
        if pg is not None:
            runs |= {"pg_store": [], "pg_service": [], "pg_dispatch": [], "iq_store": [],
                     "iq_service": [], "iq_dispatch": []}
        for rep in range(repeats):
            runs["store"].append(_appends(base / f"a{batch}-{rep}", append_leaves, batch))
            runs["service"].append(_service(base / f"s{batch}-{rep}", lifecycle, batch))
            runs["dispatch"].append(_service(base / f"d{batch}-{rep}", dispatches, batch))
            runs["raw"].append(_raw(base / f"raw{batch}-{rep}.seg", append_leaves, batch))
            if pg is not None:
                runs["pg_store"].append(_on_pg(pg, partial(_appends, n=append_leaves,
                                                           batch=batch)))
                runs["pg_service"].append(_on_pg(pg, partial(_service, records=lifecycle,
                                                             batch=batch)))
                runs["pg_dispatch"].append(_on_pg(pg, partial(_service, records=dispatches,
                                                              batch=batch)))
                for name, recs in (("iq_store", None), ("iq_service", lifecycle),
                                   ("iq_dispatch", dispatches)):
                    runs[name].append(_on_pg(pg, partial(_ingest_sequence, records=recs,
                                                         n=append_leaves, batch=batch)))
        # For the ingest+sequence runs the pair is (ingest s, sequence s), both wall.
        wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        if pg is not None:
            results.setdefault("ingest_sequence_postgres", []).append(
                _ingest_sequence_figures(batch, append_leaves, runs, wall, repeats))
        if pg is not None:
            results.setdefault("appends_postgres", []).append({
                "batch": batch,
                "store_appends_per_s": round(append_leaves / wall["pg_store"]),
                "service_appends_per_s": round(append_leaves / wall["pg_service"]),
                "service_dispatch_only_appends_per_s": round(append_leaves
                                                             / wall["pg_dispatch"]),
                "service_vs_sqlite": round(wall["service"] / wall["pg_service"], 3),
                "store_appends_per_cpu_s": round(append_leaves / cpu["pg_store"]),
                "service_appends_per_cpu_s": round(append_leaves / cpu["pg_service"]),
                "repeats": repeats})
        results["appends"].append({
            "batch": batch,
            "store_appends_per_s": round(append_leaves / wall["store"]),
            "service_appends_per_s": round(append_leaves / wall["service"]),
            "service_dispatch_only_appends_per_s": round(append_leaves / wall["dispatch"]),
            "raw_append_fsync_per_s": round(append_leaves / wall["raw"]),
            "store_ratio_vs_raw": round(wall["raw"] / wall["store"], 3),
            "service_ratio_vs_raw": round(wall["raw"] / wall["service"], 3),
            "store_appends_per_cpu_s": round(append_leaves / cpu["store"]),
            "service_appends_per_cpu_s": round(append_leaves / cpu["service"]),
            "service_dispatch_only_appends_per_cpu_s": round(append_leaves / cpu["dispatch"]),
            "repeats": repeats,
        })
    signer = Signer(ORIGIN, Ed25519PrivateKey.generate())
    policy = handlers.CheckpointPolicy(signer, ORIGIN, 100_000, 1e9, lambda: datetime.now(UTC))

    def checkpoint(store: AuditLog) -> None:
        if store.size % 100_000 == 0:
            handlers.make_checkpoint(store, policy)

    build_s, _ = _appends(base / "v", verify_leaves, 500, checkpoint)
    report = verify_store(base / "v", Verifier.parse(signer.verifier_key))
    results["verify"] = {
        "leaves": verify_leaves, "build_s": round(build_s, 2),
        "build_appends_per_s": round(verify_leaves / build_s),
        "verify_s": round(report.seconds, 2), "ok": report.ok,
        "checkpoints": report.checkpoints,
        "segment_bytes": (base / "v" / "leaves.seg").stat().st_size,
    }
    results["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    results["targets"] = {}
    store_best = max(a["store_appends_per_s"] for a in results["appends"])
    service_best = max(a["service_appends_per_s"] for a in results["appends"])
    if pg is not None:
        best = max(a["store_path"]["events_per_s"] for a in results["ingest_sequence_postgres"])
        results["targets"]["ingest_sequence_store_path_events_per_s>=20000"] = best >= 20_000
    results["targets"] |= {"store_appends_per_s>=20000": store_best >= 20_000,
                          "service_appends_per_s>=20000": service_best >= 20_000,
                          f"verify_{verify_leaves}_s<=30": report.seconds <= 30}
    _remove(base)
    return results


def _ingest_sequence_figures(batch: int, n: int, runs: dict[str, list[tuple[float, float]]],
                             wall: dict[str, float], repeats: int) -> dict[str, Any]:
    """events/s of each stage and of both (one after the other, as one instance would do
    them), against the SQLite single instance's same path in the same run."""
    out: dict[str, Any] = {"batch": batch, "repeats": repeats}
    for name, sqlite in (("store_path", "store"), ("service", "service"),
                         ("service_dispatch_only", "dispatch")):
        key = {"store_path": "iq_store", "service": "iq_service",
               "service_dispatch_only": "iq_dispatch"}[name]
        ingest = statistics.median(i for i, _ in runs[key])
        sequence = statistics.median(s for _, s in runs[key])
        out[name] = {"ingest_events_per_s": round(n / ingest),
                     "sequence_events_per_s": round(n / sequence),
                     "events_per_s": round(n / (ingest + sequence)),
                     "sqlite_single_instance_per_s": round(n / wall[sqlite]),
                     "vs_sqlite": round(wall[sqlite] / (ingest + sequence), 3)}
    return out


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()
