"""Scores of explanation maps: against object boxes, and of perturbation curves. Numpy and torch only:
nothing here knows about models, runs or files.

How well a map finds the object:

Two standard scores, placing the map on the image as the figures do (bilinear upsampling, each map cell's
value at its cell's centre):

- **pointing game** (Zhang et al., 2016, "Top-down Neural Attention by Excitation Backprop",
  https://arxiv.org/abs/1608.00507): a hit when the map's maximum lies inside the box. The maximum is the
  peak cell, at its centre in image pixels, which is where bilinear upsampling puts that cell's value.
  (The maximum *pixel* of the upsampled map would be biased: edge clamping keeps border cells undiluted while
  interior peaks are blended with their neighbours, so the upsampled maximum of a spiky map drifts to the
  border; on the demo boxes, noise maps hit 5-10% of the time instead of the 16% any unbiased rule gives.)
  Tied peak cells count as a hit when at least half of them lie inside; a constant map points nowhere and
  never hits.
- **energy in box** (the "energy-based pointing game" of Score-CAM, Wang et al., 2020,
  https://arxiv.org/abs/1910.01279): the mass of the bilinearly upsampled map inside the box over its total
  mass. The map is first shifted so that its minimum is 0 (attention maps and logits may be negative; a
  constant offset would otherwise count as mass everywhere), so a constant map scores exactly the box's
  area fraction.

A map that knows nothing about the object scores the box's area fraction on both, in expectation
(``random_baseline``); ``random_maps`` gives seeded noise maps to score through the same code.

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels of the image the map is compared with, max exclusive
(``boxes.csv`` at a data root holds them in pixels of the original images; ``load_boxes`` scales them to the
model's input, since images are squashed to it). A pixel belongs to the box when its centre does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]


def _as_map(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """A map as a 2-D float64 array (leading singleton dimensions dropped)."""
    arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    arr = arr.astype(np.float64)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected an (h, w) map, got shape {arr.shape}")
    return arr


def upsample_map(m: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map at ``size=(H, W)`` (bilinear, cell values at cell centres), min-shifted and scaled to [0, 1];
    a constant map becomes 0.5 everywhere."""
    arr = torch.from_numpy(np.nan_to_num(_as_map(m)))[None, None]
    if tuple(arr.shape[-2:]) != tuple(size):
        arr = F.interpolate(arr, size=tuple(size), mode="bilinear", align_corners=False)
    up = arr[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.full(up.shape, 0.5)
    return (up - lo) / (hi - lo)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``S`` or ``(H, W)`` -> ``(H, W)``."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def box_mask(box: Box, image_size: int | Sequence[int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels whose centre lies in ``box``."""
    h, w = _hw(image_size)
    x0, y0, x1, y1 = box
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def _upsampled(m: torch.Tensor | np.ndarray, image_size: int | Sequence[int]) -> np.ndarray:
    """The map at image size, min-shifted and scaled to [0, 1] (scores below are scale-free)."""
    return upsample_map(m, _hw(image_size))


def pointing_game(m: torch.Tensor | np.ndarray, box: Box, image_size: int | Sequence[int]) -> bool:
    """Does the maximum of the map ``m``, placed on the image, lie inside ``box``? See the module docstring."""
    arr = _as_map(m).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return False
    h, w = _hw(image_size)
    rows, cols = np.nonzero(arr >= hi - 1e-6 * (hi - lo))
    xs = (cols + 0.5) * w / arr.shape[1]
    ys = (rows + 0.5) * h / arr.shape[0]
    x0, y0, x1, y1 = box
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return bool(inside.mean() >= 0.5)


def energy_in_box(m: torch.Tensor | np.ndarray, box: Box, image_size: int | Sequence[int]) -> float:
    """Fraction of the (upsampled, min-shifted) map's mass inside ``box``; a constant map gives the box's area."""
    up = _upsampled(m, image_size)  # in [0, 1], max 1 (a constant map: 0.5 everywhere)
    return float(up[box_mask(box, image_size)].sum() / up.sum())


def box_area_fraction(box: Box, image_size: int | Sequence[int]) -> float:
    return float(box_mask(box, image_size).mean())


def random_baseline(boxes: Sequence[Box], image_size: int | Sequence[int]) -> dict[str, float]:
    """Expected scores of a map that knows nothing about the object: both are the mean box area fraction.

    (A random map's maximum falls anywhere with equal probability, and its expected mass is spread evenly.)
    """
    area = float(np.mean([box_area_fraction(b, image_size) for b in boxes])) if boxes else float("nan")
    return {"pointing": area, "energy": area}


def random_maps(n: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``n`` seeded uniform-noise maps of ``size=(h, w)``: the sampled random baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, int(size[0]), int(size[1]), generator=g)


def score_maps(
    maps: Mapping[str, torch.Tensor | np.ndarray],
    boxes: Sequence[Box | None],
    image_size: int | Sequence[int],
) -> dict[str, dict[str, float]]:
    """``{name: {"pointing": hit rate, "energy": mean energy in box, "images": count}}`` over the images
    that have a box (``None`` entries are skipped). ``maps[name]`` is ``[N, h, w]``, aligned with ``boxes``.
    """
    keep = [i for i, b in enumerate(boxes) if b is not None]
    out: dict[str, dict[str, float]] = {}
    for name, ms in maps.items():
        if len(ms) != len(boxes):
            raise ValueError(f"maps[{name!r}] has {len(ms)} maps for {len(boxes)} boxes")
        hits = [pointing_game(ms[i], boxes[i], image_size) for i in keep]
        energy = [energy_in_box(ms[i], boxes[i], image_size) for i in keep]
        out[name] = {
            "pointing": float(np.mean(hits)) if keep else float("nan"),
            "energy": float(np.mean(energy)) if keep else float("nan"),
            "images": len(keep),
        }
    return out




def curve_auc(curve: Sequence[float]) -> float:
    """Area under a perturbation curve over the perturbed fraction 0..1 (trapezoids)."""
    c = np.asarray(curve, dtype=np.float64)
    return float(((c[1:] + c[:-1]) / 2).sum() / (len(c) - 1))


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts, rows: actual, columns: predicted."""
    idx = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def most_confused(cm: np.ndarray, classes: Sequence[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells: (actual, predicted, count)."""
    off = [(int(cm[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and cm[i, j]]
    return [(classes[i], classes[j], c) for c, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:k]]
