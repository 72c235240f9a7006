"""Matplotlib figures of a run: learning curves, confusion matrix, perturbation curves and grouped bars.

Each function returns a figure; ``figures.save_figure`` writes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import figures
from .metrics import curve_auc


def history_figure(rows: Sequence[dict[str, float]]) -> Any:
    """Train and valid loss per epoch, and the metrics on a second axis."""
    from matplotlib.ticker import MaxNLocator

    fig = figures.new_figure(6.4, 3.6)
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
    fig = figures.new_figure(side + 0.8, side)
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


def _style(name: str) -> dict[str, Any]:
    if " at " in name:  # a CAM ("Grad-CAM at layer4"), post hoc: dashed
        return dict(ls="--", marker="s")
    if name == "random":
        return dict(ls=":", marker="", color="grey")
    return dict(ls="-", marker="o")


def curves_figure(curves: Mapping[str, Sequence[float]], mode: str = "deletion", title: str | None = None) -> Any:
    """Probability of the true class against the share of pixels deleted (or inserted), highest ranked first,
    per map."""
    fig = figures.new_figure(6.4, 3.8)
    ax = fig.add_axes((0.1, 0.14, 0.6, 0.74))
    for name, curve in curves.items():
        xs = np.linspace(0, 100, len(curve))
        ax.plot(xs, curve, ms=3.5, label=f"{name}  AUC {curve_auc(curve):.3f}", **_style(name))
    verb, better = ("deleted", "lower") if mode == "deletion" else ("inserted", "higher")
    ax.set_xlabel(f"pixels {verb}, highest ranked first (%)")
    ax.set_ylabel("probability of the true class")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title=f"map ({better} AUC = more faithful)",
              title_fontsize=8, frameon=False)
    ax.set_title(title or f"{mode} curves", fontsize=11, fontweight="bold")
    return fig


# --------------------------------------------------------------------------- bars (localisation, compare)


def bar_figure(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str,
               hlines: Mapping[str, float] | None = None) -> Any:
    """Grouped bars in [0, 1], values written on top; NaN values get no bar; ``hlines`` are dashed references."""
    n, k = len(groups), max(1, len(series))
    plot_w = max(3.0, n * (0.35 * k + 0.5))
    fig_w = 0.8 + plot_w + 2.0  # room for the legend on the right
    fig = figures.new_figure(fig_w, 3.8)
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


def localization_figure(localization: Mapping[str, Any]) -> Any:
    """Pointing game and energy in box per map, with chance as a dashed line."""
    scores = {k: v for k, v in localization["scores"].items() if v["kind"] != "chance"}
    chance = localization["scores"].get("chance", {}).get("energy")
    return bar_figure(list(scores), {m: [v[m] for v in scores.values()] for m in ("pointing", "energy")},
                      f"does the map find the object? ({localization['images']} images)", "score",
                      {"chance": chance} if chance is not None else None)


# --------------------------------------------------------------------------- a sweep's leaderboard

VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "no evidence": "tab:grey", "baseline": "black"}


def _millions(value: float, _pos: Any = None) -> str:
    return f"{value / 1e6:.4g}M" if value >= 1e5 else f"{value:.0f}"


def leaderboard_figure(rows: Sequence[Any], paired: bool = True) -> Any:
    """Left: each configuration's accuracy against the baseline, paired by seed, with its 95% interval (the
    verdict's picture; without pairs, the mean accuracy ± std over seeds). Right: mean accuracy against
    parameters, the Pareto front drawn through its configurations."""
    from matplotlib import ticker

    height = max(3.4, 1.3 + 0.32 * len(rows))
    fig = figures.new_figure(11.0, height)
    left = fig.add_axes((0.24, 0.75 / height, 0.33, 1 - 1.2 / height))
    ys = np.arange(len(rows))[::-1]
    names = [("★ " if r.pareto else "") + r.config for r in rows]
    for y, r in zip(ys, rows):
        colour = VERDICT_COLOURS.get(r.verdict, "tab:blue")
        if paired:
            if r.verdict == "baseline":
                left.annotate("baseline", (0, y), xytext=(4, -3), textcoords="offset points", fontsize=7)
            elif not np.isnan(r.difference):
                err = None if np.isnan(r.low) else [[r.difference - r.low], [r.high - r.difference]]
                left.errorbar(r.difference, y, xerr=err, fmt="o", color=colour, capsize=3, ms=5)
        elif not np.isnan(r.accuracy):
            left.errorbar(r.accuracy, y, xerr=None if np.isnan(r.accuracy_std) else r.accuracy_std, fmt="o",
                          color="tab:blue", capsize=3, ms=5)
    if paired:
        left.axvline(0, color="black", lw=1)
        pairs = sorted({r.pairs for r in rows if r.pairs})
        n = f"{pairs[0]} seeds" if len(pairs) == 1 else "seeds: see the table"
        left.set_xlabel(f"accuracy minus none's, paired by seed (95% interval, {n})")
    else:
        left.set_xlabel("validation accuracy, mean ± std over trials")
    left.set_yticks(ys, names, fontsize=8)
    left.set_ylim(-0.7, len(rows) - 0.3)
    left.grid(axis="x", alpha=0.3)
    left.set_title("is the difference real?" if paired else "accuracy", fontsize=11, fontweight="bold")
    right = fig.add_axes((0.66, left.get_position().y0, 0.32, left.get_position().height))
    pts = [(r.params, r.accuracy, r) for r in rows if not (np.isnan(r.params) or np.isnan(r.accuracy))]
    for x, y, r in pts:
        right.errorbar(x, y, yerr=None if np.isnan(r.accuracy_std) else r.accuracy_std, fmt="o", capsize=2, ms=5,
                       color=VERDICT_COLOURS.get(r.verdict, "tab:blue"), alpha=0.9 if r.pareto else 0.45)
        right.annotate(r.config, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((x, y) for x, y, r in pts if r.pareto)
    if front:  # a ring on each point of the front (one point is a front too), a line through them
        right.plot(*zip(*front), "--o", color="tab:orange", lw=1, ms=11, mfc="none", label="Pareto front (★)")
        right.legend(fontsize=8, loc="lower right")
    if pts and max(x for x, _, _ in pts) > 10 * min(x for x, _, _ in pts):
        right.set_xscale("log")
    right.xaxis.set_major_formatter(ticker.FuncFormatter(_millions))
    right.xaxis.set_minor_formatter(ticker.NullFormatter())
    right.set_xlabel("parameters")
    right.set_ylabel("validation accuracy")
    right.grid(alpha=0.3)
    right.set_title("accuracy against cost", fontsize=11, fontweight="bold")
    return fig
