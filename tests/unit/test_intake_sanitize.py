"""Sanitizer: every bad input gets its own reason; good input loses all metadata."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from schemas.events import RejectReason
from services.intake.sanitize import SanitizeError, SanitizeLimits, sanitize
from tests import intake_samples as s

BAD: list[tuple[str, Callable[[], bytes], RejectReason]] = [
    ("empty", lambda: b"", RejectReason.EMPTY_IMAGE),
    ("zero_size_png", s.zero_size_png, RejectReason.EMPTY_IMAGE),
    ("gif", s.gif_bytes, RejectReason.UNSUPPORTED_FORMAT),
    ("bmp", s.bmp_bytes, RejectReason.UNSUPPORTED_FORMAT),
    ("zip", s.zip_bytes, RejectReason.UNSUPPORTED_FORMAT),
    ("png_bomb_400mp", s.png_bomb, RejectReason.TOO_MANY_PIXELS),
    ("truncated_jpeg", s.truncated_jpeg, RejectReason.TRUNCATED_IMAGE),
    ("truncated_png", s.truncated_png, RejectReason.TRUNCATED_IMAGE),
    ("png_bad_crc", s.png_bad_crc, RejectReason.CORRUPT_IMAGE),
    ("png_bad_pixels", s.png_bad_pixels, RejectReason.CORRUPT_IMAGE),
    ("jpeg_random_body", lambda: s.random_bytes_with_jpeg_magic(5000),
     RejectReason.TRUNCATED_IMAGE),  # its first segment length runs past the end
    ("apng", s.animated_png, RejectReason.MULTI_FRAME),
    ("mpo", s.mpo_jpeg, RejectReason.MULTI_FRAME),
    ("jpeg_zip", s.jpeg_zip_polyglot, RejectReason.POLYGLOT),
    ("png_zip", s.png_zip_polyglot, RejectReason.POLYGLOT),
    ("jpeg_zip_in_comment", s.jpeg_zip_in_comment, RejectReason.POLYGLOT),
]


@pytest.mark.parametrize(("name", "build", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_rejected_with_its_reason(
    name: str, build: Callable[[], bytes], reason: RejectReason
) -> None:
    data = build()
    with pytest.raises(SanitizeError) as info:
        sanitize(data)
    assert info.value.reason == reason, info.value.detail
    # The detail is fixed text: never a slice of the input.
    assert len(info.value.detail) < 200


def test_byte_cap() -> None:
    data = s.face_jpeg()
    with pytest.raises(SanitizeError) as info:
        sanitize(data, SanitizeLimits(max_bytes=len(data) - 1))
    assert info.value.reason == RejectReason.TOO_MANY_BYTES
    assert sanitize(data, SanitizeLimits(max_bytes=len(data))).format == "jpeg"


def test_pixel_cap_is_the_configured_one_not_twice_it() -> None:
    # 512x512 = 262144 pixels: just over a cap of 200000, under Pillow's own x2 error.
    with pytest.raises(SanitizeError) as info:
        sanitize(s.face_jpeg(), SanitizeLimits(max_pixels=200_000))
    assert info.value.reason == RejectReason.TOO_MANY_PIXELS
    assert sanitize(s.face_jpeg(), SanitizeLimits(max_pixels=262_144)).width == 512


def test_bomb_is_rejected_before_decoding() -> None:
    # A 400 MP grayscale decode would need 400 MB; the guard must trip at the header.
    bomb = s.png_bomb()
    assert len(bomb) < 2000
    with pytest.raises(SanitizeError) as info:
        sanitize(bomb)
    assert info.value.reason == RejectReason.TOO_MANY_PIXELS


def test_jpeg_metadata_dropped_and_orientation_applied() -> None:
    data = s.jpeg_with_metadata()
    for secret in (b"Secretville", b"SecretCam", b"secret comment", b"ICC_PROFILE", b"Exif"):
        assert secret in data  # the sample really carries it
    out = sanitize(data)
    for secret in (b"Secretville", b"SecretCam", b"secret comment", b"ICC_PROFILE", b"Exif",
                   b"http://ns.adobe.com/xap"):
        assert secret not in out.data
    reopened = Image.open(io.BytesIO(out.data))
    assert "exif" not in reopened.info and "icc_profile" not in reopened.info
    assert "comment" not in reopened.info and "xmp" not in reopened.info
    assert dict(reopened.getexif()) == {}
    # Orientation 6 applied: the pixels match the upright original, not the stored ones.
    upright = np.asarray(s.astronaut()).astype(int)
    assert np.abs(np.asarray(reopened).astype(int) - upright).mean() < 6
    assert out.received_sha256 == hashlib.sha256(data).hexdigest()
    assert out.sanitized_sha256 == hashlib.sha256(out.data).hexdigest()
    assert out.received_sha256 != out.sanitized_sha256


def test_png_text_and_exif_dropped() -> None:
    data = s.png_with_text()
    assert b"Secretville" in data and b"secret comment" in data and b"SecretCam" in data
    out = sanitize(data)
    assert out.format == "png"
    for secret in (b"Secretville", b"secret comment", b"SecretCam", b"tEXt", b"iTXt", b"eXIf"):
        assert secret not in out.data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))),
                          np.asarray(s.astronaut()))


def test_trailing_zero_padding_is_not_a_polyglot() -> None:
    assert sanitize(s.face_jpeg() + b"\x00" * 64).format == "jpeg"


def test_format_by_content_not_name() -> None:
    # PNG bytes are a PNG whatever they are called; the result keeps the real format.
    assert sanitize(s.face_png()).format == "png"
    assert sanitize(s.face_jpeg()).format == "jpeg"
