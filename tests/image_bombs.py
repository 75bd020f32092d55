"""Images that cost far more to decode than their size says, built in memory: a progressive
JPEG with thousands of scans (libjpeg-turbo's LJT-01-003) and solid-colour PNGs of any
pixel count that compress to almost nothing."""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import Image

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, marker) of each marker segment after SOI, an SOS segment's entropy-coded
    data included; the last one is EOI."""
    pos, found = 2, []
    while True:
        marker = data[pos + 1]
        if marker == EOI:
            found.append((pos, pos + 2, marker))
            return found
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == SOS:
            while True:  # to the next marker that is not stuffing or a restart
                ff = data.index(b"\xff", end)
                if data[ff + 1] == 0 or 0xD0 <= data[ff + 1] <= 0xD7:
                    end = ff + 2
                    continue
                end = ff
                break
        found.append((pos, end, marker))
        pos = end


def scan_count(data: bytes) -> int:
    return sum(1 for _s, _e, m in jpeg_segments(data) if m == SOS)


def scan_bomb(side: int = 4000, scans: int = 2000) -> bytes:
    """A valid-looking progressive grey JPEG of ``side``² pixels and ``scans`` scans.

    Pillow's progressive encoder writes 6 scans for grey; on a flat image every AC scan is
    a few bytes of end-of-band runs, yet the decoder passes over every block for each one.
    Repeating the last scan up to ``scans`` keeps the file small (~125 KB for 2,000 scans
    of 16 MP) and makes the decode cost grow with scans x pixels (~16 s of CPU here)."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments = jpeg_segments(data)
    sos = [seg for seg in segments if seg[2] == SOS]
    if scans < len(sos):
        raise ValueError(f"a progressive grey JPEG has {len(sos)} scans already")
    start, end, _ = sos[-1]
    eoi = segments[-1][0]
    return data[:eoi] + data[start:end] * (scans - len(sos)) + data[eoi:]


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(
        ">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def flat_png(width: int, height: int, rgb: bool = True) -> bytes:
    """A complete, valid solid-colour PNG: every row is really there, so a decoder must
    allocate and fill the whole image; it compresses to ~1/1000 of its pixels."""
    channels = 3 if rgb else 1
    row = b"\x00" + bytes([97, 131, 173][:channels]) * width
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


_HELD: list[bytearray] = []


def hold_memory(mb: int) -> int:
    """Run in an image worker: keep ``mb`` MB resident there (touched, not just reserved),
    as an image's leftovers would; the worker's pid."""
    _HELD.append(bytearray(b"\x01") * (mb * 1024 * 1024))
    return os.getpid()
