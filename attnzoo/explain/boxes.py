"""Object boxes of a data folder: ``boxes.csv`` read and scaled to the model's input.

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels, max exclusive. ``boxes.csv`` at a data root holds them in
pixels of the original images; ``load_boxes`` scales them to the model's input, since images are squashed to
it. ``attnzoo.metrics`` scores maps against them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..errors import AttnzooError
from .metrics import Box, ImageBoxes

BOXES_FILE = "boxes.csv"


def scale_box(box: Sequence[float], from_size: Sequence[int], to_size: Sequence[int]) -> Box:
    """A box in pixels of an image of ``from_size=(W, H)`` in pixels of the same image squashed to ``to_size``."""
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def has_boxes(root: str | os.PathLike) -> bool:
    return (Path(root) / BOXES_FILE).is_file()


def _relative(image: Path, root: Path) -> str:
    """``image`` as ``boxes.csv`` names it: relative to ``root``, forward slashes."""
    try:
        return image.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return image.as_posix()


def read_boxes(root: str | os.PathLike) -> dict[str, list[Box]]:
    """``root/boxes.csv`` (header ``image,x_min,y_min,x_max,y_max``, a row per box, an image may have several)
    as ``{image relative to root: [boxes in its original pixels]}``."""
    table: dict[str, list[Box]] = {}
    with open(Path(root) / BOXES_FILE, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                box = tuple(float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            except (KeyError, TypeError, ValueError):
                raise AttnzooError(f"{Path(root) / BOXES_FILE}, line {line}: expected image,x_min,y_min,x_max,y_max "
                                   "with numbers") from None
            table.setdefault(row["image"], []).append(box)  # type: ignore[arg-type]
    return table


def load_boxes(root: str | os.PathLike, images: Sequence[str | os.PathLike],
               image_size: int | Sequence[int]) -> list[ImageBoxes | None]:
    """The boxes of each image from ``root/boxes.csv``, scaled to ``image_size`` (S or (H, W)), with the
    original pixels per scaled pixel; None for an image without a box. Only image headers are read."""
    root = Path(root)
    table = read_boxes(root)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    out: list[ImageBoxes | None] = []
    for image in images:
        key = _relative(Path(image), root)
        boxes = table.get(key)
        if not boxes:
            out.append(None)
            continue
        with Image.open(root / key) as im:
            size = im.size
        out.append(ImageBoxes(tuple(scale_box(b, size, (w, h)) for b in boxes), (size[0] / w, size[1] / h)))
    return out
