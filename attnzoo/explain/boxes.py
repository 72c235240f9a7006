"""Object boxes of a data folder: ``boxes.csv`` read and scaled to the model's input.

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels, max exclusive. ``boxes.csv`` at a data root holds them in
pixels of the original images; ``load_boxes`` scales them to the model's input, since images are squashed to
it. ``attnzoo.explain.metrics`` scores maps against them.
"""

from __future__ import annotations

import csv
import math
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


COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max")


def _box(row: dict[str, str], where: str) -> Box:
    """One row's box: finite numbers, each min below its max; anything else is one line naming the row."""
    try:
        box = tuple(float(row[k]) for k in COLUMNS[1:])
    except (KeyError, TypeError, ValueError):
        raise AttnzooError(f"{where}: expected {','.join(COLUMNS)} with numbers") from None
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        raise AttnzooError(f"{where}: coordinates must be finite numbers, got {','.join(row[k] for k in COLUMNS[1:])}")
    if not (x0 < x1 and y0 < y1):
        raise AttnzooError(f"{where}: a box needs x_min < x_max and y_min < y_max (a positive area), got "
                           f"({x0:g}, {y0:g}, {x1:g}, {y1:g})")
    return box


def read_boxes(root: str | os.PathLike) -> dict[str, list[Box]]:
    """``root/boxes.csv`` (header ``image,x_min,y_min,x_max,y_max``, a row per box, an image may have several)
    as ``{image relative to root: [boxes in its original pixels]}``. A file saved by a spreadsheet (a byte-order
    mark, CRLF lines, spaces or capitals in the header) reads the same; a row that is not a box is one line."""
    path = Path(root) / BOXES_FILE
    table: dict[str, list[Box]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
            if not set(COLUMNS) <= set(reader.fieldnames):
                raise AttnzooError(f"{path}: the first line must name the columns {','.join(COLUMNS)}, got "
                                   f"{','.join(reader.fieldnames)[:80] or 'nothing'}")
            for line, row in enumerate(reader, start=2):
                table.setdefault(row["image"].strip(), []).append(_box(row, f"{path}, line {line}"))
    except UnicodeDecodeError:
        raise AttnzooError(f"{path} is not a text (UTF-8) CSV file") from None
    except csv.Error as e:
        raise AttnzooError(f"{path} is not a CSV file: {e}") from None
    return table


def clip_box(box: Box, size: Sequence[int]) -> Box | None:
    """``box`` clipped to an image of ``size=(W, H)``; None when nothing of it is inside."""
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], size[0]), min(box[3], size[1])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def load_boxes(root: str | os.PathLike, images: Sequence[str | os.PathLike],
               image_size: int | Sequence[int], notes: list[str] | None = None) -> list[ImageBoxes | None]:
    """The boxes of each image from ``root/boxes.csv``, clipped to the image and scaled to ``image_size``
    (S or (H, W)), with the original pixels per scaled pixel; None for an image without a box. Only image
    headers are read. ``notes`` receives what a reader of the scores must know: boxes outside their image
    (dropped), how many of ``images`` have boxes at all."""
    root = Path(root)
    table = read_boxes(root)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    out: list[ImageBoxes | None] = []
    outside = 0
    for image in images:
        key = _relative(Path(image), root)
        if key not in table:
            out.append(None)
            continue
        with Image.open(root / key) as im:
            size = im.size
        inside = [c for c in (clip_box(b, size) for b in table.get(key, ())) if c is not None]
        outside += len(table.get(key, ())) - len(inside)
        out.append(ImageBoxes(tuple(scale_box(b, size, (w, h)) for b in inside), (size[0] / w, size[1] / h))
                   if inside else None)
    if notes is not None:
        found = sum(b is not None for b in out)
        if outside:
            notes.append(f"{outside} boxes in {BOXES_FILE} lie wholly outside their image and were left out")
        if not found:
            named = next(iter(table), None)
            notes.append(f"{root / BOXES_FILE} has boxes for none of the {len(images)} images scored" + (
                f" (it names e.g. '{named}'; names are paths relative to {root})" if named else " (it has no rows)"))
        elif found < len(images):
            notes.append(f"{BOXES_FILE} has boxes for {found} of the {len(images)} images scored: the localisation "
                         f"scores are over those {found}")
    return out
