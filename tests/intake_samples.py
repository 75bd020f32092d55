"""Probe images for intake tests: one good face photo and many bad inputs, all built in
memory from scikit-image's sample photos (no downloads)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from functools import cache

import numpy as np
from PIL import Image, ImageCms, ImageFilter
from skimage import data as skdata

GPS_IFD = 0x8825
ORIENTATION = 0x0112


@cache
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


def to_jpeg(img: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def to_png(img: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **options)
    return buf.getvalue()


def face_jpeg() -> bytes:
    return to_jpeg(astronaut())


def face_png() -> bytes:
    return to_png(astronaut())


def jpeg_with_metadata() -> bytes:
    """The face photo stored rotated, with EXIF orientation 6, GPS, XMP, ICC, comment."""
    # Stored rotated 90 degrees clockwise-to-view: orientation 6 says "rotate 90 CW".
    stored = astronaut().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "SecretCam"  # Make
    exif[GPS_IFD] = {1: "N", 2: (38.0, 53.0, 23.0), 3: "W", 4: (77.0, 2.0, 11.0)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
           b'photoshop:City="Secretville"/></rdf:RDF></x:xmpmeta>')
    return to_jpeg(stored, exif=exif.tobytes(), icc_profile=icc, comment=b"secret comment",
                   xmp=xmp)


def png_with_text() -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "secret comment")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>Secretville</x:xmpmeta>")
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    return to_png(astronaut(), pnginfo=info, exif=exif.tobytes())


def no_face_jpeg() -> bytes:
    return to_jpeg(Image.fromarray(skdata.coffee()))


def two_faces_jpeg() -> bytes:
    a = astronaut()
    both = Image.new("RGB", (a.width * 2, a.height))
    both.paste(a, (0, 0))
    both.paste(a.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (a.width, 0))
    return to_jpeg(both)


def small_face_jpeg() -> bytes:
    return to_jpeg(astronaut().resize((160, 160), Image.Resampling.LANCZOS))


def blurred_face_jpeg() -> bytes:
    return to_jpeg(astronaut().filter(ImageFilter.GaussianBlur(3)))


def dark_face_jpeg() -> bytes:
    arr = np.asarray(astronaut()).astype(np.float32) * 0.18
    return to_jpeg(Image.fromarray(arr.astype(np.uint8)))


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    astronaut().convert("P").save(buf, format="GIF")
    return buf.getvalue()


def bmp_bytes() -> bytes:
    buf = io.BytesIO()
    astronaut().save(buf, format="BMP")
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(
        ">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny, well-formed PNG that declares width x height (400 MP by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    # A few rows of real data: enough for a decoder to start, far less than declared.
    idat = zlib.compress(b"\x00" + b"\x00" * width, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + \
        _chunk(b"IEND", b"")


def zero_size_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + \
        _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def png_bad_pixels() -> bytes:
    """Chunks and checksums intact, but the compressed pixel stream is garbage."""
    a = astronaut()
    ihdr = struct.pack(">IIBBBBB", a.width, a.height, 8, 2, 0, 0, 0)
    garbage = bytes((i * 131 + 7) % 256 for i in range(5000))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", garbage) + \
        _chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    good = bytearray(face_png())
    good[200] ^= 0x55  # inside the first IDAT
    return bytes(good)


def truncated_jpeg() -> bytes:
    j = face_jpeg()
    return j[: len(j) // 2]


def truncated_png() -> bytes:
    p = face_png()
    return p[: len(p) // 2]


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "not a photo")
    return buf.getvalue()


def jpeg_zip_polyglot() -> bytes:
    return face_jpeg() + zip_bytes()


def png_zip_polyglot() -> bytes:
    return face_png() + zip_bytes()


def jpeg_zip_in_comment() -> bytes:
    return to_jpeg(astronaut(), comment=zip_bytes())


def animated_png() -> bytes:
    a = astronaut()
    buf = io.BytesIO()
    a.save(buf, format="PNG", save_all=True,
           append_images=[a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], duration=100)
    return buf.getvalue()


def mpo_jpeg() -> bytes:
    a = astronaut()
    buf = io.BytesIO()
    a.save(buf, format="MPO", save_all=True,
           append_images=[a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    return buf.getvalue()


def random_bytes_with_jpeg_magic(size: int) -> bytes:
    rng = np.random.default_rng(7)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def large_face_jpeg(side: int = 3000) -> bytes:
    """A ~5 MB, 9 MP face photo (upscaled, with sensor-like noise so it compresses badly)."""
    big = astronaut().resize((side, side), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(1).integers(-12, 13, (side, side, 3), dtype=np.int16)
    arr = np.clip(np.asarray(big).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return to_jpeg(Image.fromarray(arr), quality=97)
