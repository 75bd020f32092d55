"""``frs bench intake --detectors``: the quality gate's face detectors side by side on the
labelled set (``face_set``): recall on the images with a face, false detections on those
without, CPU ms per image, and every image where the gate's verdict differs.

Each image is timed with both detectors one after the other (the order alternating), on
one OpenCV thread as the image workers run them, so that load from other processes
weighs on both alike. Only the detection is timed: the grayscale copy and the report
(sharpness, exposure) are the same work whichever detector found the face."""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from importlib.metadata import version
from typing import Any, get_args

import cv2
from PIL import Image

from services.cli import face_set
from services.intake import facedetect
from services.intake.quality import Box, Detector, QualityGate, find_faces, grayscale, judge

DETECTORS: tuple[Detector, ...] = get_args(Detector)


def _hits(box: Box, truth: Box) -> bool:
    """A detection counts for the labelled face when its centre lies in the face's box."""
    x, y, w, h = box
    tx, ty, tw, th = truth
    return tx <= x + w / 2 <= tx + tw and ty <= y + h / 2 <= ty + th


def _verdict(failures: list[str]) -> str:
    return failures[0] if failures else "pass"


def _right(item: face_set.Item, faces: list[Box]) -> bool:
    """Whether a detector's faces agree with the label: the labelled face at about its
    size (within 1.5x either way) and nothing else, or nothing on an image without one."""
    if item.box is None:
        return not faces
    size = max(item.box[2], item.box[3])
    return bool(faces) and all(_hits(f, item.box) and 2 / 3 <= max(f[2], f[3]) / size <= 1.5
                               for f in faces)


def compare(items: list[face_set.Item], gate: QualityGate | None = None) -> dict[str, Any]:
    gate = gate or QualityGate()
    stats: dict[str, dict[str, Any]] = {d: {"found": 0, "false_images": 0, "false_boxes": 0,
                                             "stray_on_face_images": 0,
                                             "gate_passed_with_face": 0,
                                             "gate_passed_without_face": 0, "ms": []}
                                         for d in DETECTORS}
    disagreements: list[dict[str, Any]] = []
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # as in the image workers
    try:
        for n, item in enumerate(items):
            image = Image.open(io.BytesIO(item.jpeg))
            image.load()
            gray = grayscale(image)
            found: dict[str, list[Box]] = {}
            order = DETECTORS if n % 2 == 0 else DETECTORS[::-1]
            for d in order:
                started = time.perf_counter()
                found[d] = find_faces(image, gray, gate.min_face_px, d)
                stats[d]["ms"].append((time.perf_counter() - started) * 1000)
            for d in DETECTORS:
                s, faces = stats[d], found[d]
                if item.box is None:
                    s["false_images"] += bool(faces)
                    s["false_boxes"] += len(faces)
                else:
                    s["found"] += any(_hits(f, item.box) for f in faces)
                    s["stray_on_face_images"] += sum(not _hits(f, item.box) for f in faces)
            verdicts: dict[str, str] = {
                d: _verdict(judge(image, gray, found[d], gate).failures) for d in DETECTORS}
            for name, verdict in verdicts.items():
                key = "gate_passed_with_face" if item.face else "gate_passed_without_face"
                stats[name][key] += verdict == "pass"
            if len(set(verdicts.values())) > 1:
                disagreements.append({
                    "id": item.id, "face_px": max(item.box[2:]) if item.box else 0,
                    **verdicts,
                    "faces": {d: [max(f[2:]) for f in found[d]] for d in DETECTORS},
                    "right": [d for d in DETECTORS if _right(item, found[d])] or ["neither"]})
    finally:
        cv2.setNumThreads(threads)
    with_face = sum(1 for i in items if i.face)
    result: dict[str, Any] = {}
    for name, s in stats.items():
        ms = s.pop("ms")
        result[name] = {**s, "recall": round(s["found"] / with_face, 3),
                     "ms_per_image_mean": round(statistics.fmean(ms), 2),
                     "ms_per_image_median": round(statistics.median(ms), 2),
                     "ms_per_image_p95": round(sorted(ms)[int(0.95 * (len(ms) - 1))], 2)}
    return {"detectors": result, "gate_disagreements": disagreements}


def run(min_face_px: int = QualityGate().min_face_px) -> dict[str, Any]:
    items = face_set.build()
    with_face = sum(1 for i in items if i.face)
    out = compare(items, QualityGate(min_face_px=min_face_px))
    return {
        "benchmark": "intake-detectors",
        "set": {"images": len(items), "with_face": with_face,
                "without_face": len(items) - with_face,
                "distinct_faces": len(face_set.FACE_SOURCES),
                "built_from": "scikit-image's bundled photos (services/cli/face_set.py)"},
        "detection": {"haar": "OpenCV frontal-face cascade, coarse to fine, eye check "
                              "when several faces",
                      "blazeface": f"MediaPipe BlazeFace short-range on LiteRT, 128 px "
                                   f"input, score >= {facedetect.MIN_SCORE}; tiles (score "
                                   f">= {facedetect.TILE_SCORE}) when the whole image has "
                                   "none"},
        "false_detections": "false_images: images without a face where any face was "
                            "reported; stray_on_face_images: boxes away from the labelled "
                            "face",
        **out,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "opencv": cv2.__version__,
                    "litert": version("ai-edge-litert"),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
    }
