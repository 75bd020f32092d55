"""The labelled face set of `frs bench intake --detectors`: the manifest is what its seed
makes, and its images are built as labelled."""

from __future__ import annotations

import io

from PIL import Image

from services.cli import face_set


def test_manifest_is_the_seeded_recipes_with_both_labels() -> None:
    rows = face_set.manifest()
    assert len(rows) >= 200
    assert [{k: v for k, v in r.items() if k != "box"} for r in rows] == face_set.recipes()
    faces = [r for r in rows if r["face"]]
    assert len(faces) >= 100 and len(rows) - len(faces) >= 100
    assert all(r["box"] for r in faces) and not any(r["box"] for r in rows if not r["face"])


def test_images_are_built_as_the_manifest_says() -> None:
    rows = face_set.manifest()
    for row in rows[:4] + rows[-4:]:
        item = face_set.render(row)
        img = Image.open(io.BytesIO(item.jpeg))
        assert img.format == "JPEG" and img.size == (item.width, item.height)
        assert item.face == row["face"]
        if item.box:
            assert list(item.box) == row["box"]
            x, y, w, h = item.box
            assert 0 <= x + w / 2 <= item.width and 0 <= y + h / 2 <= item.height
