"""Quality report and gate on real photos (scikit-image samples), no I/O."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from PIL import Image

from schemas.events import RejectReason
from services.intake.quality import QualityGate, assess, rejection
from services.intake.sanitize import sanitize
from tests import intake_samples as s


def _img(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_face_photo_passes_with_a_full_report() -> None:
    report = assess(_img(s.face_jpeg()))
    assert report.passed and report.failures == []
    assert report.faces_found == 1
    assert 64 <= report.largest_face_px <= 200
    assert report.sharpness > QualityGate().min_sharpness
    assert 0.15 < report.exposure < 0.9
    assert (report.width, report.height) == (512, 512)
    assert rejection(report) is None


CASES: list[tuple[str, Callable[[], bytes], RejectReason]] = [
    ("no_face", s.no_face_jpeg, RejectReason.NO_FACE),
    ("two_faces", s.two_faces_jpeg, RejectReason.MULTIPLE_FACES),
    ("small_face", s.small_face_jpeg, RejectReason.FACE_TOO_SMALL),
    ("blurred", s.blurred_face_jpeg, RejectReason.TOO_BLURRED),
    ("dark", s.dark_face_jpeg, RejectReason.BAD_EXPOSURE),
]


@pytest.mark.parametrize(("name", "build", "reason"), CASES, ids=[c[0] for c in CASES])
def test_gate_rejects_with_its_reason(
    name: str, build: Callable[[], bytes], reason: RejectReason
) -> None:
    report = assess(_img(build()))
    assert not report.passed
    found = rejection(report)
    assert found is not None and found[0] == reason


def test_gate_is_configurable() -> None:
    two = assess(_img(s.two_faces_jpeg()), QualityGate(max_faces=2))
    assert two.passed and two.faces_found == 2
    small = assess(_img(s.small_face_jpeg()), QualityGate(min_face_px=20))
    assert small.passed
    blurred = assess(_img(s.blurred_face_jpeg()), QualityGate(min_sharpness=1.0))
    assert blurred.passed
    # Disabled: still measured and reported, never rejected.
    off = assess(_img(s.no_face_jpeg()), QualityGate(enabled=False))
    assert off.passed and off.failures == ["no_face"] and rejection(off) is None


def test_orientation_matters_for_detection() -> None:
    # Stored sideways with EXIF orientation 6: only the sanitized (upright) image has a face.
    raw = s.jpeg_with_metadata()
    assert assess(_img(raw)).faces_found == 0
    assert assess(sanitize(raw).image).faces_found == 1


def test_assess_is_safe_from_several_image_threads() -> None:
    # Intake runs the image work on several threads; one shared OpenCV classifier failed
    # there with cv2.error and heap corruption.
    from concurrent.futures import ThreadPoolExecutor

    photos = [s.face_jpeg(), s.two_faces_jpeg(), s.no_face_jpeg()] * 8
    serial = [assess(_img(p)) for p in photos[:3]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(pool.map(lambda p: assess(_img(p)), photos))
    assert reports == serial * 8
