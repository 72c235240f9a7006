"""Plots of a trained run: learning curves, confusion matrix, top losses and attention grids.

``fit`` writes them into every run folder; they work from a fastai ``Learner`` (validation predictions
through ``ClassificationInterpretation``) and a ``Run`` (images, maps, classes), so a notebook can call
them on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import viz
from .run import Run


def display_image(run: Run, path: str | Path) -> np.ndarray:
    """The image as the model sees it (squashed to the training size), for plotting."""
    im = run.load_image(path).resize((run.img_size, run.img_size), Image.Resampling.BILINEAR)
    return np.asarray(im)


def history_figure(rows: Sequence[dict[str, float]]) -> Any:
    """Train and valid loss per epoch, and the metrics on a second axis."""
    fig = viz._new_figure(6.4, 3.6)
    ax = fig.add_axes((0.1, 0.15, 0.78, 0.72))
    epochs = [r["epoch"] for r in rows]
    for key, style in (("train_loss", "-o"), ("valid_loss", "-s")):
        if any(key in r for r in rows):
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], style, label=key.replace("_", " "), ms=4)
    ax.set_xlabel("epoch")
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


def attention_rows(run: Run, paths: Sequence[str | Path], labels: Sequence[str], title: str) -> Any:
    """Paper-Figure-3 grid for ``paths``: image, then every site's map; right/wrong marked."""
    probs, maps = run.predict(list(paths))
    top = run.top(probs, 1)
    images = [display_image(run, p) for p in paths]
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
