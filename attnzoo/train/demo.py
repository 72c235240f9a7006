"""Embedded synthetic demo dataset whose object positions are known.

The demo set is a small image-classification problem generated locally (no
network): each image shows exactly one coloured shape (one of
:data:`DEMO_CLASSES`) at a random position, size and rotation, drawn over a
cluttered, textured background (colour gradient, pixel noise, thin lines, small
dots, arcs and small rectangle outlines in random colours). Objects are bright
and saturated on a dimmer background, most clutter has the same kind of colours,
and colour, size and place are drawn independently of the class: the shape is the
only evidence of the class, so a model that classifies well has to look at the
object. Because we know where the object is, attention maps can be scored against
its bounding box. ``attnzoo fit --data demo`` trains on it.

Layout written by :func:`make_demo` (``root`` defaults to :func:`demo_root`)::

    root/
        train/<class>/<class>_00000.png ...   RGB PNG, size x size
        valid/<class>/<class>_00000.png ...
        boxes.csv
        demo.json                              generation parameters + version

``boxes.csv`` has the header ``image,x_min,y_min,x_max,y_max`` and one row per
image (train and valid). ``image`` is the path relative to ``root`` with
forward slashes (e.g. ``valid/star/star_00012.png``); the coordinates are
integer pixels of the saved image giving the tight box of the drawn object,
with ``x_max``/``y_max`` exclusive (so ``x_max - x_min`` is the width, as in
``PIL.Image.getbbox``).

Generation is deterministic given the seed: every image is rendered from its
own ``numpy.random.default_rng([seed, split, class, index])``, so the same seed
gives byte-identical PNGs and CSV regardless of loop order.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEMO_CLASSES",
    "DEMO_VERSION",
    "demo_root",
    "make_demo",
    "read_boxes",
    "render_sample",
]

DEMO_CLASSES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
DEMO_VERSION = "demo-v1"
# Bumped whenever the pictures change (drawing code or _STYLE); recorded in demo.json so
# that a cached set from an older generator is regenerated rather than reused.
_GENERATOR_REVISION = 2

_SPLITS: tuple[str, ...] = ("train", "valid")
_BOXES_HEADER = ("image", "x_min", "y_min", "x_max", "y_max")
# Entries make_demo itself writes; an existing root holding anything else is
# not ours and is never deleted.
_OWN_ENTRIES = frozenset({"train", "valid", "boxes.csv", "demo.json"})

# Generation style (part of the demo-v1 definition: changing any value changes the images).
_STYLE: dict[str, tuple[float, float]] = {
    "radius": (0.18, 0.30),  # circumradius / side: object boxes span ~30%-60% of the side
    "bg_sat": (0.1, 0.5),  # background gradient colours: saturation (blend with their grey)
    "bg_val": (0.2, 0.5),  # ... and brightness scale (backgrounds are dim, objects bright)
    "blot": (10.0, 28.0),  # std of the smooth blotch texture
    "noise": (6.0, 16.0),  # std of per-pixel noise
    "fg_sat": (0.5, 0.85),  # HSV saturation / value of object and most clutter colours
    "fg_val": (1.0, 1.0),
    "lines": (2, 5),  # number of each clutter kind, [lo, hi)
    "dots": (3, 8),
    "rects": (1, 3),
    "arcs": (0, 2),
    "contrast": (140.0, 140.0),  # min RGB distance object colour <-> background under it
}

Box = tuple[int, int, int, int]
Color = tuple[int, int, int]


def demo_root(seed: int = 0) -> pathlib.Path:
    """Default cache folder of the demo set for ``seed``.

    ``$ATTNZOO_CACHE/demo-v1-seed{seed}`` if ``ATTNZOO_CACHE`` is set, else
    ``~/.cache/attnzoo/demo-v1-seed{seed}``.
    """
    cache = os.environ.get("ATTNZOO_CACHE")
    base = pathlib.Path(cache).expanduser() if cache else pathlib.Path.home() / ".cache" / "attnzoo"
    return base / f"{DEMO_VERSION}-seed{seed}"


# --------------------------------------------------------------------------- drawing


def _saturated_color(rng: np.random.Generator) -> Color:
    """A random bright, saturated RGB colour."""
    h = float(rng.uniform(0.0, 1.0))
    s = float(rng.uniform(*_STYLE["fg_sat"]))
    v = float(rng.uniform(*_STYLE["fg_val"]))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygon(shape: str, radius: float, rng: np.random.Generator) -> np.ndarray | None:
    """Vertices (n, 2) of ``shape`` centred on the origin, or None for round shapes."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        half = radius / math.sqrt(2.0)
        pts = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    elif shape == "triangle":
        ang = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    elif shape == "star":
        inner = radius * float(rng.uniform(0.38, 0.5))
        ang = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, radius, inner)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    elif shape == "cross":
        w = radius * float(rng.uniform(0.22, 0.32))
        arm = math.sqrt(max(radius * radius - w * w, w * w))
        pts = np.array(
            [
                [-w, -arm], [w, -arm], [w, -w], [arm, -w], [arm, w], [w, w],
                [w, arm], [-w, arm], [-w, w], [-arm, w], [-arm, -w], [-w, -w],
            ]
        )  # fmt: skip
    else:
        raise ValueError(f"unknown demo shape {shape!r}; expected one of {DEMO_CLASSES}")
    return _rotate(pts, float(rng.uniform(0.0, 2 * math.pi)))


def _draw_object(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Binary ("L", 0/255) mask of one object of class ``shape`` at a random place."""
    # Radius of the circumscribed circle: the object spans roughly 25%-55% of the side.
    radius = float(rng.uniform(*_STYLE["radius"])) * size
    poly = _shape_polygon(shape, radius, rng)
    lo, hi = (np.array([-radius, -radius]), np.array([radius, radius])) if poly is None else (poly.min(0), poly.max(0))
    # Random centre such that the whole object lies inside the image (1 px margin).
    cx = float(rng.uniform(1.0 - lo[0], size - 1.0 - hi[0]))
    cy = float(rng.uniform(1.0 - lo[1], size - 1.0 - hi[1]))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    ellipse_box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(ellipse_box, fill=255)
    elif shape == "ring":
        width = max(2, round(radius * float(rng.uniform(0.2, 0.3))))
        draw.ellipse(ellipse_box, outline=255, width=width)
    else:
        assert poly is not None
        draw.polygon([(float(x) + cx, float(y) + cy) for x, y in poly], fill=255)
    return mask


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float (size, size, 3) textured background: colour gradient plus noise."""

    def bg_color() -> np.ndarray:
        c = rng.uniform(0, 255, size=3)
        grey = c.mean()
        c = grey + float(rng.uniform(*_STYLE["bg_sat"])) * (c - grey)
        return c * float(rng.uniform(*_STYLE["bg_val"]))

    c0, c1 = bg_color(), bg_color()
    angle = float(rng.uniform(0.0, 2 * math.pi))
    coords = (np.arange(size) + 0.5) / size - 0.5
    t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[:, :, None]
    # Smooth coarse blotches (bilinearly upsampled low-res noise) plus fine pixel noise.
    cells = max(2, size // 16) + 1
    blot = rng.normal(0.0, float(rng.uniform(*_STYLE["blot"])), size=(cells, cells, 3))
    pos = np.linspace(0.0, cells - 1.0, size)
    i0 = np.minimum(pos.astype(int), cells - 2)
    f = (pos - i0)[:, None]
    blot = blot[i0] * (1 - f[:, :, None]) + blot[i0 + 1] * f[:, :, None]  # rows
    blot = blot[:, i0] * (1 - f[None, :, :]) + blot[:, i0 + 1] * f[None, :, :]  # columns
    return img + blot + rng.normal(0.0, float(rng.uniform(*_STYLE["noise"])), size=(size, size, 3))


def _draw_clutter(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    """Random distractors, all far smaller or thinner than any class object."""

    def color() -> Color:
        if rng.uniform() < 0.8:
            return _saturated_color(rng)
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        return (r, g, b)

    def point() -> tuple[float, float]:
        return (float(rng.uniform(0, size)), float(rng.uniform(0, size)))

    # Thin lines and short two-segment polylines.
    for _ in range(int(rng.integers(*_STYLE["lines"]))):
        width = 1 if rng.uniform() < 0.75 else 2
        pts = [point(), point()]
        if rng.uniform() < 0.4:
            pts.append(point())
        draw.line(pts, fill=color(), width=width)
    # Small filled dots / blobs (at most ~8% of the side across).
    for _ in range(int(rng.integers(*_STYLE["dots"]))):
        x, y = point()
        r = float(rng.uniform(0.01, 0.04)) * size
        rx, ry = r * float(rng.uniform(0.6, 1.4)), r * float(rng.uniform(0.6, 1.4))
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=color())
    # Small rectangle outlines (at most ~15% of the side).
    for _ in range(int(rng.integers(*_STYLE["rects"]))):
        x, y = point()
        w, h = (float(v) * size for v in rng.uniform(0.05, 0.15, size=2))
        draw.rectangle([x, y, x + w, y + h], outline=color(), width=1)
    # Small open arcs.
    for _ in range(int(rng.integers(*_STYLE["arcs"]))):
        x, y = point()
        r = float(rng.uniform(0.04, 0.09)) * size
        start = float(rng.uniform(0, 360))
        draw.arc([x - r, y - r, x + r, y + r], start, start + float(rng.uniform(60, 200)), fill=color(), width=1)


def render_sample(
    rng: np.random.Generator, shape: str, size: int = 96, *, plain: bool = False
) -> tuple[Image.Image, Box]:
    """Render one demo image of class ``shape``; return ``(rgb_image, box)``.

    ``box`` is ``(x_min, y_min, x_max, y_max)`` (max exclusive), the tight
    bounding box of the object's pixels. With ``plain=True`` the very same
    object (same ``rng`` state gives the same place, size, rotation and colour)
    is drawn on a black background without clutter; the object colour is
    never black, so the box is then exactly the bounding box of the non-black
    pixels. This is the function :func:`make_demo` uses for every image.
    """
    if shape not in DEMO_CLASSES:
        raise ValueError(f"unknown demo shape {shape!r}; expected one of {DEMO_CLASSES}")
    mask = _draw_object(shape, size, rng)
    bbox = mask.getbbox()
    if bbox is None:  # cannot happen for size >= 16, but keep the contract
        raise RuntimeError(f"empty object mask for {shape!r} at size {size}")
    bg = _background(size, rng)
    # Object colour: saturated, and clearly different from the background
    # under the object (deterministic rejection sampling from the same rng).
    m = np.asarray(mask) > 0
    under = bg[m].mean(axis=0)
    obj_color = _saturated_color(rng)
    for _ in range(20):
        if float(np.linalg.norm(np.asarray(obj_color, dtype=float) - under)) > _STYLE["contrast"][0]:
            break
        obj_color = _saturated_color(rng)
    canvas = Image.fromarray(np.clip(bg, 0, 255).round().astype(np.uint8), "RGB")
    _draw_clutter(ImageDraw.Draw(canvas), size, rng)
    if plain:
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(obj_color, (0, 0, size, size), mask)
    return canvas, (int(bbox[0]), int(bbox[1]), int(bbox[2]), int(bbox[3]))


def sample_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """Child generator of one image; independent of generation order."""
    return np.random.default_rng([seed, _SPLITS.index(split), class_index, index])


def _class_counts(n: int) -> list[int]:
    """Split ``n`` images over the classes as evenly as possible."""
    k = len(DEMO_CLASSES)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


# --------------------------------------------------------------------------- dataset


def _params(seed: int, n_train: int, n_valid: int, size: int) -> dict[str, object]:
    return {
        "version": DEMO_VERSION,
        "generator": _GENERATOR_REVISION,
        "seed": seed,
        "n_train": n_train,
        "n_valid": n_valid,
        "size": size,
        "classes": list(DEMO_CLASSES),
    }


def _is_complete(root: pathlib.Path, params: dict[str, object]) -> bool:
    try:
        meta = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in params.items())


def _generate(out: pathlib.Path, seed: int, n_train: int, n_valid: int, size: int,
              progress: Callable[[int, int], None] | None = None) -> None:
    rows: list[tuple[str, int, int, int, int]] = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for ci, (cls, count) in enumerate(zip(DEMO_CLASSES, _class_counts(n))):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, box = render_sample(sample_rng(seed, split, ci, i), cls, size)
                name = f"{cls}_{i:05d}.png"
                img.save(folder / name, format="PNG")
                rows.append((f"{split}/{cls}/{name}", *box))
                if progress is not None:
                    progress(len(rows), n_train + n_valid)
    with open(out / "boxes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_BOXES_HEADER)
        writer.writerows(rows)


def _fresh_sibling(root: pathlib.Path, tag: str) -> pathlib.Path:
    """A new empty hidden folder next to ``root`` (same file system, so ``os.replace`` works).

    Unlike ``tempfile.mkdtemp`` (always mode 0700) it gets the usual umask permissions,
    which the dataset keeps once it is moved into place.
    """
    while True:
        path = root.parent / f".{root.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def make_demo(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    n_train: int = 1200,
    n_valid: int = 300,
    size: int = 96,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> pathlib.Path:
    """Generate the demo dataset into ``root`` (default :func:`demo_root`) and return it.

    If ``root`` already holds a complete set (``demo.json`` present, with the
    same parameters) it is returned at once unless ``force``. Otherwise the
    set is written to a temporary sibling folder, ``demo.json`` last, and then
    moved into place, so an interrupted run never looks complete. An existing
    incomplete or different demo set at ``root`` is replaced; a non-empty
    ``root`` containing anything other than demo files raises
    :class:`FileExistsError` instead of being deleted. ``progress(done, total)`` is called after each image
    written.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if n_train < 0 or n_valid < 0:
        raise ValueError("n_train and n_valid must be >= 0")
    root_path = pathlib.Path(root).expanduser() if root is not None else demo_root(seed)
    params = _params(seed, n_train, n_valid, size)
    if not force and _is_complete(root_path, params):
        return root_path
    if root_path.exists():
        if not root_path.is_dir():
            raise FileExistsError(f"{root_path} exists and is not a folder")
        foreign = sorted(p.name for p in root_path.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise FileExistsError(
                f"{root_path} is not empty and does not look like an attnzoo demo set "
                f"(unexpected entries: {foreign[:5]}); refusing to overwrite it"
            )
    root_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(root_path, "tmp")
    try:
        _generate(tmp, seed, n_train, n_valid, size, progress)
        (tmp / "demo.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if not force and _is_complete(root_path, params):
            return root_path  # another process finished the same set meanwhile
        if root_path.exists():
            old = _fresh_sibling(root_path, "old")
            os.replace(root_path, old / "set")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, root_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root_path


def read_boxes(root: str | os.PathLike[str]) -> dict[str, Box]:
    """Read ``root/boxes.csv`` into ``{relative image path: (x_min, y_min, x_max, y_max)}``."""
    boxes: dict[str, Box] = {}
    with open(pathlib.Path(root) / "boxes.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            boxes[row["image"]] = (int(row["x_min"]), int(row["y_min"]), int(row["x_max"]), int(row["y_max"]))
    return boxes
