"""Scores of explanation maps, computed from maps, boxes and curves alone (numpy and torch; nothing here knows
about models, runs or files). Each is tested against hand-made maps whose answers are known.

A map covers the whole image it explains: it is placed on it by bilinear upsampling, each map cell's value
at its cell's centre. Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels of that image, max exclusive; a
pixel belongs to a box when its centre does. An image may have several boxes: a hit in any box counts, and
mass and masks are scored against their union.

**Does the map find the object?**

- **pointing game** (Zhang et al., 2016, https://arxiv.org/abs/1608.00507): a hit when the map's maximum lies
  inside a box. The maximum is the peak cell, at its centre in image pixels, where bilinear upsampling puts
  that cell's value (the maximum *pixel* of an upsampled map is biased toward the border: edge clamping keeps
  border cells undiluted). Tied peak cells hit when at least half of them do; a constant map never hits.
  With ``tolerance`` (TorchRay's benchmark: 15 pixels of the original image), a peak within that distance of a
  box hits too; ``px`` gives the original image's pixels per map-image pixel, since images are squashed.
- **energy in box**, the energy-based pointing game of Score-CAM (Wang et al., 2020,
  https://arxiv.org/abs/1910.01279): the share of the upsampled map's mass inside the boxes. A map with
  negative values is first shifted so that its minimum is 0; a map without mass (all zero) has none inside.
- **IoU**: the intersection over union of the map thresholded at ``threshold`` of its range (min-max
  normalised, cells strictly above) with the union of the boxes.
- **MaxBoxAcc** (Choe et al., 2020, wsolevaluation, https://arxiv.org/abs/2001.07437): for each threshold, the
  box around the pixels above it is the map's box; BoxAcc is the share of images whose box has IoU >= 0.5 with
  one of their boxes; MaxBoxAcc is the best threshold's BoxAcc. (wsolevaluation boxes the largest connected
  region; here all pixels above the threshold are boxed together.)

A map that knows nothing about the object scores, in expectation, the boxes' area fraction on the pointing
game and on energy (``random_baseline``); ``random_maps`` gives seeded noise maps to score through the same
code for every score.

**Other scores**: ``curve_auc`` (deletion / insertion curves), ``rank_correlation`` (the sanity check of
Adebayo et al., 2018, https://arxiv.org/abs/1810.03292: maps of a trained and a randomised model), ``flags``
(inverted and insensitive maps), and the confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]
Size = int | Sequence[int]
THRESHOLDS = tuple(np.round(np.arange(0.0, 1.0, 0.01), 2))  # wsolevaluation's cam_curve_interval


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image in pixels of the image the map covers, and the original image's pixels per such
    pixel ``(x, y)``, so that a pointing tolerance can be given in original pixels."""

    boxes: tuple[Box, ...]
    px: tuple[float, float] = (1.0, 1.0)


def _hw(image_size: Size) -> tuple[int, int]:
    """``S`` or ``(H, W)`` -> ``(H, W)``."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _box_list(boxes: Box | Sequence[Box]) -> list[Box]:
    """One box or several, as a list."""
    if len(boxes) == 4 and all(isinstance(v, (int, float, np.number)) for v in boxes):
        return [tuple(float(v) for v in boxes)]  # type: ignore[list-item]
    return [tuple(float(v) for v in b) for b in boxes]  # type: ignore[misc]


def _as_map(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """A map as a 2-D float64 array (leading singleton dimensions dropped, NaN as 0)."""
    arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    arr = arr.astype(np.float64)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected an (h, w) map, got shape {arr.shape}")
    return np.nan_to_num(arr)


def _bilinear(m: torch.Tensor | np.ndarray, image_size: Size) -> np.ndarray:
    arr = torch.from_numpy(_as_map(m))[None, None]
    size = _hw(image_size)
    if tuple(arr.shape[-2:]) != size:
        arr = F.interpolate(arr, size=size, mode="bilinear", align_corners=False)
    return arr[0, 0].numpy()


def upsample_map(m: torch.Tensor | np.ndarray, image_size: Size) -> np.ndarray:
    """The map at image size, min-max normalised to [0, 1] (a constant map is 0 everywhere)."""
    up = _bilinear(m, image_size)
    lo, hi = float(up.min()), float(up.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.zeros_like(up)
    return (up - lo) / (hi - lo)


def _distance(xs: np.ndarray, ys: np.ndarray, boxes: Sequence[Box], px: Sequence[float]) -> np.ndarray:
    """Distance of points to the nearest box, in original-image pixels (0 inside or on the edge)."""
    best = np.full(np.shape(xs), np.inf)
    for x0, y0, x1, y1 in boxes:
        dx = np.maximum.reduce([x0 - xs, np.zeros_like(xs), xs - x1]) * px[0]
        dy = np.maximum.reduce([y0 - ys, np.zeros_like(ys), ys - y1]) * px[1]
        best = np.minimum(best, np.hypot(dx, dy))
    return best


def _inside(xs: np.ndarray, ys: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    out = np.zeros(np.shape(xs), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        out |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return out


def _hits(xs: np.ndarray, ys: np.ndarray, boxes: Sequence[Box], tolerance: float, px: Sequence[float]) -> np.ndarray:
    inside = _inside(xs, ys, boxes)
    return inside | (_distance(xs, ys, boxes, px) <= tolerance) if tolerance > 0 else inside


def box_mask(boxes: Box | Sequence[Box], image_size: Size, tolerance: float = 0.0,
             px: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels whose centre lies in a box (or within ``tolerance`` original
    pixels of one)."""
    h, w = _hw(image_size)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return _hits(xs, ys, _box_list(boxes), tolerance, px)


def box_area_fraction(boxes: Box | Sequence[Box], image_size: Size) -> float:
    return float(box_mask(boxes, image_size).mean())


def pointing_game(m: torch.Tensor | np.ndarray, boxes: Box | Sequence[Box], image_size: Size,
                  tolerance: float = 0.0, px: Sequence[float] = (1.0, 1.0)) -> bool:
    """Does the map's maximum, placed on the image, lie in a box (or within ``tolerance`` original pixels)?"""
    arr = _as_map(m)
    lo, hi = float(arr.min()), float(arr.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return False
    h, w = _hw(image_size)
    rows, cols = np.nonzero(arr >= hi - 1e-6 * (hi - lo))
    xs = (cols + 0.5) * w / arr.shape[1]
    ys = (rows + 0.5) * h / arr.shape[0]
    return bool(_hits(xs, ys, _box_list(boxes), tolerance, px).mean() >= 0.5)


def energy_in_box(m: torch.Tensor | np.ndarray, boxes: Box | Sequence[Box], image_size: Size) -> float:
    """Share of the upsampled map's mass inside the boxes (negative maps shifted to a minimum of 0)."""
    up = _bilinear(m, image_size)
    up = up - min(0.0, float(up.min()))
    total = float(up.sum())
    return float(up[box_mask(boxes, image_size)].sum() / total) if total > 0 else 0.0


def mask_iou(m: torch.Tensor | np.ndarray, boxes: Box | Sequence[Box], image_size: Size,
             threshold: float = 0.5) -> float:
    """IoU of the pixels above ``threshold`` (of the min-max normalised map) with the union of the boxes."""
    above = upsample_map(m, image_size) > threshold
    inside = box_mask(boxes, image_size)
    union = int((above | inside).sum())
    return float((above & inside).sum() / union) if union else 0.0


def _box_iou(a: np.ndarray, b: Box) -> np.ndarray:
    """IoU of boxes ``a`` ``[..., 4]`` with the box ``b``."""
    iw = np.clip(np.minimum(a[..., 2], b[2]) - np.maximum(a[..., 0], b[0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[3]) - np.maximum(a[..., 1], b[1]), 0, None)
    inter = iw * ih
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return np.where(area > 0, inter / np.where(area > 0, area, 1), 0.0)


def box_ious(m: torch.Tensor | np.ndarray, boxes: Box | Sequence[Box], image_size: Size,
             thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """``[len(thresholds)]``: at each threshold, the best IoU of the box around the pixels above it (of the
    min-max normalised map) with one of the boxes; 0 where no pixel is above."""
    up = upsample_map(m, image_size)
    above = up[None] > np.asarray(thresholds, dtype=np.float64)[:, None, None]
    rows, cols = above.any(2), above.any(1)
    h, w = up.shape
    found = rows.any(1)
    y0, y1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
    est = np.stack([x0, y0, x1, y1], -1).astype(np.float64)
    best = np.max([_box_iou(est, b) for b in _box_list(boxes)], axis=0)
    return np.where(found, best, 0.0)


def max_box_acc(ious: np.ndarray, iou: float = 0.5) -> tuple[float, int]:
    """MaxBoxAcc from ``[images, thresholds]`` box IoUs: the best threshold's share of images with IoU >= ``iou``,
    and that threshold's index."""
    acc = (np.asarray(ious) >= iou).mean(0)
    best = int(acc.argmax())
    return float(acc[best]), best


def random_baseline(boxes: Sequence[ImageBoxes], image_size: Size, tolerance: float = 0.0) -> dict[str, float]:
    """Expected pointing game and energy of a map that knows nothing about the object: the mean area fraction
    of the boxes (a random map's peak falls anywhere alike; its expected mass is spread evenly), and of the
    boxes grown by ``tolerance`` for the pointing game with tolerance."""
    if not boxes:
        return {"pointing": math.nan, "pointing_tolerance": math.nan, "energy": math.nan}
    area = float(np.mean([box_mask(b.boxes, image_size).mean() for b in boxes]))
    grown = float(np.mean([box_mask(b.boxes, image_size, tolerance, b.px).mean() for b in boxes]))
    return {"pointing": area, "pointing_tolerance": grown, "energy": area}


def random_maps(n: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``n`` seeded uniform-noise maps of ``size=(h, w)``: the sampled random baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, int(size[0]), int(size[1]), generator=g)


def score_maps(maps: Mapping[str, torch.Tensor | np.ndarray], boxes: Sequence[ImageBoxes | Box | None],
               image_size: Size, tolerance: float = 0.0, iou_threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Every localisation score of every map, averaged over the images that have boxes (``None`` entries are
    skipped): ``{name: {pointing, pointing_tolerance, energy, iou, max_box_acc, max_box_acc_threshold, flat,
    images}}``, ``flat`` the share of constant maps (all zero, say), which point nowhere.
    ``maps[name]`` is ``[N, h, w]``, aligned with ``boxes``; a plain box is an ``ImageBoxes`` of one box."""
    keep = [i for i, b in enumerate(boxes) if b is not None]
    per = {i: b if isinstance(b, ImageBoxes) else ImageBoxes(tuple(_box_list(b))) for i, b in enumerate(boxes)
           if b is not None}
    nan = math.nan
    out: dict[str, dict[str, float]] = {}
    for name, ms in maps.items():
        if len(ms) != len(boxes):
            raise ValueError(f"maps[{name!r}] has {len(ms)} maps for {len(boxes)} images")
        if not keep:
            out[name] = dict(pointing=nan, pointing_tolerance=nan, energy=nan, iou=nan, max_box_acc=nan,
                             max_box_acc_threshold=nan, flat=nan, images=0)
            continue
        ious = np.stack([box_ious(ms[i], per[i].boxes, image_size) for i in keep])
        acc, best = max_box_acc(ious)
        out[name] = dict(
            pointing=float(np.mean([pointing_game(ms[i], per[i].boxes, image_size) for i in keep])),
            pointing_tolerance=float(np.mean([pointing_game(ms[i], per[i].boxes, image_size, tolerance, per[i].px)
                                              for i in keep])),
            energy=float(np.mean([energy_in_box(ms[i], per[i].boxes, image_size) for i in keep])),
            iou=float(np.mean([mask_iou(ms[i], per[i].boxes, image_size, iou_threshold) for i in keep])),
            max_box_acc=acc, max_box_acc_threshold=float(THRESHOLDS[best]),
            flat=float(np.mean([_flat(ms[i]) for i in keep])), images=len(keep),
        )
    return out


FLAT_BELOW = 1e-12  # a map whose every value is smaller holds rounding noise, not a place


def _flat(m: torch.Tensor | np.ndarray) -> bool:
    """A map that points nowhere: constant, or numerically zero everywhere (a CAM at a layer whose features reach
    the logits only through rounding, say), whose peak would be picked by noise."""
    a = _as_map(m)
    return float(np.ptp(a)) == 0 or float(np.abs(a).max()) < FLAT_BELOW


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.nonzero(starts)[0], len(v)]
    mean_rank = (bounds[:-1] + bounds[1:] - 1) / 2 + 1
    out = np.empty(len(v))
    out[order] = mean_rank[group]
    return out


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape; NaN when one is constant."""
    ra, rb = _ranks(_as_map(a).ravel()), _ranks(_as_map(b).ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def rank_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean Spearman correlation of aligned maps ``[N, h, w]`` (images where one map is constant skipped)."""
    values = [spearman(x, y) for x, y in zip(a, b)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def flags(score: Mapping[str, float], chance_pointing: float, insensitive_at: float = 0.5,
          inverted_below: float = 0.5) -> list[str]:
    """What is wrong with a map, from its scores: ``"flat"`` when at least half of its maps are constant
    (``score["flat"]``: they point nowhere); else ``"inverted"`` when its pointing game is below
    ``inverted_below`` times chance (it points away from the object); ``"insensitive"`` when its rank
    correlation with the randomised model's map (``score["sanity"]``) is at least ``insensitive_at``."""
    out = []
    pointing = score.get("pointing", math.nan)
    if score.get("flat", 0.0) >= 0.5:
        out.append("flat")
    elif not math.isnan(pointing) and not math.isnan(chance_pointing) and pointing < inverted_below * chance_pointing:
        out.append("inverted")
    sanity = score.get("sanity", math.nan)
    if not math.isnan(sanity) and sanity >= insensitive_at:
        out.append("insensitive")
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
