"""fastai DataLoaders from an image folder, whatever its layout.

Layouts (class names always come from folder names):

- ``train/`` + ``valid/`` (or ``val/``, ``test/``), one subfolder per class in each;
- the Intel Image Classification download: ``seg_train/seg_train/<class>``, ``seg_test/seg_test/<class>``
  (``seg_pred`` has no labels and is ignored);
- one folder of class subfolders, split at random (``valid_pct``, seeded);
- ``demo``: the embedded synthetic set (``attnzoo.demo``), generated once into a cache folder.

Images of any mode become RGB; any size is squashed to ``img_size`` x ``img_size`` (squashing keeps the
whole image, so object boxes map straight onto attention maps).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AttnzooError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VALID_NAMES = ("valid", "val", "validation", "test")


@dataclass
class DatasetInfo:
    root: Path
    layout: str
    classes: list[str]
    train: list[Path] = field(repr=False)
    valid: list[Path] = field(repr=False)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, items in (("train", self.train), ("valid", self.valid)):
            c = Counter(p.parent.name for p in items)
            out[split] = {k: c.get(k, 0) for k in self.classes}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "classes": self.classes, "counts": self.counts()}


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _labelled(folder: Path) -> list[Path]:
    """Images one level below ``folder``'s class subfolders (deeper nesting counts for that class)."""
    items = []
    for d in _class_dirs(folder):
        items += _images(d)
    return items


def find_dataset(path: str | os.PathLike, valid_pct: float = 0.2, seed: int = 0) -> DatasetInfo:
    """Work out the layout of an image folder and its train/valid split."""
    root = Path(path).expanduser()
    if not root.exists():
        raise AttnzooError(f"data folder not found: {root}")
    if not root.is_dir():
        raise AttnzooError(f"data must be a folder of class subfolders, got a file: {root}")
    subdirs = {d.name.lower(): d for d in _class_dirs(root)}
    if "seg_train" in subdirs:
        train_dir = subdirs["seg_train"]
        train_dir = train_dir / "seg_train" if (train_dir / "seg_train").is_dir() else train_dir
        test_dir = subdirs.get("seg_test")
        if test_dir is not None and (test_dir / "seg_test").is_dir():
            test_dir = test_dir / "seg_test"
        layout, train, valid = "intel", _labelled(train_dir), _labelled(test_dir) if test_dir else []
        class_root = train_dir
    elif "train" in subdirs:
        valid_dir = next((subdirs[n] for n in VALID_NAMES if n in subdirs), None)
        layout, train, valid = "train/valid", _labelled(subdirs["train"]), _labelled(valid_dir) if valid_dir else []
        class_root = subdirs["train"]
    else:
        layout, train, valid, class_root = "folder", _labelled(root), [], root
    classes = sorted({p.parent.name for p in train} | {p.parent.name for p in valid})
    if not train:
        raise AttnzooError(f"no images found in class subfolders of {class_root}")
    if not valid:
        if not 0 < valid_pct < 1:
            raise AttnzooError(f"valid_pct must be between 0 and 1, got {valid_pct}")
        import random

        order = list(train)
        random.Random(seed).shuffle(order)
        n_valid = max(1, round(len(order) * valid_pct))
        valid, train = sorted(order[:n_valid]), sorted(order[n_valid:])
        layout += f" (random {valid_pct:.0%} valid, seed {seed})"
    if len(classes) < 2:
        raise AttnzooError(
            f"need at least two classes (subfolders) to classify, found {classes or 'none'} in {class_root}"
        )
    return DatasetInfo(root, layout, classes, train, valid)


def resolve_data(data: str, seed: int = 0) -> Path:
    """``demo`` -> the cached demo set (generated on first use); anything else is a path."""
    if data == "demo":
        from .demo import make_demo

        return make_demo(seed=0)
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
    """fastai ``DataLoaders`` over ``info``'s split: squash-resize, flips and a small affine, normalisation."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        Normalize,
        Resize,
        ResizeMethod,
        aug_transforms,
        parent_label,
    )

    items = list(info.train) + list(info.valid)
    valid_idx = list(range(len(info.train), len(items)))
    batch_tfms = []
    if augment:
        batch_tfms += aug_transforms(do_flip=True, max_rotate=10.0, max_zoom=1.1, max_lighting=0.2, max_warp=0.0,
                                     p_affine=0.5, p_lighting=0.5)
    batch_tfms.append(Normalize.from_stats(list(mean), list(std)))
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=info.classes)),
        get_items=lambda _: items,
        get_y=parent_label,
        splitter=IndexSplitter(valid_idx),
        item_tfms=Resize(img_size, method=ResizeMethod.Squish),
        batch_tfms=batch_tfms,
    )
    import torch

    torch.manual_seed(seed)
    dls = block.dataloaders(
        info.root, bs=bs, num_workers=default_workers() if num_workers is None else num_workers,
        device=device, seed=seed, shuffle=True,
    )
    dls.attnzoo_img_size = img_size
    return dls
