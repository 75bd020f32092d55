"""``frs bench intake``: images/s through the full intake path against bare image work.

Full path: the intake handler on a real (temporary) vault: decrypt, attestation, sanitize
(structural checks, full decode, orientation, metadata drop, re-encode, digests) and
quality (BlazeFace faces, sharpness, exposure) in the image worker processes as the
service runs them (one round trip per image, OpenCV on one thread per worker), vault put
(data key, AES-256-GCM, fsynced object and SQLite index) and the outcome record.
Baseline, on the same images in the same run: bare Pillow decode + re-encode + the same
face detector, in this process. The ratio full/baseline says what the checks and the
vault cost over the unavoidable image work.

``--detectors`` runs the gate's two face detectors side by side instead (bench_faces)."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cv2
import PIL
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from PIL import Image

from schemas.events import ProbeRequested, ProbeSubmitted
from schemas.sealed import encrypt_image
from schemas.types import ImageSource, Purpose, utcnow
from services.cli.common import BENCH_HELP, group
from services.intake import facedetect, handlers
from services.intake.decoder import DEFAULT_WORKERS, DecoderPool, WorkerLimits
from services.intake.outcomes import OutcomeLog
from services.vault import FileObjectStore, LocalKek, SqliteVaultIndex, Vault, open_db


def sample_images(count: int) -> list[bytes]:
    """A mix of sizes and formats built from scikit-image's astronaut photo."""
    from skimage import data as skdata

    base = Image.fromarray(skdata.astronaut())  # type: ignore[no-untyped-call]
    sizes = (512, 768, 1024, 640)
    images: list[bytes] = []
    for i in range(count):
        side = sizes[i % len(sizes)]
        img = base.resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if i % 5 == 4:
            img.save(buf, format="PNG")
        else:
            img.save(buf, format="JPEG", quality=85 + i % 10)
        images.append(buf.getvalue())
    return images


def baseline_one(data: bytes) -> float:
    started = time.perf_counter()
    img = Image.open(io.BytesIO(data))
    img.load()
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG" if img.format == "JPEG" else "PNG", quality=92)
    facedetect.detect_image(img)  # the gate's detector, nothing around it
    return time.perf_counter() - started


def _request(data: bytes, key: X25519PrivateKey, request_id: str) -> ProbeRequested:
    return ProbeRequested(
        request_id=request_id, case_id="CASE-BENCH", agent_id="agent-bench",
        purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"],
        image_source=ImageSource.OTHER, unedited_attestation=True,
        image=encrypt_image(data, key.public_key(), request_id),
    )


async def one_round(images: list[bytes], root: Path, round_no: int,
                    image_worker: Executor) -> tuple[float, float]:
    """(full path seconds, baseline seconds) over all images, alternating image by image
    so that load from other processes on a shared machine weighs on both alike."""
    key = X25519PrivateKey.generate()
    conn = open_db(root / f"round{round_no}" / "intake.db")
    ports = handlers.IntakePorts(
        private_key=key, clock=utcnow, image_ttl=timedelta(hours=72),
        vault=Vault(SqliteVaultIndex(conn), FileObjectStore(root / f"round{round_no}" / "objects"),
                    LocalKek(root / "kek")),
        outcomes=OutcomeLog(conn), image_worker=image_worker,
    )
    # Encrypting is the upstream's work, not the intake's: done before the clock starts.
    requests = [_request(d, key, f"bench-{round_no}-{i}") for i, d in enumerate(images)]
    full = base = 0.0
    for data, req in zip(images, requests, strict=True):
        base += baseline_one(data)
        started = time.perf_counter()
        [out] = await handlers.on_probe_requested(req, ports)
        full += time.perf_counter() - started
        if not isinstance(out, ProbeSubmitted):
            raise RuntimeError(f"bench image rejected: {getattr(out, 'reason', out)}")
    conn.close()
    return full, base


async def run_bench(count: int, rounds: int) -> dict[str, Any]:
    images = sample_images(count)
    for data in images[:2]:  # warm caches and the detector
        baseline_one(data)
    full_s: list[float] = []
    base_s: list[float] = []
    # The image work runs where the service runs it: in limited worker processes.
    pool = DecoderPool(DEFAULT_WORKERS, WorkerLimits())
    try:
        with tempfile.TemporaryDirectory(prefix="frs-bench-") as tmp:
            await one_round(images[:2], Path(tmp), -1, pool)
            for r in range(rounds):
                full, base = await one_round(images, Path(tmp), r, pool)
                full_s.append(full)
                base_s.append(base)
    finally:
        pool.shutdown(wait=True)
    full_ips = count / statistics.median(full_s)
    base_ips = count / statistics.median(base_s)
    ratios = [b / f for f, b in zip(full_s, base_s, strict=True)]
    return {
        "benchmark": "intake",
        "images": count,
        "rounds": rounds,
        "image_bytes_total": sum(len(i) for i in images),
        "full_path": {"images_per_s": round(full_ips, 2),
                      "median_s": round(statistics.median(full_s), 4),
                      "steps": "decrypt+attestation+sanitize+quality+vault put+outcome",
                      "image_work": f"{DEFAULT_WORKERS} worker processes, one image at a "
                                    "time"},
        "baseline": {"images_per_s": round(base_ips, 2),
                     "median_s": round(statistics.median(base_s), 4),
                     "steps": "Pillow decode+re-encode+BlazeFace"},
        "ratio_full_to_baseline": round(full_ips / base_ips, 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "pillow": PIL.__version__,
                    "opencv": cv2.__version__, "litert": version("ai-edge-litert"),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def _detectors(args: argparse.Namespace) -> int:
    from services.cli import bench_faces

    result = bench_faces.run()
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    for name, d in result["detectors"].items():
        sys.stdout.write(f"{name}: recall {d['recall']} ({d['found']}/"
                         f"{result['set']['with_face']}), false detections on "
                         f"{d['false_images']}/{result['set']['without_face']} images "
                         f"without a face, {d['ms_per_image_mean']} ms per image\n")
    sys.stdout.write(f"the gate's verdict differs on {len(result['gate_disagreements'])} "
                     "images (--json lists them)\n")
    return 0


async def cmd_bench_intake(args: argparse.Namespace, _settings: object) -> int:
    if args.detectors:
        return _detectors(args)
    if args.images < 1 or args.rounds < 1:
        sys.stderr.write("frs: --images and --rounds must be at least 1\n")
        return 2
    result = await run_bench(args.images, args.rounds)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(
            f"full intake path {result['full_path']['images_per_s']} images/s, "
            f"bare decode+re-encode+BlazeFace {result['baseline']['images_per_s']} images/s, "
            f"ratio {result['ratio_full_to_baseline']} "
            f"({result['images']} images x {result['rounds']} rounds, "
            f"{result['machine']['nproc']} cpus)\n")
    return 0


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = group(commands, "bench", BENCH_HELP).add_parser(
        "intake", help="images/s of the full intake path vs bare decode+re-encode+face "
                       "detection; --detectors: Haar vs BlazeFace on a labelled set",
        description="images/s of the full intake path (decrypt, sanitize, quality, vault "
                    "put) and of bare Pillow decode+re-encode+BlazeFace on the same images, "
                    "in the same run, and their ratio",
        epilog="examples:\n  frs bench intake --json --images 20 --rounds 3\n"
               "  frs bench intake --json --detectors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--images", type=int, default=20, help="images per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--detectors", action="store_true",
                        help="instead: the quality gate's face detectors (Haar, BlazeFace) "
                             "side by side on a labelled set of 260 images: recall, false "
                             "detections, ms per image, and where the gate's verdict differs")
    parser.set_defaults(func=cmd_bench_intake)
