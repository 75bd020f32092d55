"""The labelled face set behind ``frs bench intake``'s detector comparison.

Built at bench time from scikit-image's bundled photos, so no image is kept in the
repository: the manifest (``face_set.json`` beside this module) holds, for each image,
its recipe (source, crop, rotation, scale, background, photometric changes) and its label
(face or not, and the face's box in the built image). ``write_manifest`` regenerates it
from a fixed seed; ``build`` renders the images from it.

Sources and licences: ``astronaut`` (Eileen Collins, a NASA photo, public domain) and
``camera`` (the cameraman, CC0 by its photographer) are the only human faces: the set
has two distinct faces, one frontal and one in profile, varied by transformation.
The images without faces are scikit-image's other photos (coffee, a cat, a rocket,
coins, ...) and the parts of the two face photos that hold no face (suit, flag, tripod).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

MANIFEST = Path(__file__).with_name("face_set.json")
Box = tuple[int, int, int, int]  # x, y, w, h

# The face in each face photo (x, y, w, h at the photo's own size), checked by eye.
FACE_SOURCES: dict[str, Box] = {"astronaut": (172, 58, 100, 108),
                                "camera": (178, 115, 80, 82)}
# Photos without a face, and crops of the face photos that hold none (x0, y0, x1, y1).
NO_FACE_SOURCES: dict[str, tuple[int, int, int, int] | None] = {
    "coffee": None, "chelsea": None, "rocket": None, "hubble_deep_field": None,
    "motorcycle_left": None, "coins": None, "page": None, "text": None, "moon": None,
    "brick": None, "grass": None, "gravel": None, "retina": None, "immunohistochemistry": None,
    "horse": None, "logo": None, "clock": None, "color_check": None,
    "astronaut_no_face": (0, 200, 512, 512), "camera_no_face": (0, 230, 512, 512),
}
_SKIMAGE_NAME = {"astronaut_no_face": "astronaut", "camera_no_face": "camera",
                 "color_check": "colorwheel"}
_BACKGROUNDS = ("coffee", "rocket", "grass", "brick", "gravel", "motorcycle_left",
                "astronaut_no_face", "camera_no_face")
FACES, NO_FACES, SEED = 150, 110, 2126


@dataclass(frozen=True)
class Item:
    id: str
    face: bool
    box: Box | None  # the face's box in the built image
    width: int
    height: int
    jpeg: bytes


@cache
def _source(name: str) -> Image.Image:
    from skimage import data as skdata

    base = _SKIMAGE_NAME.get(name, name)
    # The stereo pair comes as (left, right, disparity).
    arr = (skdata.stereo_motorcycle()[0]  # type: ignore[no-untyped-call]
           if base == "motorcycle_left" else getattr(skdata, base)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    img = Image.fromarray(arr).convert("RGB")
    window = NO_FACE_SOURCES.get(name)
    return img.crop(window) if window else img


def _face_recipe(i: int, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "id": f"face-{i:03d}", "face": True,
        "source": "astronaut" if i % 4 else "camera",
        "face_px": int(rng.choice([32, 44, 56, 70, 84, 100, 128, 160, 200, 260])),
        "margin": round(float(rng.uniform(1.5, 4.5)), 2),
        "shift": [round(float(rng.uniform(-0.3, 0.3)), 2) for _ in range(2)],
        "angle": int(rng.choice([0, 0, 0, -8, 8, -15, 15, -25, 25])),
        "background": (str(rng.choice(_BACKGROUNDS)) if rng.random() < 0.5 else None),
        "canvas": int(rng.choice([320, 480, 640, 800, 1024])),
        "place": [round(float(rng.uniform(0.05, 0.95)), 2) for _ in range(2)],
        **_photometric(rng),
    }


def _no_face_recipe(i: int, rng: np.random.Generator) -> dict[str, Any]:
    sources = sorted(NO_FACE_SOURCES)
    return {
        "id": f"noface-{i:03d}", "face": False, "source": sources[i % len(sources)],
        "crop": [round(float(v), 2) for v in rng.uniform(0.0, 0.35, 2)]
                + [round(float(rng.uniform(0.5, 1.0)), 2)],
        "side": int(rng.choice([200, 320, 480, 640, 800, 1024])),
        **_photometric(rng),
    }


def _photometric(rng: np.random.Generator) -> dict[str, Any]:
    return {"flip": bool(rng.random() < 0.5),
            "gamma": round(float(rng.choice([1.0, 1.0, 0.6, 0.8, 1.3, 1.7])), 2),
            "blur": float(rng.choice([0, 0, 0, 1.0, 2.0])),
            "gray": bool(rng.random() < 0.2),
            "quality": int(rng.integers(60, 96))}


def recipes() -> list[dict[str, Any]]:
    rng = np.random.default_rng(SEED)
    return ([_face_recipe(i, rng) for i in range(FACES)]
            + [_no_face_recipe(i, rng) for i in range(NO_FACES)])


def write_manifest(path: Path = MANIFEST) -> None:
    """Regenerate the manifest from the seed, boxes included (they need a build)."""
    rows = [{**r, "box": _render(r)[1]} for r in recipes()]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")


def _render_face(r: dict[str, Any]) -> tuple[Image.Image, Box]:
    src = _source(r["source"])
    fx, fy, fw, fh = FACE_SOURCES[r["source"]]
    side = max(fw, fh)
    cx = fx + fw / 2 + r["shift"][0] * side
    cy = fy + fh / 2 + r["shift"][1] * side
    half = r["margin"] * side / 2
    x0, y0 = max(0, round(cx - half)), max(0, round(cy - half))
    x1, y1 = min(src.width, round(cx + half)), min(src.height, round(cy + half))
    crop = src.crop((x0, y0, x1, y1))
    # Face centre in the crop, then rotated with it about the crop's centre.
    px, py = fx + fw / 2 - x0, fy + fh / 2 - y0
    if r["angle"]:
        crop = crop.rotate(r["angle"], resample=Image.Resampling.BICUBIC,
                           fillcolor=tuple(int(v) for v in np.asarray(crop).mean((0, 1))))
        a = math.radians(r["angle"])
        ox, oy = crop.width / 2, crop.height / 2
        dx, dy = px - ox, py - oy
        px = ox + dx * math.cos(a) + dy * math.sin(a)
        py = oy - dx * math.sin(a) + dy * math.cos(a)
    k = r["face_px"] / side
    crop = crop.resize((max(1, round(crop.width * k)), max(1, round(crop.height * k))),
                       Image.Resampling.LANCZOS)
    px, py = px * k, py * k
    ox = oy = 0
    if r["background"]:
        canvas_side = max(r["canvas"], crop.width + 8, crop.height + 8)
        bg = _source(r["background"]).resize((canvas_side, canvas_side * 3 // 4 or 1),
                                             Image.Resampling.BILINEAR)
        if bg.height < crop.height + 4:
            bg = bg.resize((canvas_side, crop.height + 8), Image.Resampling.BILINEAR)
        ox = round(r["place"][0] * (bg.width - crop.width))
        oy = round(r["place"][1] * (bg.height - crop.height))
        bg.paste(crop, (ox, oy))
        crop = bg
    w, h = r["face_px"] * fw / side, r["face_px"] * fh / side
    box = (round(ox + px - w / 2), round(oy + py - h / 2), round(w), round(h))
    return crop, box


def _render(r: dict[str, Any]) -> tuple[Image.Image, Box | None]:
    box: Box | None
    if r["face"]:
        img, box = _render_face(r)
    else:
        src = _source(r["source"])
        x0, y0 = round(r["crop"][0] * src.width), round(r["crop"][1] * src.height)
        span = r["crop"][2]
        x1 = min(src.width, x0 + max(16, round(span * src.width)))
        y1 = min(src.height, y0 + max(16, round(span * src.height)))
        img = src.crop((x0, y0, x1, y1))
        k = r["side"] / max(img.size)
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))),
                         Image.Resampling.LANCZOS)
        box = None
    if r["flip"]:
        img = ImageOps.mirror(img)
        if box:
            box = (img.width - box[0] - box[2], box[1], box[2], box[3])
    if r["gamma"] != 1.0:
        lut = [round(255 * (v / 255) ** r["gamma"]) for v in range(256)]
        img = img.point(lut * 3)
    if r["blur"]:
        img = img.filter(ImageFilter.GaussianBlur(r["blur"]))
    if r["gray"]:
        img = img.convert("L").convert("RGB")
    return img, box


def manifest(path: Path = MANIFEST) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return rows


def render(row: dict[str, Any]) -> Item:
    """One image of the manifest, as JPEG, with its label."""
    img, box = _render(row)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=row["quality"])
    return Item(id=row["id"], face=row["face"], box=box, width=img.width,
                height=img.height, jpeg=buf.getvalue())


def build(path: Path = MANIFEST) -> list[Item]:
    return [render(row) for row in manifest(path)]


if __name__ == "__main__":
    write_manifest()
