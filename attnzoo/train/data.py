"""fastai DataLoaders from an image folder, whatever its layout.

Layouts (class names always come from folder names):

- ``train/`` + ``valid/`` (or ``val/``, ``test/``), one subfolder per class in each;
- the Intel Image Classification download: ``seg_train/seg_train/<class>``, ``seg_test/seg_test/<class>``
  (``seg_pred`` has no labels and is ignored);
- one folder of class subfolders, split at random (``valid_pct``, seeded);
- ``demo``: the embedded synthetic set (``attnzoo.train.demo``), generated once into a cache folder.

Images of any mode become RGB (``to_rgb``: 16-bit and float images are rescaled, transparency is flattened
onto white, EXIF orientation is honoured); any size is squashed to ``img_size`` x ``img_size`` (squashing
keeps the whole image, so object boxes map straight onto attention maps).

Every file in a class folder is checked before training (``scan_images``: decoded in parallel threads, JPEGs
at 1/8 scale): files that are empty, not images, cannot be decoded, are broken symlinks or are over the
decompression-bomb limit are left out and listed in ``DatasetInfo.skipped``. Symlinked files are followed;
symlinked folders inside a class folder are not, and a symlinked class folder that leads back into the data
folder is refused (no loops). Hidden and system folders (``.ipynb_checkpoints``, ``__MACOSX``, any dot-folder)
and attnzoo's own run folders (any folder holding ``attnzoo.json``, and folders of them such as ``runs/``) are
never read as data; ``DatasetInfo.warnings`` says what was ignored. Split folder names that differ only in
case (``Train/`` beside ``train/``) are an error naming them.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnzooError, first_line
from ..runs.folder import is_own_folder
from ..runs.outputs import IMAGE_EXTENSIONS, is_own_figure

VALID_NAMES = ("valid", "val", "validation", "test")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold; larger images are refused, never decoded
SYSTEM_DIRS = {"__macosx", "__pycache__", "@eadir", "$recycle.bin", "system volume information", "lost+found"}
SPLIT_NAMES = ("train", *VALID_NAMES, "seg_train", "seg_test")


@dataclass
class DatasetInfo:
    root: Path
    layout: str
    classes: list[str]
    train: list[Path] = field(repr=False)
    valid: list[Path] = field(repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (path, reason)
    warnings: list[str] = field(default_factory=list, repr=False)
    labels: dict[Path, str] = field(default_factory=dict, repr=False)  # path -> class (its class folder)

    def label(self, path: Path) -> str:
        return self.labels.get(Path(path)) or Path(path).parent.name

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, items in (("train", self.train), ("valid", self.valid)):
            c = Counter(self.label(p) for p in items)
            out[split] = {k: c.get(k, 0) for k in self.classes}
        return out

    def fingerprint(self) -> str:
        """A digest of which file (path under the root and content) is in which class and split: a move, a
        swap of two folders' contents, an edit, an addition or a removal changes it. Files are hashed in
        parallel threads (about as costly as the decode check before training)."""
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        def digest(p: Path) -> bytes:
            h = hashlib.sha256()
            try:
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as e:
                h.update(f"unreadable: {e.errno}".encode())
            return h.digest()

        rows = [(split, p) for split, items in (("train", self.train), ("valid", self.valid)) for p in sorted(items)]
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
            digests = list(pool.map(digest, [p for _, p in rows]))
        h = hashlib.sha256()
        for (split, p), d in zip(rows, digests):
            try:
                rel = os.fsencode(Path(p).relative_to(self.root))
            except ValueError:
                rel = os.fsencode(p)
            h.update(b"\0".join([split.encode(), os.fsencode(self.label(p)), rel, d]) + b"\n")
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "classes": self.classes, "counts": self.counts(),
                "fingerprint": self.fingerprint(), "skipped": len(self.skipped), "warnings": self.warnings}


def to_rgb(im: Any) -> Any:
    """Any PIL image as 8-bit RGB: 16-bit/32-bit/float images rescaled (not clipped), transparency flattened
    onto white, palette, CMYK, grey and the rest converted."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535 and arr.max() > 255):
            arr = arr / 257.0
        elif im.mode == "F" or arr.max() > 255 or arr.min() < 0:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


class ImageTooLarge(ValueError):
    """An image over ``MAX_PIXELS``, refused from its header."""


def _open_bounded(path: str | os.PathLike) -> Any:
    """``Image.open(path)``, refused (``ImageTooLarge``) from the header when over ``MAX_PIXELS``: never decoded."""
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"too large: over the {MAX_PIXELS:,}-pixel decompression-bomb limit") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageTooLarge(f"too large: {w}x{h} pixels is over the {MAX_PIXELS:,}-pixel decompression-bomb limit")
    return im


def open_rgb(path: str | os.PathLike, size: int | None = None) -> Any:
    """Open an image file as RGB with its EXIF orientation applied; ``size``: JPEGs may be decoded at a
    reduced scale that is still at least ``size`` on both sides (the training resize follows)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open_bounded(path)
    with im:
        if size:
            im.draft("RGB", (size, size))
        return to_rgb(ImageOps.exif_transpose(im))


class _LabelOf:
    """fastai ``get_y``: the class folder an image was found in (picklable for DataLoader workers)."""

    def __init__(self, labels: dict[Path, str]) -> None:
        self.labels = labels

    def __call__(self, path: Any) -> str:
        return self.labels.get(Path(path)) or Path(path).parent.name


class ImageOpener:
    """fastai type transform: path -> ``PILImage`` through ``open_rgb`` (picklable for DataLoader workers); with
    one channel, the image in grey (``as_channels``)."""

    def __init__(self, size: int | None = None, channels: int = 3) -> None:
        self.size, self.channels = size, channels

    def __call__(self, path: Any) -> Any:
        from fastai.vision.core import PILImage

        return PILImage.create(as_channels(open_rgb(path, self.size), self.channels))


def as_channels(image: Any, channels: int) -> Any:
    """An RGB PIL image as the model reads it: unchanged for 3 channels, grey (ITU-R 601 luma) for 1."""
    return image.convert("L") if channels == 1 else image


def normalisation(pretrained_cfg: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's mean and std for ``channels``: its own (RGB); for grey images, their average (the grey of
    the mean colour, near enough: pretrained weights then see inputs of the scale they were trained on)."""
    mean, std = tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)
    if channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as a training image, or None. Decodes it (JPEGs at 1/8 scale)."""

    try:
        if path.is_symlink() and not path.exists():
            return "broken symlink"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with _open_bounded(path) as im:  # (scan_images silences PIL's warning around the threads)
            if is_own_figure(im):
                return "attnzoo's own figure, not data"
            w, h = im.size
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except ImageTooLarge as e:
        return str(e)
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, struct.error, zlib.error, ...)
        return f"cannot be decoded: {first_line(e, limit=200)}"
    return None


def scan_images(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """``{path: reason}`` for the files among ``paths`` that cannot be used; decoding runs in threads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    if not paths:
        return {}
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if workers <= 1 or len(paths) < 64:
            reasons = [check_image(p) for p in paths]
        else:
            with ThreadPoolExecutor(workers) as pool:
                reasons = list(pool.map(check_image, paths, chunksize=32))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def _ignored_dir(d: Path) -> str | None:
    """Why folder ``d`` is not data, or None: hidden, a system folder, or attnzoo's own output."""
    if d.name.startswith(".") or d.name.lower() in SYSTEM_DIRS:
        return "hidden or system folder"
    own = is_own_folder(d)
    if own is not None:
        return own
    try:
        if any(c.is_dir() and is_own_folder(c) for c in d.iterdir()):
            return "holds attnzoo run folders"
    except OSError:
        return None
    return None


def _files(folder: Path, ignored: Ignored | None = None) -> list[Path]:
    """Every non-folder entry under ``folder`` (symlinked files included, broken ones too); symlinked,
    hidden, system and run folders are not entered: they go to ``ignored``."""
    found = []
    for top, dirs, files in os.walk(folder):
        keep = []
        for d in dirs:
            why = _ignored_dir(Path(top) / d)
            if why is None:
                keep.append(d)
            elif ignored is not None:
                ignored.add(Path(top) / d, why)
        dirs[:] = keep
        for name in files:
            p = Path(top) / name
            if p.is_file() or (p.is_symlink() and not p.exists()):
                found.append(p)
    return sorted(found)


class Ignored(dict):
    """Folders that are not data, ``{path below the data root: why}``: named in a warning."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def add(self, folder: Path, why: str) -> None:
        self[Path(folder).relative_to(self.root).as_posix()] = why


def _class_dirs(folder: Path, ignored: Ignored | None = None) -> list[Path]:
    """The subfolders of ``folder`` that hold data; the others go to ``ignored``. A symlinked folder that leads
    back to ``folder`` or above it, or to the same place as another, is refused."""
    out, targets = [], {}
    for d in sorted(folder.iterdir()):
        if not d.is_dir():
            continue
        why = _ignored_dir(d)
        if why is not None:
            if ignored is not None:
                ignored.add(d, why)
            continue
        real = d.resolve()
        if d.is_symlink() and folder.resolve().is_relative_to(real):
            raise AttnzooError(f"{d} is a symlink to {real}, which holds the data folder itself: a loop; "
                               f"remove the link or point --data elsewhere")
        if real in targets:
            raise AttnzooError(f"{d} and {targets[real]} are the same folder ({real}) through a symlink: "
                               f"its images would count twice; remove one")
        targets[real] = d
        out.append(d)
    return out


def _labelled(folder: Path, labels: dict[Path, str], skipped: list[tuple[Path, str]], empty: list[str],
              ignored: Ignored) -> list[Path]:
    """Image files below ``folder``'s class subfolders (deeper nesting counts for that class: ``labels``
    maps each to its class folder's name); other files go to ``skipped`` with a reason, class folders with
    no image file to ``empty``, folders that are not data to ``ignored``."""
    items = []
    for d in _class_dirs(folder, ignored):
        found = 0
        for p in _files(d, ignored):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(p)
                labels[p] = d.name
                found += 1
            else:
                skipped.append((p, f"not an image file ({p.suffix or p.name})"))
        if not found:
            empty.append(d.name)
    return items


def find_dataset(path: str | os.PathLike, valid_pct: float = 0.2, seed: int = 0, check: bool = True,
                 workers: int | None = None) -> DatasetInfo:
    """Work out the layout of an image folder and its train/valid split.

    ``check``: decode every image first (``scan_images``) and leave out the ones that cannot be used; they
    and every other left-out file are listed in ``skipped``. Problems that do not stop training (an empty
    class folder, a class with one image) are listed in ``warnings``.
    """
    root = Path(path).expanduser().absolute()  # recorded in the run: never resolved against another folder later
    if not root.exists():
        raise AttnzooError(f"data folder not found: {root}")
    if not root.is_dir():
        raise AttnzooError(f"data must be a folder of class subfolders, got a file: {root}")
    skipped: list[tuple[Path, str]] = []
    empty: list[str] = []
    labels: dict[Path, str] = {}
    ignored = Ignored(root)
    subdirs = _split_dirs(_class_dirs(root, ignored))
    if "seg_train" in subdirs:
        train_dir = subdirs["seg_train"]
        train_dir = train_dir / "seg_train" if (train_dir / "seg_train").is_dir() else train_dir
        test_dir = subdirs.get("seg_test")
        if test_dir is not None and (test_dir / "seg_test").is_dir():
            test_dir = test_dir / "seg_test"
        layout, class_root = "intel", train_dir
        train = _labelled(train_dir, labels, skipped, empty, ignored)
        valid_dir = test_dir
        valid = _labelled(test_dir, labels, skipped, [], ignored) if test_dir else []
    elif "train" in subdirs and _class_dirs(subdirs["train"]):  # a flat set may have a class called 'train'
        valid_dir = next((subdirs[n] for n in VALID_NAMES if n in subdirs), None)
        unused = [subdirs[n].name for n in VALID_NAMES if n in subdirs and subdirs[n] != valid_dir]
        if unused:
            ignored.update({n: f"not used: {valid_dir.name}/ is the validation split" for n in unused})
        layout, class_root = "train/valid", subdirs["train"]
        train = _labelled(subdirs["train"], labels, skipped, empty, ignored)
        valid = _labelled(valid_dir, labels, skipped, [], ignored) if valid_dir else []
    else:
        layout, class_root = "folder", root
        valid_dir = None
        train, valid = _labelled(root, labels, skipped, empty, ignored), []
    if check:
        bad = scan_images(train + valid, workers)
        skipped += list(bad.items())
        train = [p for p in train if p not in bad]
        valid = [p for p in valid if p not in bad]
    skipped.sort()
    notes = [f"ignored folder '{name}/' ({why})" for name, why in ignored.items()]
    notes += [f"class folder '{name}' has no images: left out" for name in empty]
    if not train:
        why = f" ({len(skipped)} files skipped as unusable)" if skipped else ""
        raise AttnzooError(f"no usable images found in class subfolders of {class_root}{why}")
    if valid_dir is not None and not valid:  # never the training images as "validation" without a word
        raise AttnzooError(f"{valid_dir} holds no usable images: add some, or remove the folder to split "
                           f"{class_root.name}/ at random (--valid-pct)")
    classes = sorted({labels[p] for p in train} | {labels[p] for p in valid})
    if not valid:
        if not 0 < valid_pct < 1:
            raise AttnzooError(f"valid_pct must be between 0 and 1, got {valid_pct}")
        train, valid = _random_split(train, labels, valid_pct, seed)
        layout += f" (random {valid_pct:.0%} valid, seed {seed})"
    if len(classes) < 2:
        raise AttnzooError(
            f"need at least two classes (subfolders) to classify, found {classes or 'none'} in {class_root}"
        )
    counts = Counter(labels[p] for p in train)
    notes += [f"class '{c}' has a single training image" for c in classes if counts.get(c, 0) == 1]
    notes += [f"class '{c}' has no training images (only validation ones)" for c in classes if not counts.get(c)]
    return DatasetInfo(root, layout, classes, train, valid, [(str(p), r) for p, r in skipped], notes,
                       {p: labels[p] for p in train + valid})


def _split_dirs(dirs: list[Path]) -> dict[str, Path]:
    """``{lower-case name: folder}``; split names (train, valid, ...) that differ only in case are an error."""
    out: dict[str, Path] = {}
    for d in dirs:
        key = d.name.lower()
        if key in out and key in SPLIT_NAMES:
            raise AttnzooError(f"the data folder has both '{out[key].name}/' and '{d.name}/': which one is the "
                               f"{key} split is ambiguous; merge them or rename one")
        out.setdefault(key, d)
    return out


def _random_split(items: list[Path], labels: dict[Path, str], valid_pct: float,
                  seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded random split in which every class keeps at least one training image."""
    import random

    order = list(items)
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(order) * valid_pct))
    valid, train = order[:n_valid], order[n_valid:]
    in_train = {labels[p] for p in train}
    for p in list(valid):
        if labels[p] not in in_train:
            valid.remove(p)
            train.append(p)
            in_train.add(labels[p])
    return sorted(train), sorted(valid)


def resolve_data(data: str, seed: int = 0, progress: Any = None, notes: list[str] | None = None) -> Path:
    """``demo`` -> the cached demo set (generated on first use, ``progress(done, total)`` per image); anything
    else is a path. ``notes`` is told when a folder named ``demo`` here is not the one used."""
    if not isinstance(data, str) or not data.strip():
        raise AttnzooError("--data is empty: give an image folder, or 'demo' for the built-in set")
    if data == "demo":
        from .demo import make_demo

        if notes is not None and Path("demo").is_dir():
            notes.append("--data demo is the built-in demo set, not the folder ./demo here (to train on that "
                         "folder, pass --data ./demo)")
        return make_demo(seed=0, progress=progress)
    return Path(data)


def default_workers() -> int:
    import torch

    return min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0


def image_dataloaders(
    info: DatasetInfo,
    img_size: int = 224,
    bs: int = 32,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    augment: bool = True,
    num_workers: int | None = None,
    seed: int = 0,
    device: Any = None,
):
    """fastai ``DataLoaders`` over ``info``'s split: squash-resize, flips and a small affine, normalisation.

    Images are opened with ``open_rgb`` (EXIF orientation, any mode to RGB, large JPEGs decoded at a
    reduced scale); the augmentation runs batch-wise on the device; pinned memory when CUDA is available."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        IndexSplitter,
        IntToFloatTensor,
        Normalize,
        Resize,
        ResizeMethod,
        TransformBlock,
        aug_transforms,
    )

    items = list(info.train) + list(info.valid)
    valid_idx = list(range(len(info.train), len(items)))
    batch_tfms = []
    if augment:
        batch_tfms += aug_transforms(do_flip=True, max_rotate=10.0, max_zoom=1.1, max_lighting=0.2, max_warp=0.0,
                                     p_affine=0.5, p_lighting=0.5)
    batch_tfms.append(Normalize.from_stats(list(mean), list(std)))
    block = DataBlock(
        blocks=(TransformBlock(type_tfms=ImageOpener(img_size, len(mean)), batch_tfms=IntToFloatTensor),
                CategoryBlock(vocab=info.classes)),
        get_items=lambda _: items,
        get_y=_LabelOf(info.labels),
        splitter=IndexSplitter(valid_idx),
        item_tfms=Resize(img_size, method=ResizeMethod.Squish),
        batch_tfms=batch_tfms,
    )
    import torch

    torch.manual_seed(seed)
    dls = block.dataloaders(
        info.root, bs=bs, num_workers=default_workers() if num_workers is None else num_workers,
        device=device, seed=seed, shuffle=True, pin_memory=torch.cuda.is_available(),
    )
    dls.attnzoo_img_size = img_size
    return dls
