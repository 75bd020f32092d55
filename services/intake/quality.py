"""Probe quality (REQ-QUALITY): faces found, largest face size, sharpness, exposure, and a
configurable gate that rejects images a 1:N search cannot use.

Faces come from MediaPipe's BlazeFace CNN (``facedetect``; a model file shipped with the
package, run by Google's LiteRT runtime), which on the labelled set of ``frs bench intake
--detectors`` finds more faces than OpenCV's frontal-face Haar cascade, with fewer false
ones, at a fraction of its CPU (docs/performance.md). The Haar path stays for that
comparison (``detector="haar"``). Sharpness is the variance of the Laplacian of the
largest face, resized to a fixed 112 px square (a common face-matcher input), so it does
not depend on the photo's resolution; exposure is the mean luminance (0..1) of that face,
or of the whole image if none is found. Faces under 40% of the largest one's size are not
counted: only a second person close enough to matter makes a photo ambiguous. With Haar,
of the rest those the eye cascade confirms are kept (all, if none is): the frontal
cascade's false positives on real photos would otherwise read as a second person;
BlazeFace's own landmarks place the eyes, and ``facedetect`` keeps upright faces only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from schemas.events import QualityReport, RejectReason
from services.intake import facedetect

_CASCADE = "haarcascade_frontalface_default.xml"
_EYE_CASCADE = "haarcascade_eye.xml"
_DETECT_MAX_SIDE = 1024  # detection runs on a downscaled copy: cost is O(pixels)
_FACE_NORM_PX = 112
_WINDOW = 24  # the frontal cascade's smallest window (its training size), px
_SECONDARY_FACE_RATIO = 0.4  # faces under 40% of the largest one's size are not counted
Box = tuple[int, int, int, int]  # x, y, w, h
Detector = Literal["blazeface", "haar"]


@dataclass(frozen=True)
class QualityGate:
    """What a usable probe needs. ``enabled=False`` reports without rejecting."""

    enabled: bool = True
    max_faces: int = 1
    min_face_px: int = 64
    min_sharpness: float = 40.0
    min_exposure: float = 0.15
    max_exposure: float = 0.90


_local = threading.local()


def _cascade(name: str = _CASCADE) -> Any:
    """One classifier per thread: OpenCV's CascadeClassifier is not safe to share (two
    image threads on one instance corrupted the heap)."""
    cache: dict[str, Any] = _local.__dict__.setdefault("cascades", {})
    classifier = cache.get(name)
    if classifier is None:
        classifier = cv2.CascadeClassifier(cv2.data.haarcascades + name)  # type: ignore[attr-defined]
        if classifier.empty():
            raise RuntimeError(f"OpenCV Haar cascade {name} could not be loaded")
        cache[name] = classifier
    return classifier


def warm_up() -> None:
    """Load this thread's detector now (an image worker, before its first image)."""
    facedetect.warm_up()


def _has_eyes(gray: np.ndarray[Any, Any], face: Box) -> bool:
    x, y, w, h = face
    upper = gray[y : y + h * 2 // 3, x : x + w]
    if upper.size == 0:
        return False
    scale = min(1.0, 200 / max(upper.shape))
    if scale < 1.0:
        upper = cv2.resize(upper, (max(1, round(upper.shape[1] * scale)),
                                   max(1, round(upper.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    side = max(8, round(w * scale) // 10)
    eyes = _cascade(_EYE_CASCADE).detectMultiScale(
        cv2.equalizeHist(upper), scaleFactor=1.1, minNeighbors=3, minSize=(side, side))
    return len(eyes) > 0


def _comparable(faces: list[Box]) -> list[Box]:
    """The faces of at least 40% of the largest one's size."""
    if not faces:
        return faces
    # False positives (cloth folds, patterns) mostly come out far smaller than the real
    # face; a second person close enough to matter is of comparable size.
    top = max(max(f[2], f[3]) for f in faces)
    return [f for f in faces if max(f[2], f[3]) >= _SECONDARY_FACE_RATIO * top]


def _plausible(gray: np.ndarray[Any, Any],
               faces: list[Box]) -> list[Box]:
    """Drop the frontal cascade's false positives when it reports several faces."""
    faces = _comparable(faces)
    if len(faces) > 1:
        # Of comparable size: keep those the eye cascade confirms (all, if none is).
        confirmed = [f for f in faces if _has_eyes(gray, f)]
        faces = confirmed or faces
    return faces



def _detect(gray: np.ndarray[Any, Any], scale: float, scale_factor: float,
            max_px: int = 0) -> list[Box]:
    """One cascade pass on a copy scaled by ``scale`` for faces up to ``max_px`` (0: any)
    in ``gray``'s pixels; boxes in ``gray``'s coordinates."""
    h, w = gray.shape[:2]
    small = gray if scale >= 1.0 else cv2.resize(
        gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    top = round(max_px * scale)
    found = _cascade().detectMultiScale(cv2.equalizeHist(small), scaleFactor=scale_factor,
                                        minNeighbors=6, minSize=(_WINDOW, _WINDOW),
                                        maxSize=(top, top) if top > _WINDOW else (0, 0))
    return [(round(x / scale), round(y / scale), round(fw / scale), round(fh / scale))
            for (x, y, fw, fh) in found]


def detect_faces(gray: np.ndarray[Any, Any], min_face_px: int = 64,
                 scale_factor: float = 1.1) -> list[Box]:
    """Face boxes (x, y, w, h) in the coordinates of ``gray``.

    The cascade's cost grows with the pixels it scans at its smallest window, so it runs
    coarse to fine: first on a copy where the smallest face the gate accepts fills the
    24 px window; if that finds a face of size L, once more where a face of
    ``_SECONDARY_FACE_RATIO * L`` (the smallest one that still counts) fills it, for faces
    the coarse pass could not see. Only when
    the coarse pass finds nothing (a photo to be rejected) does it scan at full size, so the
    rejection can still tell a small face from none. On a 175 px probe this is ~3x faster
    than one full-size pass and finds the same faces."""
    h, w = gray.shape[:2]
    cap = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    coarse = min(cap, _WINDOW / max(min_face_px, _WINDOW))
    faces = _detect(gray, coarse, scale_factor)
    if not faces:
        return _detect(gray, cap, scale_factor) if coarse < cap else faces
    largest = max(max(f[2], f[3]) for f in faces)
    fine = min(cap, _WINDOW / max(_SECONDARY_FACE_RATIO * largest, 1.0))
    if fine <= coarse:
        return faces
    # The fine pass looks only for the faces too small for the coarse one.
    small = _detect(gray, fine, scale_factor, max_px=round(min_face_px * 1.25))
    return faces + [f for f in small if not any(_inside(f, big) for big in faces)]


def _inside(box: Box, other: Box) -> bool:
    """Whether ``box``'s centre lies in ``other`` (the same face seen at two scales)."""
    x, y, w, h = box
    ox, oy, ow, oh = other
    return ox <= x + w / 2 <= ox + ow and oy <= y + h / 2 <= oy + oh


def grayscale(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("L"))


def find_faces(image: Image.Image, gray: np.ndarray[Any, Any], min_face_px: int = 64,
               detector: Detector = "blazeface") -> list[Box]:
    """The faces the gate counts, boxes in the image's pixels; ``gray`` is
    ``grayscale(image)``, which the report needs anyway."""
    if detector == "haar":
        return _plausible(gray, detect_faces(gray, min_face_px))
    return _comparable([f.box for f in facedetect.detect_image(image)])


def assess(image: Image.Image, gate: QualityGate | None = None,
           detector: Detector = "blazeface") -> QualityReport:
    gate = gate or QualityGate()
    gray = grayscale(image)
    return judge(image, gray, find_faces(image, gray, gate.min_face_px, detector), gate)


def judge(image: Image.Image, gray: np.ndarray[Any, Any], faces: list[Box],
          gate: QualityGate) -> QualityReport:
    """The report and the gate's verdict on an image whose faces are found."""
    region = gray
    largest = 0
    if faces:
        x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
        largest = max(fw, fh)
        # A CNN's box may reach past the edge when the face does.
        x0, y0 = max(0, x), max(0, y)
        region = gray[y0 : max(y0, y + fh), x0 : max(x0, x + fw)]
        if region.size == 0:
            region = gray
    norm = cv2.resize(region, (_FACE_NORM_PX, _FACE_NORM_PX), interpolation=cv2.INTER_AREA)
    sharpness = float(cv2.Laplacian(norm, cv2.CV_64F).var())
    exposure = float(region.mean()) / 255.0 if region.size else 0.0
    failures: list[str] = []
    # Order matters: the first failure is the rejection reason. Exposure comes before
    # sharpness because a dark face also has a low Laplacian variance.
    if not faces:
        failures.append(RejectReason.NO_FACE.value)
    elif len(faces) > gate.max_faces:
        failures.append(RejectReason.MULTIPLE_FACES.value)
    if faces and largest < gate.min_face_px:
        failures.append(RejectReason.FACE_TOO_SMALL.value)
    if not gate.min_exposure <= exposure <= gate.max_exposure:
        failures.append(RejectReason.BAD_EXPOSURE.value)
    if faces and sharpness < gate.min_sharpness:
        failures.append(RejectReason.TOO_BLURRED.value)
    return QualityReport(
        width=image.width, height=image.height, faces_found=len(faces),
        largest_face_px=largest, sharpness=round(sharpness, 3),
        exposure=round(min(max(exposure, 0.0), 1.0), 4),
        passed=not failures or not gate.enabled, failures=failures,
    )


_DETAILS = {
    RejectReason.NO_FACE: "no face was found",
    RejectReason.MULTIPLE_FACES: "more faces than the gate allows",
    RejectReason.FACE_TOO_SMALL: "the largest face is smaller than the gate's minimum",
    RejectReason.BAD_EXPOSURE: "the face is under- or over-exposed",
    RejectReason.TOO_BLURRED: "the face is too blurred",
}


def rejection(report: QualityReport) -> tuple[RejectReason, str] | None:
    """The reason to reject, or None when the report passed the gate."""
    if report.passed or not report.failures:
        return None
    reason = RejectReason(report.failures[0])
    return reason, (f"{_DETAILS[reason]} (faces={report.faces_found}, "
                    f"largest_face_px={report.largest_face_px}, "
                    f"sharpness={report.sharpness:.1f}, exposure={report.exposure:.3f})")
