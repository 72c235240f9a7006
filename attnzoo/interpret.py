"""Plots and scores of a trained run: learning curves, confusion matrix, top losses, attention grids with
Grad-CAM side by side, how well attention finds the object (``attnzoo.localize``), how faithful it is
(deletion curves), and one self-contained HTML report.

``fit`` writes the basic plots into every run folder from a fastai ``Learner``; everything else works from a
``Run`` (``load_run``) or a bare model (``learn.model`` of a Learner), so a notebook can call it::

    run = load_run("runs/r")
    x = load_batch(run, paths)                       # normalised [B, 3, S, S]
    cam = gradcam(run, x)                            # [B, h, w] at the deepest site
    probs, maps = run.predict(x)
    curves = deletion_curves(run, x, labels, {**maps, "Grad-CAM": cam})
    result = interpret_run(run, out="report/")       # what `attnzoo interpret` does
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from . import localize, viz
from .errors import AttnzooError
from .model import AttentionModel, layers, to_map
from .run import CONFIG, WEIGHTS, Run, RunFolder, _atomic_write

Progress = Callable[[str, int, int], None]  # (task, done, total)
BOX_COLOR = (255, 255, 255)


def display_image(run: Run, path: str | Path, box: localize.Box | None = None) -> np.ndarray:
    """The image as the model sees it (squashed to the training size), for plotting; ``box`` outlined."""
    im = run.load_image(path).resize((run.img_size, run.img_size), Image.Resampling.BILINEAR)
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(im).rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), outline=BOX_COLOR)
    return np.asarray(im)


def load_batch(run: Run, paths: Sequence[str | Path]) -> torch.Tensor:
    """Images as the model's normalised input ``[B, 3, S, S]``."""
    return torch.stack([run.preprocess(run.load_image(p)) for p in paths])


def show_attention(run: Run, images: Sequence[str | Path], out: str | Path | None = None,
                   top: int = 3) -> list[tuple[Path, list[tuple[str, float]], Path]]:
    """What ``attnzoo show-attention`` does: one PNG per image (the image, top predictions, every site's map).

    ``out``: a ``.png`` file (one image) or a folder (default ``RUN/attention``). No file is written over:
    see ``outputs.per_image_outputs``. Returns ``(image, top predictions, file written)`` per image."""
    from .outputs import existing_files, per_image_outputs

    if top < 1:
        raise AttnzooError(f"--top must be at least 1, got {top}")
    images = existing_files(images)
    targets, fresh = per_image_outputs(images, out, Path(run.path or ".") / "attention")
    probs, maps = run.predict(images)
    tops = run.top(probs, top)
    written = []
    for i, (p, target) in enumerate(zip(images, targets)):
        fig = viz.attention_figure(display_image(run, p), {k: v[i].numpy() for k, v in maps.items()}, tops[i],
                                   title=f"{p.name}: {run.config.get('backbone')} + {run.config.get('attn')}")
        try:
            written.append((p, tops[i], viz.save_new_figure(fig, target, fresh=fresh)))
        except OSError as e:  # a read-only run folder, a full disk: somewhere else may do
            raise AttnzooError(f"cannot write {target}: {e.strerror or e}; choose another place with --out") from None
    return written


def history_figure(rows: Sequence[dict[str, float]]) -> Any:
    """Train and valid loss per epoch, and the metrics on a second axis."""
    from matplotlib.ticker import MaxNLocator

    fig = viz._new_figure(6.4, 3.6)
    ax = fig.add_axes((0.1, 0.15, 0.78, 0.72))
    epochs = [r["epoch"] for r in rows]
    for key, style in (("train_loss", "-o"), ("valid_loss", "-s")):
        if any(key in r for r in rows):
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], style, label=key.replace("_", " "), ms=4)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    metrics = [k for k in rows[0] if k not in ("epoch", "time", "train_loss", "valid_loss")] if rows else []
    lines, labels = ax.get_legend_handles_labels()
    if metrics:
        ax2 = ax.twinx()
        for key in metrics:
            ax2.plot(epochs, [r.get(key, np.nan) for r in rows], "-^", color="tab:green", label=key, ms=4)
        ax2.set_ylabel(", ".join(metrics))
        ax2.set_ylim(0, 1.02)
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="center right", fontsize=8)
    ax.set_title("learning curves", fontsize=11, fontweight="bold")
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str]) -> Any:
    """A confusion matrix with counts in the cells (rows: actual, columns: predicted)."""
    n = len(classes)
    side = max(3.6, 0.55 * n + 1.8)
    fig = viz._new_figure(side + 0.8, side)
    ax = fig.add_axes((0.22, 0.2, 0.62, 0.7))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > top / 2 else "black")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"confusion matrix (accuracy {acc:.1%})", fontsize=11, fontweight="bold")
    return fig


def attention_rows(run: Run, paths: Sequence[str | Path], labels: Sequence[str], title: str,
                   with_gradcam: bool = False, boxes: Sequence[localize.Box | None] | None = None) -> Any:
    """Paper-Figure-3 grid for ``paths``: image, then every site's map (and Grad-CAM); right/wrong marked.

    ``boxes`` (in model-input pixels) are outlined on the image and under every overlay.
    """
    probs, maps = run.predict(list(paths))
    if with_gradcam:
        maps[gradcam_label(run.model)] = gradcam(run, load_batch(run, paths))
    top = run.top(probs, 1)
    boxes = boxes if boxes is not None else [None] * len(paths)
    images = [display_image(run, p, b) for p, b in zip(paths, boxes)]
    preds = [t[0][0] for t in top]
    conf = [t[0][1] for t in top]
    return viz.attention_grid(images, {k: v.numpy() for k, v in maps.items()}, list(labels), preds, conf,
                              title=title, max_rows=len(paths))


def sample_valid(items: Sequence[Path], n: int, seed: int = 0) -> list[Path]:
    """Up to ``n`` validation items, spread over the classes."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Path]] = {}
    for p in items:
        by_class.setdefault(Path(p).parent.name, []).append(Path(p))
    for v in by_class.values():
        rng.shuffle(v)
    out: list[Path] = []
    while len(out) < n and any(by_class.values()):
        for k in sorted(by_class):
            if by_class[k] and len(out) < n:
                out.append(by_class[k].pop())
    return out


def fit_plots(learn: Any, run: Run, out: str | Path, rows: Sequence[dict[str, float]], n: int = 6) -> list[Path]:
    """history.png, confusion_matrix.png, top_losses.png and attention.png into ``out``."""
    from fastai.interpret import ClassificationInterpretation

    out = Path(out)
    written = []
    if rows:
        written.append(viz.save_figure(history_figure(rows), out / "history.png"))
    interp = ClassificationInterpretation.from_learner(learn)
    written.append(viz.save_figure(confusion_figure(interp.confusion_matrix(), run.classes),
                                   out / "confusion_matrix.png"))
    items = [Path(p) for p in learn.dls.valid.items]
    losses, idx = interp.top_losses(min(n, len(items)))
    top_paths = [items[i] for i in idx.tolist()]
    labels = [p.parent.name for p in top_paths]
    title = "top losses: " + ", ".join(f"{v:.2f}" for v in losses.tolist())
    written.append(viz.save_figure(attention_rows(run, top_paths, labels, title), out / "top_losses.png"))
    sample = sample_valid(items, n)
    written.append(viz.save_figure(
        attention_rows(run, sample, [p.parent.name for p in sample],
                       f"{run.config.get('backbone')} + {run.config.get('attn')}: validation images"),
        out / "attention.png"))
    return written


# --------------------------------------------------------------------------- Grad-CAM


def _model(run_or_model: Run | nn.Module) -> nn.Module:
    return run_or_model.model if isinstance(run_or_model, Run) else run_or_model


def gradcam_site(model: nn.Module, img_size: int | None = None) -> str:
    """Where Grad-CAM looks: the deepest site of the model (the last of ``model.sites``); for a baseline
    without sites, the feature level before the final one (the default site of a gate, see ``layers``).
    """
    if not isinstance(model, AttentionModel):
        raise TypeError("gradcam_site needs an attnzoo model; for another module pass gradcam(..., site=NAME)")
    if model.sites:
        return model.sites[-1]
    return next(s.name for s in layers(model.backbone_name, img_size) if s.default_gate)


def gradcam_label(model: nn.Module, img_size: int | None = None) -> str:
    return f"Grad-CAM at {gradcam_site(model, img_size)}"


def _site_to_map(model: nn.Module, site: str, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The site's output as ``[B, C, h, w]``, reshaping ViT tokens to their grid as the model's hooks do."""
    if not isinstance(model, AttentionModel):
        return lambda t: t
    info = model.site_info.get(site) or next(s for s in layers(model.backbone_name, img_size) if s.name == site)
    return functools.partial(to_map, info)


def gradcam(run_or_model: Run | nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
            site: str | None = None, bs: int = 32) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) at ``site``: ``[B, h, w]``, float32.

    ``ReLU(sum_c w_c A_c)`` with ``A`` the site's output and ``w_c`` the spatial mean of the gradient of the
    ``target`` class logit (default: the predicted class) with respect to ``A_c``. ``site`` defaults to
    ``gradcam_site(model)``; for a module that is not an attnzoo model, name it (a ``named_modules`` name).
    Parameters' ``.grad`` are left untouched; the model is put back in its training mode.
    """
    model = _model(run_or_model)
    img_size = int(x.shape[-1])
    site = site or gradcam_site(model, img_size)
    body = model.backbone if isinstance(model, AttentionModel) else model
    module = body.get_submodule(site)
    to_map = _site_to_map(model, site, img_size)
    device = next(model.parameters()).device
    targets = None if target is None else torch.as_tensor(target).long().reshape(-1).expand(len(x))
    kept: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        kept["act"] = out
        out.register_hook(lambda g: kept.__setitem__("grad", g))

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(keep)
    cams = []
    try:
        for start in range(0, len(x), bs):
            chunk = x[start : start + bs].detach().to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(chunk)
                t = logits.argmax(-1) if targets is None else targets[start : start + bs].to(device)
                logits.gather(1, t[:, None]).sum().backward(inputs=[kept["act"]])
            act, grad = to_map(kept["act"].detach()).float(), to_map(kept["grad"]).float()
            weights = grad.mean((2, 3), keepdim=True)
            cams.append(torch.relu((weights * act).sum(1)).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(cams)


# --------------------------------------------------------------------------- faithfulness


def deletion_curves(run_or_model: Run | nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor,
                    maps: Mapping[str, torch.Tensor | np.ndarray], steps: int = 10, fill: float = 0.0,
                    seed: int = 0, bs: int = 64, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Deletion curves (Petsiuk et al., 2018, RISE, https://arxiv.org/abs/1806.07421): the mean probability
    of the ``target`` class as the pixels a map ranks highest are deleted first, ``1/steps`` of them at a time.

    ``maps[name]`` is ``[N, h, w]`` aligned with ``x``; each is upsampled bilinearly to the image. Deleted
    pixels become ``fill`` in normalised space (0: the normalisation mean colour). Ties are broken by the
    same seeded noise for every map. Returns ``{name: [steps + 1]}`` from 0% to 100% deleted; the area under
    a curve (``deletion_auc``) is lower when the map finds what the prediction rests on.
    """
    model = _model(run_or_model)
    device = next(model.parameters()).device
    n, _, h, w = x.shape
    target = torch.as_tensor(target).long().reshape(-1)
    inner = torch.tensor([round(k / steps * h * w) for k in range(1, steps)])  # 0% and 100% are the same for all
    jitter = torch.rand(n, h * w, generator=torch.Generator().manual_seed(seed)) * 1e-6
    ranks = torch.stack([
        (torch.stack([torch.from_numpy(viz.upsample_map(m, (h, w))) for m in ms]).flatten(1) + jitter)
        .argsort(1, descending=True).argsort(1).view(n, 1, h, w).int() for ms in maps.values()])
    fill_t = torch.tensor(fill, dtype=x.dtype)

    def p_target(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return model(images.to(device)).float().softmax(-1).cpu().gather(1, which[:, None])[:, 0]

    was_training = model.training
    model.eval()
    probs = torch.zeros(len(maps), n, steps + 1)
    total = len(maps) * n * len(inner)  # one job per (map, image, inner step), run in batches of bs
    try:
        with torch.no_grad():
            probs[:, :, 0] = torch.cat([p_target(x[i : i + bs], target[i : i + bs]) for i in range(0, n, bs)])
            blank = model(torch.full_like(x[:1], fill).to(device)).float().softmax(-1).cpu()[0]
            probs[:, :, -1] = blank[target]
            for start in range(0, total, bs):
                if progress is not None:
                    progress("deletion curves", start, total)
                job = torch.arange(start, min(start + bs, total))
                m, i, k = job // (n * len(inner)), job // len(inner) % n, job % len(inner)
                xm = torch.where(ranks[m, i] < inner[k].view(-1, 1, 1, 1), fill_t, x[i])
                probs[m, i, k + 1] = p_target(xm, target[i])
    finally:
        model.train(was_training)
    if progress is not None:
        progress("deletion curves", total, total)
    return {name: probs[j].mean(0).numpy() for j, name in enumerate(maps)}


def deletion_auc(curve: Sequence[float]) -> float:
    """Area under a deletion curve over the deleted fraction 0..1 (trapezoids); lower is more faithful."""
    c = np.asarray(curve, dtype=np.float64)
    return float(((c[1:] + c[:-1]) / 2).sum() / (len(c) - 1))


def _style(name: str) -> dict[str, Any]:
    if name.startswith("Grad-CAM"):
        return dict(ls="--", marker="s", color="black")
    if name == "random":
        return dict(ls=":", marker="", color="grey")
    return dict(ls="-", marker="o")


def deletion_figure(curves: Mapping[str, Sequence[float]], title: str = "deletion curves") -> Any:
    """Probability of the true class against the share of pixels deleted, most attended first, per map."""
    fig = viz._new_figure(6.4, 3.8)
    ax = fig.add_axes((0.1, 0.14, 0.6, 0.74))
    for name, curve in curves.items():
        xs = np.linspace(0, 100, len(curve))
        ax.plot(xs, curve, ms=3.5, label=f"{name}  AUC {deletion_auc(curve):.3f}", **_style(name))
    ax.set_xlabel("pixels deleted, most attended first (%)")
    ax.set_ylabel("probability of the true class")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="map (lower AUC = more faithful)",
              title_fontsize=8, frameon=False)
    ax.set_title(title, fontsize=11, fontweight="bold")
    return fig


# --------------------------------------------------------------------------- bars (localisation, compare)


def bar_figure(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str,
               hlines: Mapping[str, float] | None = None) -> Any:
    """Grouped bars in [0, 1], values written on top; NaN values get no bar; ``hlines`` are dashed references."""
    n, k = len(groups), max(1, len(series))
    plot_w = max(3.0, n * (0.35 * k + 0.5))
    fig_w = 0.8 + plot_w + 2.0  # room for the legend on the right
    fig = viz._new_figure(fig_w, 3.8)
    ax = fig.add_axes((0.8 / fig_w, 0.24, plot_w / fig_w, 0.64))
    width = 0.8 / k
    for j, (name, values) in enumerate(series.items()):
        xs = np.arange(n) + (j - (k - 1) / 2) * width
        vals = np.asarray(values, dtype=float)
        ok = ~np.isnan(vals)
        bars = ax.bar(xs[ok], vals[ok], width * 0.92, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="grey", label=name)
    ax.set_xticks(range(n), groups, rotation=20 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(title, fontsize=11, fontweight="bold")
    return fig


# --------------------------------------------------------------------------- errors


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts, rows: actual, columns: predicted."""
    idx = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def most_confused(cm: np.ndarray, classes: Sequence[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells: (actual, predicted, count)."""
    off = [(int(cm[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and cm[i, j]]
    return [(classes[i], classes[j], c) for c, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:k]]


# --------------------------------------------------------------------------- a whole run


def validation_set(run: Run, data: str | Path | None = None) -> Any:
    """The run's validation split (``DatasetInfo``): from ``data`` or the data root recorded in the run, split
    with the run's seed and validation share, as in training."""
    from .data import find_dataset, resolve_data

    recorded = run.config.get("data") or {}
    root = data if data is not None else recorded.get("root")
    if root is None:
        raise AttnzooError("the run records no data folder; pass --data DIR")
    seed = int(run.config.get("seed", 0))
    counts = recorded.get("counts") or {}
    n_valid, n_train = (sum((counts.get(s) or {}).values()) for s in ("valid", "train"))
    valid_pct = n_valid / (n_valid + n_train) if n_valid and n_train else 0.2
    try:
        info = find_dataset(resolve_data(str(root), seed), valid_pct=valid_pct, seed=seed)
    except AttnzooError as e:
        if data is None:
            raise AttnzooError(f"{e} (the data folder recorded in the run; pass --data DIR)") from None
        raise
    unknown = sorted(set(info.classes) - set(run.classes))
    if unknown:
        raise AttnzooError(f"{info.root} has classes the run does not know: {', '.join(unknown)} "
                           f"(the run's: {', '.join(run.classes)})")
    if not info.valid:
        raise AttnzooError(f"no validation images in {info.root}")
    return info


def update_config(run_dir: str | Path, **entries: Any) -> dict[str, Any]:
    """Set top-level entries of the run's attnzoo.json, keeping everything else (read, modify, atomic write)."""
    return RunFolder(run_dir).update_config(**entries)


@dataclass
class Interpretation:
    """What ``interpret_run`` measured and wrote."""

    out: Path
    n_images: int
    accuracy: float
    confused: list[tuple[str, str, int]]
    localization: dict[str, Any] | None
    faithfulness: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _noop(_task: str, _done: int, _total: int) -> None:
    return None


def _predict_all(run: Run, paths: Sequence[Path], bs: int, progress: Progress) -> tuple[torch.Tensor, dict]:
    probs, maps = [], {}
    for start in range(0, len(paths), bs):
        progress("predict", start, len(paths))
        p, m = run.predict(paths[start : start + bs], bs=bs)
        probs.append(p)
        for k, v in m.items():
            maps.setdefault(k, []).append(v)
    progress("predict", len(paths), len(paths))
    return torch.cat(probs), {k: torch.cat(v) for k, v in maps.items()}


def _gradcam_paths(run: Run, paths: Sequence[Path], target: torch.Tensor, bs: int,
                   progress: Progress) -> torch.Tensor:
    cams = []
    for start in range(0, len(paths), bs):
        progress("Grad-CAM", start, len(paths))
        cams.append(gradcam(run, load_batch(run, paths[start : start + bs]), target[start : start + bs]))
    progress("Grad-CAM", len(paths), len(paths))
    return torch.cat(cams)


def _finest(maps: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The largest map size, for the random baseline's maps."""
    return max((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])


def interpret_run(run: Run, data: str | Path | None = None, out: str | Path | None = None, n: int = 6,
                  deletion_images: int = 100, steps: int = 10, seed: int = 0, bs: int = 32,
                  progress: Progress | None = None) -> Interpretation:
    """What ``attnzoo interpret`` does: on the run's validation images, write into ``out`` (default: the run
    folder) the attention grid with Grad-CAM, top losses, confusion matrix, deletion curves, localisation scores
    (when ``boxes.csv`` is at the data root; also saved into the run's attnzoo.json under ``localization``) and
    ``report.html``. Deletion curves use ``deletion_images`` validation images spread over the classes.
    """
    progress = progress or _noop
    if run.path is None and out is None:
        raise AttnzooError("the run has no folder; pass out=DIR")
    if out is not None and (run.path is None or Path(out).resolve() != Path(run.path).resolve()):
        from .outputs import check_new_folder

        check_new_folder(out)  # the run folder is attnzoo's own; any other holds nothing of the user's
    out = Path(out) if out is not None else Path(run.path)
    info = validation_set(run, data)
    paths = list(info.valid)
    index = {p: i for i, p in enumerate(paths)}
    labels = torch.tensor([run.classes.index(p.parent.name) for p in paths])
    probs, maps = _predict_all(run, paths, bs, progress)
    preds = probs.argmax(-1)
    files: dict[str, Path] = {}

    rows = (run.config.get("metrics") or {}).get("per_epoch") or []
    if rows:
        files["history"] = viz.save_figure(history_figure(rows), out / "history.png")
    cm = confusion_matrix(labels.tolist(), preds.tolist(), len(run.classes))
    files["confusion"] = viz.save_figure(confusion_figure(cm, run.classes), out / "confusion_matrix.png")

    boxes: list[localize.Box | None] = [None] * len(paths)
    if localize.has_boxes(info.root):
        progress("boxes", 0, 1)
        boxes = localize.load_boxes(info.root, paths, run.img_size)
    keep = [i for i, b in enumerate(boxes) if b is not None]  # scored for localisation
    chosen = [index[p] for p in sample_valid(paths, deletion_images, seed)]  # for the deletion curves
    need = sorted(set(keep) | set(chosen))
    cam = _gradcam_paths(run, [paths[i] for i in need], labels[need], bs, progress)  # the true class, as scored
    cam_label = gradcam_label(run.model, run.img_size)
    maps[cam_label] = torch.zeros(len(paths), *cam.shape[1:])  # only the rows in `need` are used
    maps[cam_label][need] = cam

    localization = None
    if keep:
        kept = [boxes[i] for i in keep]
        scored = {name: m[keep] for name, m in maps.items()}
        scored["random"] = localize.random_maps(len(keep), _finest(scored), seed)
        progress("localisation", 0, 1)
        scores = localize.score_maps(scored, kept, run.img_size)
        scores["chance"] = {**localize.random_baseline(kept, run.img_size), "images": len(keep)}
        kinds = {cam_label: "grad-cam", "random": "random", "chance": "chance"}
        localization = dict(
            images=len(keep), split="valid", boxes=str(Path(info.root) / localize.BOXES_FILE),
            scores={k: {"kind": kinds.get(k, "attention"), **v} for k, v in scores.items()},
        )
        files["localization"] = viz.save_figure(localization_figure(localization), out / "localization.png")

    progress("figures", 0, 2)
    sample = sample_valid(paths, n, seed)
    title = f"{run.config.get('backbone')} + {run.config.get('attn')}: where it looks"
    files["attention"] = viz.save_figure(
        attention_rows(run, sample, [p.parent.name for p in sample], title, with_gradcam=True,
                       boxes=[boxes[index[p]] for p in sample]), out / "attention_gradcam.png")
    progress("figures", 1, 2)
    losses = -probs[torch.arange(len(paths)), labels].clamp_min(1e-12).log()
    top = losses.topk(min(n, len(paths))).indices.tolist()
    files["top_losses"] = viz.save_figure(
        attention_rows(run, [paths[i] for i in top], [paths[i].parent.name for i in top],
                       "top losses: " + ", ".join(f"{losses[i]:.2f}" for i in top), with_gradcam=True,
                       boxes=[boxes[i] for i in top]), out / "top_losses.png")

    del_maps = {name: m[chosen] for name, m in maps.items()}
    del_maps["random"] = localize.random_maps(len(chosen), _finest(del_maps), seed)
    curves = deletion_curves(run, load_batch(run, [paths[i] for i in chosen]), labels[chosen], del_maps,
                             steps=steps, seed=seed, progress=progress)
    faithfulness = dict(
        images=len(chosen), steps=steps, fill="0 in normalised space (the normalisation mean colour)",
        auc={k: deletion_auc(c) for k, c in curves.items()}, curves={k: c.round(5).tolist() for k, c in curves.items()},
    )
    files["deletion"] = viz.save_figure(
        deletion_figure(curves, f"deletion curves ({len(chosen)} validation images)"), out / "deletion.png")

    result = Interpretation(out, len(paths), float((preds == labels).float().mean()),
                            most_confused(cm, run.classes), localization, faithfulness, files)
    if run.path is not None and (Path(run.path) / CONFIG).is_file():
        entries: dict[str, Any] = {"faithfulness": faithfulness}
        if localization is not None:
            entries["localization"] = localization
        run.config = update_config(run.path, **entries)
    files["report"] = write_report(run, result, out / "report.html")
    return result


def localization_figure(localization: Mapping[str, Any]) -> Any:
    """Pointing game and energy in box per map, with chance as a dashed line."""
    scores = {k: v for k, v in localization["scores"].items() if v["kind"] != "chance"}
    chance = localization["scores"].get("chance", {}).get("energy")
    return bar_figure(list(scores), {m: [v[m] for v in scores.values()] for m in ("pointing", "energy")},
                      f"does attention find the object? ({localization['images']} images)", "score",
                      {"chance": chance} if chance is not None else None)


# --------------------------------------------------------------------------- report.html


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts_table(rows: Sequence[Sequence[Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _figure(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="{_data_uri(path)}"></figure>'


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def time_per_epoch(config: Mapping[str, Any]) -> float:
    """Mean seconds per epoch recorded in a run's config (NaN when none)."""
    times = [r["time"] for r in (config.get("metrics") or {}).get("per_epoch") or [] if "time" in r]
    return float(np.mean(times)) if times else float("nan")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.lead{font-size:1.08em;color:#444} .note{background:#f6f8fa;border-left:4px solid #4a7bd0;padding:.6em 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .7em;text-align:left} th{background:#f3f3f3}
td:not(:first-child){font-variant-numeric:tabular-nums}
figure{margin:.8em 0} img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.85em} .muted{color:#777;font-size:.9em}
"""


def findings(run: Run, result: Interpretation) -> list[str]:
    """The report's conclusions in a few sentences (HTML)."""
    chance = 1 / len(run.classes)
    out = [f"The model is right on <b>{result.accuracy:.1%}</b> of {result.n_images} validation images "
           f"(guessing: {chance:.1%})."]
    loc = result.localization
    if loc is not None:
        scores = loc["scores"]
        best = _best(scores, "attention") or _best(scores, "grad-cam")
        base = scores["chance"]["energy"]
        if best is not None:
            name, v = best
            out.append(f"The map that finds the object best is <b>{html.escape(name)}</b>: its peak is on the "
                       f"object in {v['pointing']:.0%} of the images and {v['energy']:.0%} of its mass lies on "
                       f"the object, where a map that knows nothing about the object gets {base:.0%} on both.")
    auc = result.faithfulness["auc"]
    ranked = sorted(auc, key=auc.get)
    if ranked and ranked[0] != "random":
        site = next((k for k in ranked if k in run.model.sites), None)
        also = (f"; the most faithful attention map is {html.escape(site)} ({auc[site]:.3f})"
                if site is not None and site != ranked[0] else "")
        out.append(f"Deleting the pixels <b>{html.escape(ranked[0])}</b> ranks highest lowers the true class's "
                   f"probability fastest: deletion AUC {auc[ranked[0]]:.3f}, against "
                   f"{auc.get('random', float('nan')):.3f} for a random map (lower is more faithful){also}.")
    elif ranked:
        out.append("No map beats the random map in the deletion test: the prediction does not rest on the "
                   "attended pixels more than on any others.")
    return out


def write_report(run: Run, result: Interpretation, path: str | Path) -> Path:
    """One self-contained HTML page (plots embedded as data URIs) explaining the run to someone who did not
    train it: configuration, learning curves, where the model looks, localisation, faithfulness, errors."""
    cfg = run.config
    path = Path(path)
    files = result.files
    metrics = cfg.get("metrics") or {}
    rows = metrics.get("per_epoch") or []
    train = cfg.get("train") or {}
    data = cfg.get("data") or {}
    counts = data.get("counts") or {}
    sites = ", ".join(cfg.get("sites") or []) or "none (baseline)"
    kind = run.model.kind or "no attention"
    cam_site = gradcam_site(run.model, run.img_size)
    name = run.path.name if run.path is not None else path.parent.name
    n_train = sum((counts.get("train") or {}).values())
    lead = (f"<b>{html.escape(str(cfg.get('backbone')))}</b> with <b>{html.escape(str(cfg.get('attn')))}</b> "
            f"attention ({html.escape(kind)}) at <b>{html.escape(sites)}</b>, trained for "
            f"{len(rows) or '?'} epochs on {n_train or '?'} images of {len(run.classes)} classes.")
    facts = [
        ["backbone", cfg.get("backbone")], ["attention module", f"{cfg.get('attn')} ({kind})"],
        ["sites", sites], ["attention options", json.dumps(cfg.get("attn_options") or {})],
        ["classes", ", ".join(run.classes)], ["input size", f"{run.img_size} x {run.img_size} (squashed)"],
        ["pretrained", cfg.get("pretrained")], ["data", f"{data.get('root', '?')} ({data.get('layout', '?')})"],
        ["epochs / lr / batch size / seed",
         f"{train.get('epochs', '?')} / {train.get('lr', '?')} / {train.get('bs', '?')} / {cfg.get('seed', '?')}"],
        ["parameters", f"{sum(p.numel() for p in run.model.parameters()):,}"],
        ["time per epoch", f"{time_per_epoch(cfg):.1f} s"],
        ["final metrics", ", ".join(f"{k} {_fmt(v)}" for k, v in (metrics.get("final") or {}).items())],
        ["versions", ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items())],
    ]
    epoch_keys = list(dict.fromkeys(k for r in rows for k in r))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>attnzoo run report: {html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {html.escape(name)}</h1>", f'<p class="lead">{lead}</p>',
        '<div class="note"><b>How to read this page.</b> An <i>attention map</i> is where the model weighs the '
        "image most when it decides; attnzoo reads it straight from the attention module at each <i>site</i> "
        f"(a layer of the backbone). <i>Grad-CAM</i> is a different, gradient-based explanation at {cam_site}, "
        "shown for comparison. The sections below show how training went, where the model looks, whether "
        "that is where the object is (when object boxes are known), whether the prediction really rests on "
        "the attended pixels, and which classes get mixed up.</div>",
        "<h2>In short</h2><ul>" + "".join(f"<li>{f}</li>" for f in findings(run, result)) + "</ul>",
        "<h2>The run</h2>", _facts_table(facts),
        "<h2>Training</h2>", _figure(files.get("history"), "learning curves"),
    ]
    if rows:
        parts.append(_html_table([k.replace("_", " ") + (" (s)" if k == "time" else "") for k in epoch_keys],
                                 [[_fmt(r.get(k, float("nan")), 1 if k == "time" else 4) for k in epoch_keys]
                                  for r in rows]))
    parts += [
        "<h2>Where the model looks</h2>",
        "<p>One row per validation image: the image as the model sees it, then each site's attention map "
        f"blended over it (red = high, blue = low), then Grad-CAM at {html.escape(cam_site)} for the predicted "
        "class. A green "
        "&#10003; title means the prediction is right, a red &#10007; wrong, with the probability the model "
        "gives its prediction. The white rectangle, when shown, is the object's box. Each map is scaled to its "
        "own range, so compare where maps are high, not their colours.</p>",
        _figure(files.get("attention"), "attention maps and Grad-CAM on validation images"),
    ]
    loc = result.localization
    parts.append("<h2>Does attention find the object?</h2>")
    if loc is None:
        parts.append("<p>No <code>boxes.csv</code> at the data root, so there is nothing to score the maps "
                     "against. Add one (<code>image,x_min,y_min,x_max,y_max</code>) to measure this.</p>")
    else:
        parts += [
            f"<p>Scored on the {loc['images']} validation images that have a box. <b>Pointing game</b>: the share "
            "of images where the map's strongest cell lies inside the object's box. <b>Energy in box</b>: the share of "
            "the map's mass inside the box (after shifting the map's minimum to 0). Both are higher when the "
            "map finds the object. Grad-CAM is computed for the true class here. <i>Random</i> is a seeded "
            "noise map scored the same way; <i>chance</i> is what a map that knows nothing scores on average "
            "(the box's share of the image).</p>",
            _html_table(["map", "kind", "pointing game", "energy in box"],
                        [[k, v["kind"], _fmt(v["pointing"], 3), _fmt(v["energy"], 3)]
                         for k, v in loc["scores"].items()]),
            _figure(files.get("localization"), "localisation scores"),
        ]
    faith = result.faithfulness
    parts += [
        "<h2>Does the prediction rest on the attended pixels?</h2>",
        f"<p>Deletion test on {faith['images']} validation images: the pixels a map ranks highest are "
        f"replaced by the mean colour, {100 // faith['steps']}% of the image at a time, and the probability of "
        "the true class is measured. A map that points at what the prediction depends on makes the probability "
        "fall fast: a <b>lower area under the curve (AUC) is more faithful</b>. Grad-CAM is for the true "
        "class; the random map is the reference.</p>",
        _figure(files.get("deletion"), "deletion curves"),
        _html_table(["map", "deletion AUC (lower = more faithful)"],
                    [[k, _fmt(v, 3)] for k, v in sorted(faith["auc"].items(), key=lambda kv: kv[1])]),
        "<h2>Mistakes</h2>",
        _figure(files.get("confusion"), "confusion matrix"),
    ]
    if result.confused:
        parts += ["<p>Most confused pairs:</p>",
                  _html_table(["actual", "predicted", "images"], [list(c) for c in result.confused])]
    parts += [
        "<p>The validation images the model got most wrong (highest loss), with their maps:</p>",
        _figure(files.get("top_losses"), "top losses with attention maps"),
        "<h2>Configuration</h2>",
        f"<details><summary>attnzoo.json</summary><pre>{html.escape(json.dumps(cfg, indent=2, default=str))}"
        "</pre></details>",
        '<p class="muted">Written by <code>attnzoo interpret</code>.</p></body></html>',
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: tmp.write_text("\n".join(p for p in parts if p), encoding="utf-8"))
    return path


# --------------------------------------------------------------------------- compare runs


def param_count(weights: str | Path) -> int:
    """Parameters in a safetensors file, from its header alone (normalisation running statistics excluded)."""
    with open(weights, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__" and not k.endswith(skip))


def _best(scores: Mapping[str, Any], kind: str) -> tuple[str, dict[str, float]] | None:
    """The map of ``kind`` with the highest energy in box."""
    found = [(k, v) for k, v in scores.items() if v.get("kind") == kind]
    return max(found, key=lambda kv: kv[1]["energy"]) if found else None


def compare_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run folder (read from attnzoo.json and the safetensors header, no model is built)."""
    out = []
    for p in paths:
        p = Path(p)
        cfg = RunFolder(p).read_config()
        final = (cfg.get("metrics") or {}).get("final") or {}
        scores = (cfg.get("localization") or {}).get("scores") or {}
        best, cam = _best(scores, "attention"), _best(scores, "grad-cam")
        nan = float("nan")
        out.append(dict(
            run=p.name, path=str(p), backbone=cfg.get("backbone"), attn=cfg.get("attn"), sites=cfg.get("sites") or [],
            accuracy=final.get("accuracy", nan), valid_loss=final.get("valid_loss", nan),
            params=param_count(p / WEIGHTS) if (p / WEIGHTS).is_file() else None,
            time_per_epoch=time_per_epoch(cfg), epochs=len((cfg.get("metrics") or {}).get("per_epoch") or []),
            best_site=best[0] if best else None,
            pointing=best[1]["pointing"] if best else nan, energy=best[1]["energy"] if best else nan,
            gradcam_pointing=cam[1]["pointing"] if cam else nan, gradcam_energy=cam[1]["energy"] if cam else nan,
            deletion_auc=(cfg.get("faithfulness") or {}).get("auc") or {},
        ))
    return out


def compare_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Accuracy and the localisation scores of several runs as grouped bars."""
    names = [f"{r['run']}\n{r['backbone']} + {r['attn']}" for r in rows]
    series = {"accuracy": [r["accuracy"] for r in rows]}
    for key, label in (("pointing", "pointing (best site)"), ("energy", "energy (best site)"),
                       ("gradcam_pointing", "pointing (Grad-CAM)"), ("gradcam_energy", "energy (Grad-CAM)")):
        values = [r[key] for r in rows]
        if not all(math.isnan(v) for v in values):
            series[label] = values
    return bar_figure(names, series, "runs compared", "validation score")
