"""Probe image sanitizing (REQ-SANITIZE): accept only a single-frame JPEG or PNG, judged by
content, within byte and pixel caps; reject anything truncated, corrupt or that is two
formats at once; apply EXIF orientation, drop every piece of metadata and re-encode.

Every failure raises ``SanitizeError`` with its own ``RejectReason`` and a fixed detail
text: exception messages from decoders are never passed on, since they can quote input.

Order of checks, cheapest and most specific first: empty, byte cap, format by magic
number, a structural walk of the container (truncation, trailing data, embedded archive
signatures, animation chunks, CRCs, the count of JPEG scans), Pillow's header parse with
its decompression-bomb guard lowered to our pixel cap and its warning turned into an
error, frame count, a forced full decode, then the clean re-encode.

The scan cap is counted here because no decoder Pillow offers counts for us: libjpeg
decodes every scan of a progressive JPEG over the whole image, so a few bytes per scan
(an end-of-band run covers up to 32,767 blocks) buy a full pass each: 2,000 scans of a
16 MP grey image fit in 125 KB and cost ~16 s of CPU (libjpeg-turbo's report "Two Issues
with the JPEG Standard", LJT-01-003). libjpeg's own guard is a progress monitor, which
Pillow does not expose. A decoder's failed allocation propagates as ``MemoryError``: in
an image worker that is the memory limit, not a corrupt image (``services.intake.decoder``)."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.events import RejectReason
from services.kit.cost import step

ImageFormat = Literal["jpeg", "png"]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Local file header, central directory header, end of central directory (and the
# spanned-archive marker): a ZIP reader finds an archive by any of these.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x07\x08")
_ZIP_EOCD = b"PK\x05\x06"
_ZIP_EOCD_LEN = 22

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
# libjpeg's simple progression has 10 scans (6 for grey), encoders that tune the script a
# few more; 100 leaves room for any of them and bounds a 50 MP image to a few seconds.
DEFAULT_MAX_JPEG_SCANS = 100


class SanitizeError(Exception):
    """The image is refused; ``reason`` is machine-readable, ``detail`` is fixed text."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses the image worker's pipe
        return (SanitizeError, (self.reason, self.detail))


@dataclass(frozen=True)
class SanitizeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 92
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS


@dataclass(frozen=True)
class CleanImage:
    """The re-encoded image and its digests (what an image worker hands back)."""

    data: bytes
    format: ImageFormat
    width: int
    height: int
    received_sha256: str
    sanitized_sha256: str


@dataclass(frozen=True)
class SanitizedImage(CleanImage):
    image: Image.Image  # the clean decoded pixels, for the quality check


def sniff_format(data: bytes) -> ImageFormat | None:
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def _has_zip_signature(segment: bytes) -> bool:
    return any(sig in segment for sig in ZIP_SIGNATURES)


def _zip_directory_at_end(data: bytes) -> bool:
    """True when an end-of-central-directory record ends exactly at the end of the file
    (its comment covering the rest): how a ZIP reader finds an archive that an image
    has swallowed. A random match needs 48 bits to line up."""
    start = max(0, len(data) - (_ZIP_EOCD_LEN + 0xFFFF))
    pos = data.rfind(_ZIP_EOCD, start)
    while pos != -1:
        if pos + _ZIP_EOCD_LEN <= len(data):
            (comment_len,) = struct.unpack_from("<H", data, pos + 20)
            if pos + _ZIP_EOCD_LEN + comment_len == len(data):
                return True
        pos = data.rfind(_ZIP_EOCD, start, pos)
    return False


def _trailing_is_padding(tail: bytes) -> bool:
    # Some encoders pad with zeros or 0xFF after the end marker; that is not a format.
    return tail.strip(b"\x00") == b"" or tail.strip(b"\xff") == b""


def _walk_jpeg(data: bytes, max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> int:
    """Walk marker segments to EOI, skipping entropy-coded data after each SOS; the
    number of scans (SOS segments), refused past ``max_scans`` as soon as it is."""
    n = len(data)
    pos = 2
    has_mpf = False
    scans = 0
    while True:
        if pos + 2 > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "JPEG ends before its EOI marker")
        if data[pos] != 0xFF:
            raise SanitizeError(RejectReason.CORRUPT_IMAGE, "JPEG marker structure is broken")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 2 > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "JPEG ends before its EOI marker")
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            end = pos + 2
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        if marker in (0x00, 0xD8):
            raise SanitizeError(RejectReason.CORRUPT_IMAGE, "JPEG marker structure is broken")
        if pos + 4 > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "JPEG ends inside a segment")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise SanitizeError(RejectReason.CORRUPT_IMAGE, "JPEG segment length is invalid")
        seg_end = pos + 2 + length
        if seg_end > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "JPEG ends inside a segment")
        payload = data[pos + 4 : seg_end]
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn and COM: free-form bytes
            if _has_zip_signature(payload):
                raise SanitizeError(RejectReason.POLYGLOT,
                                    "JPEG metadata segment carries an archive signature")
            if marker == 0xE2 and payload.startswith(b"MPF\x00"):
                has_mpf = True
        pos = seg_end
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next real marker
            scans += 1
            if scans > max_scans:
                raise SanitizeError(RejectReason.TOO_MANY_SCANS,
                                    f"JPEG has more than {max_scans} scans")
            while True:
                ff = data.find(b"\xff", pos)
                if ff == -1 or ff + 1 >= n:
                    raise SanitizeError(RejectReason.TRUNCATED_IMAGE,
                                        "JPEG ends inside its image data")
                nxt = data[ff + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos = ff + 1 if nxt == 0xFF else ff + 2
                    continue
                pos = ff
                break
    tail = data[end:]
    if tail and not _trailing_is_padding(tail):
        if has_mpf and tail.startswith(b"\xff\xd8"):
            raise SanitizeError(RejectReason.MULTI_FRAME,
                                "JPEG is a multi-picture (MPO) file")
        raise SanitizeError(RejectReason.POLYGLOT, "data follows the JPEG EOI marker")
    return scans


_PNG_TEXTUAL = {b"tEXt", b"zTXt", b"iTXt"}


def _walk_png(data: bytes) -> None:
    """Walk chunks to IEND, checking CRCs and looking into free-form chunks."""
    n = len(data)
    pos = len(PNG_MAGIC)
    first = True
    while True:
        if pos + 8 > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "PNG ends before its IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise SanitizeError(RejectReason.CORRUPT_IMAGE, "PNG chunk structure is broken")
        body_end = pos + 8 + length
        if body_end + 4 > n:
            raise SanitizeError(RejectReason.TRUNCATED_IMAGE, "PNG ends inside a chunk")
        body = data[pos + 8 : body_end]
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise SanitizeError(RejectReason.CORRUPT_IMAGE, "PNG chunk checksum mismatch")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise SanitizeError(RejectReason.CORRUPT_IMAGE, "PNG does not start with IHDR")
            width, height = struct.unpack_from(">II", body)
            if width == 0 or height == 0:
                raise SanitizeError(RejectReason.EMPTY_IMAGE, "PNG declares zero pixels")
            first = False
        if ctype in (b"acTL", b"fcTL", b"fdAT"):
            raise SanitizeError(RejectReason.MULTI_FRAME, "PNG is animated (APNG)")
        # Critical chunks hold pixels; every other chunk is free-form and is dropped anyway,
        # but an archive hidden in one makes the file a polyglot.
        if ctype not in (b"IHDR", b"PLTE", b"IDAT", b"IEND") and _has_zip_signature(body):
            raise SanitizeError(RejectReason.POLYGLOT,
                                "PNG ancillary chunk carries an archive signature")
        pos = body_end + 4
        if ctype == b"IEND":
            break
    tail = data[pos:]
    if tail and not _trailing_is_padding(tail):
        raise SanitizeError(RejectReason.POLYGLOT, "data follows the PNG IEND chunk")


def _open_checked(data: bytes, fmt: ImageFormat, max_pixels: int) -> Image.Image:
    """Parse the header with only the one decoder allowed and the bomb guard lowered."""
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we want the
    # configured cap itself to be the hard limit, so the warning becomes an error.
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=["JPEG" if fmt == "jpeg" else "PNG"])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SanitizeError(RejectReason.TOO_MANY_PIXELS,
                                f"image declares more than {max_pixels} pixels") from None
        except (UnidentifiedImageError, SyntaxError, OSError, ValueError, struct.error,
                EOFError):
            raise SanitizeError(RejectReason.CORRUPT_IMAGE,
                                "image header could not be parsed") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise SanitizeError(RejectReason.EMPTY_IMAGE, "image has zero pixels")
    if width * height > max_pixels:  # belt and braces: the guard is a global
        raise SanitizeError(RejectReason.TOO_MANY_PIXELS,
                            f"image declares more than {max_pixels} pixels")
    if getattr(img, "n_frames", 1) > 1 or getattr(img, "is_animated", False):
        raise SanitizeError(RejectReason.MULTI_FRAME, "image has more than one frame")
    return img


def _decode_fully(img: Image.Image) -> None:
    # Decoding is lazy: only load() finds truncated or corrupt pixel data.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()
        except OSError as exc:
            if "out of memory" in str(exc):  # the codec's failed allocation
                raise MemoryError from None
            if "truncated" in str(exc):
                raise SanitizeError(RejectReason.TRUNCATED_IMAGE,
                                    "image data ends early") from None
            raise SanitizeError(RejectReason.CORRUPT_IMAGE,
                                "image data could not be decoded") from None
        except (SyntaxError, ValueError, struct.error, EOFError, zlib.error,
                Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SanitizeError(RejectReason.CORRUPT_IMAGE,
                                "image data could not be decoded") from None


def _clean_pixels(img: Image.Image, fmt: ImageFormat) -> Image.Image:
    """Pixels only: orientation applied, then copied into a fresh image with no info."""
    try:
        oriented = ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, struct.error, OSError, KeyError, TypeError):
        oriented = img  # unreadable EXIF: keep pixels as stored, the EXIF is dropped anyway
    if fmt == "jpeg":
        target = "L" if oriented.mode == "L" else "RGB"
    elif oriented.mode in ("1", "L", "LA", "RGB", "RGBA"):
        target = oriented.mode
    elif oriented.mode == "P" and "transparency" in oriented.info:
        target = "RGBA"
    elif oriented.mode.startswith("I"):
        target = "L"
    else:
        target = "RGBA" if "A" in oriented.getbands() else "RGB"
    if oriented.mode != target:
        if oriented.mode.startswith("I") and target == "L":
            oriented = oriented.point(lambda v: v / 256).convert("L")
        else:
            oriented = oriented.convert(target)
    # frombytes builds a new image whose info dict is empty: no EXIF, GPS, XMP, ICC,
    # comments or text chunks can survive into the encoder.
    return Image.frombytes(oriented.mode, oriented.size, oriented.tobytes())


def _encode(clean: Image.Image, fmt: ImageFormat, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "jpeg":
        clean.save(out, format="JPEG", quality=quality, optimize=False)
    else:
        clean.save(out, format="PNG", optimize=False)
    return out.getvalue()


def sanitize(data: bytes, limits: SanitizeLimits | None = None) -> SanitizedImage:
    """Check, decode and re-encode one probe image, or raise ``SanitizeError``."""
    limits = limits or SanitizeLimits()
    if not data or not data.strip(b"\x00 \t\r\n"):
        raise SanitizeError(RejectReason.EMPTY_IMAGE, "the image is empty")
    if len(data) > limits.max_bytes:
        raise SanitizeError(RejectReason.TOO_MANY_BYTES,
                            f"image is over the {limits.max_bytes}-byte cap")
    fmt = sniff_format(data)
    if fmt is None:
        raise SanitizeError(RejectReason.UNSUPPORTED_FORMAT,
                            "content is neither JPEG nor PNG")
    if fmt == "jpeg":
        _walk_jpeg(data, limits.max_jpeg_scans)
    else:
        _walk_png(data)
    if _zip_directory_at_end(data):
        raise SanitizeError(RejectReason.POLYGLOT, "file is also a ZIP archive")
    img = _open_checked(data, fmt, limits.max_pixels)
    _decode_fully(img)
    clean = _clean_pixels(img, fmt)
    img.close()
    with step("reencode"):
        encoded = _encode(clean, fmt, limits.jpeg_quality)
        sanitized_sha256 = hashlib.sha256(encoded).hexdigest()
    return SanitizedImage(
        data=encoded, format=fmt, width=clean.width, height=clean.height,
        received_sha256=hashlib.sha256(data).hexdigest(),
        sanitized_sha256=sanitized_sha256,
        image=clean,
    )
