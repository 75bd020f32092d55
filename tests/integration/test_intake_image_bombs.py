"""Issue 19, finding 4, against the real intake: a progressive JPEG of 2,000 scans and a
50-megapixel PNG end in their own ProbeRejected reason within their limits, a normal probe
right after is accepted, and the resident memory of the intake and its image workers comes
back within 20% of what it was after warm-up."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.events import ProbeRejected, ProbeRequested, ProbeSubmitted, RejectReason
from tests import intake_samples as s
from tests.conftest import ServiceProcess
from tests.image_bombs import flat_png, scan_bomb
from tests.integration.intake_support import (
    make_request,
    needles,
    outcomes,
    publish,
    start_intake,
)

pytestmark = pytest.mark.integration

RSS_TOLERANCE = 0.20


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants (the forkserver and image workers)."""
    tree, todo, total_kb = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(tree.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue  # a worker that just retired
    return total_kb / 1024


async def settle_rss(pid: int, baseline: float, timeout: float = 20.0) -> float:  # noqa: ASYNC109
    """The tree's RSS once it is back within tolerance of ``baseline`` (or the last reading
    when it does not come back in time)."""
    deadline = time.monotonic() + timeout
    while True:
        rss = tree_rss_mb(pid)
        if rss <= baseline * (1 + RSS_TOLERANCE) or time.monotonic() > deadline:
            return rss
        await asyncio.sleep(0.5)


async def outcome_of(bootstrap: str, request: ProbeRequested,
                     timeout: float) -> tuple[ProbeSubmitted | ProbeRejected, float]:  # noqa: ASYNC109
    started = time.monotonic()
    await publish(bootstrap, [request])
    got = await outcomes(bootstrap, [request.request_id], timeout=timeout)
    event = got[request.request_id][0].event
    assert isinstance(event, ProbeSubmitted | ProbeRejected)
    return event, time.monotonic() - started


async def warm_up(bootstrap: str, env: dict[str, str], intake: ServiceProcess) -> float:
    """Normal probes through both workers, then the baseline RSS of the intake's tree."""
    probes = [make_request(env, img) for img in (s.face_jpeg(), s.face_png()) * 3]
    await publish(bootstrap, probes)
    got = await outcomes(bootstrap, [p.request_id for p in probes])
    assert all(isinstance(v[0].event, ProbeSubmitted) for v in got.values())
    await asyncio.sleep(1.0)
    assert intake.proc is not None
    return tree_rss_mb(intake.proc.pid)


def gradient_jpeg(width: int, height: int) -> bytes:
    """A large, harmless photo-sized JPEG (no face): fully decoded, then refused."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def test_scan_and_pixel_bombs_end_at_their_caps_and_memory_comes_back(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str]
) -> None:
    intake = start_intake(services)
    assert intake.proc is not None
    baseline = await warm_up(kafka_bootstrap, service_env, intake)

    bomb = scan_bomb(side=4000, scans=2000)  # ~16 s of CPU to decode, 125 KB
    event, took = await outcome_of(kafka_bootstrap, make_request(service_env, bomb), 30)
    assert isinstance(event, ProbeRejected) and event.reason is RejectReason.TOO_MANY_SCANS
    assert took < 10, took

    huge = flat_png(7072, 7072)  # 50.01 MP, 160 KB
    event, took = await outcome_of(kafka_bootstrap, make_request(service_env, huge), 30)
    assert isinstance(event, ProbeRejected) and event.reason is RejectReason.TOO_MANY_PIXELS
    assert took < 10, took

    # Unusual but harmless: large images within every cap, decoded in full and refused
    # (no face) or accepted; the workers that held them do not keep the memory.
    harmless = [gradient_jpeg(6000, 4000), flat_png(6000, 5000), s.large_face_jpeg(),
                s.png_with_text(), s.small_face_jpeg(), s.to_jpeg(s.astronaut(),
                                                                 progressive=True)]
    requests = [make_request(service_env, img) for img in harmless]
    await publish(kafka_bootstrap, requests)
    got = await outcomes(kafka_bootstrap, [r.request_id for r in requests], timeout=120)
    reasons = [getattr(got[r.request_id][0].event, "reason", None) for r in requests]
    assert reasons[:2] == [RejectReason.NO_FACE, RejectReason.NO_FACE], reasons

    event, _ = await outcome_of(kafka_bootstrap, make_request(service_env, s.face_jpeg()), 30)
    assert isinstance(event, ProbeSubmitted)
    rss = await settle_rss(intake.proc.pid, baseline)
    assert rss <= baseline * (1 + RSS_TOLERANCE), (baseline, rss)
    print(f"intake tree RSS: baseline {baseline:.0f} MB, after {rss:.0f} MB")


async def test_past_the_caps_the_worker_limits_end_the_attack(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str]
) -> None:
    # Caps raised out of the way: the CPU-time and memory limits must stop these alone.
    intake = start_intake(services, FRS_INTAKE_MAX_JPEG_SCANS="1000000",
                          FRS_INTAKE_MAX_IMAGE_PIXELS="200000000",
                          FRS_INTAKE_DECODE_CPU_SECONDS="2", FRS_INTAKE_DECODE_MEMORY_MB="256")
    assert intake.proc is not None
    baseline = await warm_up(kafka_bootstrap, service_env, intake)

    bomb = scan_bomb(side=4000, scans=2000)
    meanwhile = make_request(service_env, s.face_jpeg())
    started = time.monotonic()
    await publish(kafka_bootstrap, [make_request(service_env, bomb, request_id="bomb-cpu"),
                                    meanwhile])
    got = await outcomes(kafka_bootstrap, ["bomb-cpu", meanwhile.request_id], timeout=60)
    took = time.monotonic() - started
    event = got["bomb-cpu"][0].event
    assert isinstance(event, ProbeRejected), event
    assert event.reason is RejectReason.DECODE_LIMIT_EXCEEDED
    assert "CPU time" in event.detail and took < 15, (event.detail, took)
    # The other worker went on: the probe sent with the bomb is accepted.
    assert isinstance(got[meanwhile.request_id][0].event, ProbeSubmitted)

    huge = flat_png(8000, 8000)  # 64 MP RGB: 256 MB of pixels, past the worker's 256 MB
    event, took = await outcome_of(kafka_bootstrap, make_request(service_env, huge), 30)
    assert isinstance(event, ProbeRejected), event
    assert event.reason is RejectReason.DECODE_LIMIT_EXCEEDED and "memory" in event.detail
    assert took < 15, took

    event, _ = await outcome_of(kafka_bootstrap, make_request(service_env, s.face_jpeg()), 30)
    assert isinstance(event, ProbeSubmitted)
    rss = await settle_rss(intake.proc.pid, baseline)
    assert rss <= baseline * (1 + RSS_TOLERANCE), (baseline, rss)
    print(f"intake tree RSS: baseline {baseline:.0f} MB, after {rss:.0f} MB")

    intake.stop()
    log = intake.log_path.read_bytes()
    assert log.count(b'"msg":"image worker ended by a limit"') >= 1
    assert b'"limit":"cpu_time"' in log
    for needle in needles(bomb) + needles(huge):
        assert needle not in log
