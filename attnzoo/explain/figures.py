"""Figures that show where an image classifier looks.

Turns images plus attention maps into publication-style figures in the spirit
of *Learn To Pay Attention* (Jetley et al., 2018, Figure 3): the input image,
then each site's attention map upsampled, colour-mapped (``jet``) and blended
over the image.

Conventions
-----------
* An *image* is an ``(H, W, 3)`` array, ``float`` in ``[0, 1]`` or ``uint8``.
  ``(H, W)`` / ``(H, W, 1)`` grey images, ``(3, H, W)`` arrays or tensors and
  PIL images are accepted too.  Normalised network inputs must first go
  through :func:`denormalize`.
* An *attention map* is a 2-D ``(h, w)`` array (numpy or torch), usually much
  smaller than the image.  Leading singleton dimensions are squeezed.  Every
  map is min-max normalised on its own before display, so colours compare
  *within* a map, not across maps.
* A *site* is the name of the layer the map comes from (``"layer3"``).

Figures are built as standalone :class:`matplotlib.figure.Figure` objects with
an Agg canvas: nothing here touches pyplot's global state or needs a display.
Save them with :func:`save_figure` (or ``fig.savefig``); in Jupyter they
display when they are the cell's value.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "attention_figure",
    "attention_grid",
    "denormalize",
    "images_figure",
    "overlay",
    "save_figure",
    "upsample_map",
]

# Colours for correct / wrong predictions: dark enough to read on white.
CORRECT_COLOR = "#1b7f3b"
WRONG_COLOR = "#c62828"
CORRECT_MARK = "\u2713"  # check mark
WRONG_MARK = "\u2717"  # ballot x

DEFAULT_DPI = 110
# Plain "green"/"red" passed by callers are swapped for the readable shades above.
_NICE_COLORS = {"green": CORRECT_COLOR, "red": WRONG_COLOR}

# Layout constants, in inches / points.
_TITLE_PT = 10.0
_TEXT_PT = 9.0
_TICK_PT = 7.5
_LINE_IN = 1.3 / 72.0  # line height per point of font size
_CBAR_W = 0.11  # colour-bar thickness
_CBAR_PAD = 0.07  # gap between panel and its colour bar
_CBAR_LABEL_ROOM = 0.55  # tick labels + "attention" label right of the bar
_CHAR_W = 0.58 / 72.0  # average glyph width per point of font size (DejaVu Sans)


# --------------------------------------------------------------------------
# array helpers
# --------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a torch tensor, PIL image or array-like to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_image(image: Any) -> np.ndarray:
    """Return ``image`` as an ``(H, W, 3)`` float32 array in ``[0, 1]``."""
    arr = _to_numpy(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / 255.0
    arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0)
    return np.clip(arr, 0.0, 1.0)


def _as_map(m: Any) -> np.ndarray:
    """Return an attention map as a 2-D float32 array (squeezing extra dims)."""
    arr = _to_numpy(m).astype(np.float32, copy=False)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (h, w) attention map, got shape {arr.shape}")
    return arr


def _map_list(m: Any, n: int, site: str) -> list[np.ndarray]:
    """Split ``(N, h, w)`` / ``(N, 1, h, w)`` / list-of-``(h, w)`` into ``n`` maps."""
    if isinstance(m, (list, tuple)):
        maps = [_as_map(x) for x in m]
    else:
        arr = _to_numpy(m)
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim == 2 and n == 1:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"maps[{site!r}] must be (N, h, w) or a list of (h, w), got shape {arr.shape}")
        maps = [_as_map(x) for x in arr]
    if len(maps) < n:
        raise ValueError(f"maps[{site!r}] has {len(maps)} maps for {n} images")
    return maps[:n]


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample an ``(h, w)`` map to ``size=(H, W)``, min-max normalised.

    Returns float32 in ``[0, 1]``.  A constant map becomes all ``0.5``; NaN and
    inf entries are treated as the map's minimum / maximum.
    """
    import torch
    import torch.nn.functional as F

    arr = _as_map(m).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        lo_f = float(arr[finite].min()) if finite.any() else 0.0
        hi_f = float(arr[finite].max()) if finite.any() else 0.0
        arr = np.nan_to_num(arr, nan=lo_f, posinf=hi_f, neginf=lo_f)
    out_h, out_w = int(size[0]), int(size[1])
    t = torch.from_numpy(arr)[None, None]
    if t.shape[-2:] != (out_h, out_w):
        t = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)
    up = t[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.full((out_h, out_w), 0.5, dtype=np.float32)
    return ((up - lo) / (hi - lo)).clip(0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend ``image`` with the colour-mapped, upsampled map ``m``.

    ``(1 - alpha) * image + alpha * cmap(upsample_map(m))``; returns an
    ``(H, W, 3)`` float32 array in ``[0, 1]``.  ``alpha=0`` gives the image back.
    """
    import matplotlib

    img = _as_image(image)
    heat = upsample_map(m, img.shape[:2])
    colored = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    a = float(np.clip(alpha, 0.0, 1.0))
    return np.clip((1.0 - a) * img + a * colored, 0.0, 1.0).astype(np.float32)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``(x - mean) / std`` channel normalisation.

    ``(3, H, W)`` -> ``(H, W, 3)``; ``(B, 3, H, W)`` -> ``(B, H, W, 3)``;
    float32 clipped to ``[0, 1]``.  Accepts numpy arrays too.
    """
    arr = _to_numpy(x).astype(np.float32)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {arr.shape}")
    c = arr.shape[-3]
    mean_a = np.asarray(_to_numpy(mean), dtype=np.float32).reshape(-1)
    std_a = np.asarray(_to_numpy(std), dtype=np.float32).reshape(-1)
    if mean_a.size not in (1, c) or std_a.size not in (1, c):
        raise ValueError(f"mean/std must have 1 or {c} entries")
    shape = (c, 1, 1)
    out = arr * np.broadcast_to(std_a, (c,)).reshape(shape) + np.broadcast_to(mean_a, (c,)).reshape(shape)
    out = np.moveaxis(out, -3, -1)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------
# figure helpers
# --------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A standalone white figure with an Agg canvas (no pyplot involvement)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DEFAULT_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _add_axes(fig: Figure, x: float, y: float, w: float, h: float, label: str) -> Axes:
    """Add axes at a position given in inches from the bottom-left corner."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((x / fw, y / fh, w / fw, h / fh), label=label)


def _interp(img_shape: tuple[int, ...], panel_in: float) -> str:
    """Bilinear when the image is shown enlarged, antialiased when reduced."""
    shown_px = panel_in * DEFAULT_DPI
    return "antialiased" if max(img_shape[:2]) > 1.5 * shown_px else "bilinear"


def _show(ax: Axes, img: np.ndarray, panel_in: float) -> None:
    """Show an RGB image without ticks, keeping the frame (spines) thin and grey."""
    ax.imshow(img, interpolation=_interp(img.shape, panel_in), resample=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(0.6)
        spine.set_edgecolor("#888888")


def _shorten(text: str, max_chars: int) -> str:
    """Shorten ``text`` to ``max_chars`` with a middle ellipsis."""
    if len(text) <= max_chars or max_chars < 5:
        return text
    keep = max_chars - 1
    return text[: (keep + 1) // 2] + "\u2026" + text[len(text) - keep // 2 :]


def _chars_fitting(width_in: float, fontsize: float) -> int:
    return max(4, int(width_in / (_CHAR_W * fontsize)))


def _format_prob(p: float) -> str:
    """Probability in [0, 1] (or a percentage already, if > 1) as ``"93.1%"``."""
    p = float(p)
    pct = p if p > 1.0 else 100.0 * p
    return f"{pct:.1f}%"


def _site_title(site: str, m: np.ndarray) -> str:
    return f"{site} ({m.shape[0]}x{m.shape[1]})"


def _colorbar(fig: Figure, cax: Axes, cmap: str, orientation: str = "vertical") -> Any:
    """Colour bar for normalised attention (0..1) drawn into ``cax``."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=matplotlib.colormaps[cmap])
    cb = fig.colorbar(sm, cax=cax, orientation=orientation, ticks=[0.0, 0.5, 1.0])
    cb.ax.tick_params(labelsize=_TICK_PT, length=2, width=0.6, pad=1.5)
    cb.outline.set_linewidth(0.6)
    cb.set_label("attention", fontsize=_TICK_PT + 0.5, labelpad=2)
    return cb


def _aspect(img: np.ndarray) -> float:
    """Height / width of an image, clipped so panels stay reasonable."""
    return float(np.clip(img.shape[0] / max(1, img.shape[1]), 0.5, 1.6))


# --------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------


def attention_figure(
    image: Any,
    maps: Mapping[str, Any],
    predictions: Sequence[tuple[str, float]] | None = None,
    title: str | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """One image and its attention maps in a row.

    Panel 0 is the image with the top ``predictions`` (``(label, prob)``
    pairs, prob in ``[0, 1]``) written underneath as ``"label 93.1%"``, the
    first in bold.  Then one panel per site, in ``maps`` order: the overlay,
    titled ``"site (hxw)"``, with its own colour bar labelled ``attention``.
    Axes labels: ``"image"`` and ``"overlay:<site>"``; colour-bar axes are
    labelled ``"<colorbar>"``.
    """
    img = _as_image(image)
    site_maps = [(str(k), _as_map(v)) for k, v in maps.items()]
    preds = list(predictions or [])
    n_sites = len(site_maps)

    panel = 2.6 if n_sites <= 3 else 2.2
    ph = panel * _aspect(img)
    cbar_room = _CBAR_PAD + _CBAR_W + _CBAR_LABEL_ROOM
    gap = 0.22
    margin = 0.12
    title_h = 0.34  # one line of 10 pt title + pad
    sup_h = 0.32 if title else 0.0
    pred_h = (len(preds) * _TEXT_PT * _LINE_IN + 0.12) if preds else 0.05

    width = 2 * margin + panel + n_sites * (gap + panel + cbar_room)
    height = margin + sup_h + title_h + ph + pred_h + margin
    fig = new_figure(width, height)
    y0 = margin + pred_h
    max_chars = _chars_fitting(panel + 0.3, _TITLE_PT)

    ax = _add_axes(fig, margin, y0, panel, ph, "image")
    _show(ax, img, panel)
    ax.set_title(f"image ({img.shape[0]}x{img.shape[1]})", fontsize=_TITLE_PT, pad=5)
    pred_chars = _chars_fitting(panel + gap, _TEXT_PT)
    for i, (label, prob) in enumerate(preds):
        txt = _shorten(f"{label} {_format_prob(prob)}", pred_chars)
        ax.annotate(
            txt,
            xy=(0.5, 0.0),
            xycoords="axes fraction",
            xytext=(0, -4 - i * _TEXT_PT * 1.3),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=_TEXT_PT,
            fontweight="bold" if i == 0 else "normal",
            color="#222222" if i == 0 else "#555555",
            gid="prediction",
        )

    x = margin + panel + gap
    for site, m in site_maps:
        ax = _add_axes(fig, x, y0, panel, ph, f"overlay:{site}")
        _show(ax, overlay(img, m, alpha=alpha, cmap=cmap), panel)
        ax.set_title(_shorten(_site_title(site, m), max_chars), fontsize=_TITLE_PT, pad=5)
        cax = _add_axes(fig, x + panel + _CBAR_PAD, y0, _CBAR_W, ph, "<colorbar>")
        _colorbar(fig, cax, cmap)
        x += panel + cbar_room + gap

    if title:
        _suptitle(fig, title, margin, height)
    return fig


def _suptitle(fig: Figure, title: str, margin: float, height: float) -> None:
    """The figure's bold title, ``margin`` inches below the top of a layout ``height`` inches tall."""
    fig.suptitle(title, fontsize=_TITLE_PT + 2, fontweight="bold", y=1.0 - margin / height, va="top")


def _row_title(label: str, pred: str, prob: float | None, width_in: float) -> tuple[str, bool]:
    """``"✓ true: X / pred: Y (p%)"``, wrapped onto two lines if it would not fit."""
    correct = str(label) == str(pred)
    mark = CORRECT_MARK if correct else WRONG_MARK
    p = f" ({_format_prob(prob)})" if prob is not None else ""
    one_line = f"{mark} true: {label} / pred: {pred}{p}"
    if len(one_line) <= _chars_fitting(width_in, _TEXT_PT):
        return one_line, correct
    return f"{mark} true: {label} /\n    pred: {pred}{p}", correct


def attention_grid(
    images: Sequence[Any],
    maps: Mapping[str, Any],
    labels: Sequence[str],
    preds: Sequence[str],
    probs: Sequence[float] | None = None,
    title: str | None = None,
    max_rows: int = 8,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """Paper-Figure-3 grid: one row per image, the image then one overlay per site.

    ``maps[site]`` is an ``(N, h, w)`` array/tensor or a list of ``N`` ``(h, w)``
    maps aligned with ``images``.  Each row is captioned
    ``"✓ true: X / pred: Y (p%)"`` in green when ``label == pred`` and
    ``"✗ ..."`` in red otherwise (the image frame gets the same colour).
    Column headers are ``"image"`` and ``"site (hxw)"``; one shared horizontal
    colour bar sits under the overlay columns.  At most ``max_rows`` rows.
    Axes labels: ``"image:<row>"`` and ``"overlay:<site>:<row>"``.
    """
    n = min(len(images), max(0, int(max_rows)))
    if len(labels) < n or len(preds) < n or (probs is not None and len(probs) < n):
        raise ValueError("labels / preds / probs must have one entry per image")
    imgs = [_as_image(im) for im in list(images)[:n]]
    sites = [(str(k), _map_list(v, n, str(k))) for k, v in maps.items()]
    n_cols = 1 + len(sites)

    panel = 2.4 if n_cols <= 4 else 2.1
    row_h = [panel * _aspect(im) for im in imgs]  # each row keeps its image's shape
    hgap = 0.1
    margin = 0.12
    row_width = n_cols * panel + (n_cols - 1) * hgap
    captions = [
        _row_title(labels[i], preds[i], None if probs is None else probs[i], row_width) for i in range(n)
    ]
    cap_lines = max((c[0].count("\n") + 1 for c in captions), default=1)
    cap_h = cap_lines * _TEXT_PT * _LINE_IN + 0.08
    row_gap = 0.16
    header_h = 0.3
    sup_h = 0.36 if title else 0.0
    cbar_h = 0.75 if sites and n else 0.0

    width = 2 * margin + row_width
    height = margin + sup_h + header_h + n * cap_h + sum(row_h) + max(0, n - 1) * row_gap
    height += cbar_h + margin
    fig = new_figure(width, max(height, 1.0))
    header_chars = _chars_fitting(panel + hgap, _TITLE_PT)

    top = height - margin - sup_h
    col_x = [margin + j * (panel + hgap) for j in range(n_cols)]
    headers = ["image"] + [_site_title(s, ms[0]) if ms else s for s, ms in sites]
    _column_headers(fig, [_shorten(head, header_chars) for head in headers], col_x, panel, top, (width, height))

    y = top - header_h
    for i in range(n):
        y_img = y - cap_h - row_h[i]
        _grid_row(fig, i, imgs[i], [(site, ms[i]) for site, ms in sites], captions[i], col_x, (y_img, panel, row_h[i]),
                  alpha=alpha, cmap=cmap)
        y = y_img - row_gap

    if cbar_h:
        _shared_colorbar(fig, cmap, col_x[1], row_width - (panel + hgap), margin + 0.42)

    if title:
        _suptitle(fig, title, margin, height)
    return fig


def _column_headers(fig: Figure, headers: Sequence[str], col_x: Sequence[float], panel: float, top: float,
                    layout: tuple[float, float]) -> None:
    """Bold headers centred over the grid's columns. ``layout``: the (width, height) in inches the positions were
    computed for, which the figure itself may exceed (it is at least an inch tall)."""
    width, height = layout
    for x, head in zip(col_x, headers):
        fig.text(
            (x + panel / 2) / width,
            (top - 0.04) / height,
            head,
            ha="center",
            va="top",
            fontsize=_TITLE_PT,
            fontweight="bold",
            gid="column-header",
        )


def _grid_row(fig: Figure, i: int, img: np.ndarray, site_maps: Sequence[tuple[str, np.ndarray]],
              caption: tuple[str, bool], col_x: Sequence[float], box: tuple[float, float, float], *, alpha: float,
              cmap: str) -> None:
    """Row ``i`` of :func:`attention_grid`: the image, framed and captioned in green when the prediction is
    right and red when wrong, then each site's overlay. ``box``: the row's bottom, the panel width and the row
    height, in inches."""
    text, correct = caption
    color = CORRECT_COLOR if correct else WRONG_COLOR
    y, panel, ph = box
    ax = _add_axes(fig, col_x[0], y, panel, ph, f"image:{i}")
    _show(ax, img, panel)
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.0)
    ax.text(
        0.0,
        1.0,
        text,
        transform=ax.transAxes,
        ha="left",
        va="bottom",
        fontsize=_TEXT_PT,
        fontweight="bold",
        color=color,
        gid="row-title",
    )
    for x, (site, m) in zip(col_x[1:], site_maps):
        ax = _add_axes(fig, x, y, panel, ph, f"overlay:{site}:{i}")
        _show(ax, overlay(img, m, alpha=alpha, cmap=cmap), panel)


def _shared_colorbar(fig: Figure, cmap: str, x0: float, span_w: float, y: float) -> None:
    """One horizontal colour bar centred under the overlay columns (from ``x0``, ``span_w`` inches wide): every
    map is min-max normalised, so one scale reads them all."""
    bar_w = min(span_w, 3.6)
    cax = _add_axes(fig, x0 + (span_w - bar_w) / 2, y, bar_w, _CBAR_W, "<colorbar>")
    cb = _colorbar(fig, cax, cmap, orientation="horizontal")
    cb.set_label("attention (each map min-max normalised)", fontsize=_TICK_PT + 0.5)


def images_figure(
    images: Sequence[Any],
    titles: Sequence[str],
    colors: Sequence[str] | None = None,
    ncols: int = 4,
) -> Figure:
    """A plain grid of images, each with a (possibly multi-line) title.

    ``colors`` optionally colours each title (e.g. green/red for right/wrong).
    Axes labels: ``"image:<index>"``.
    """
    imgs = [_as_image(im) for im in images]
    n = len(imgs)
    ncols = max(1, min(int(ncols), max(n, 1)))
    nrows = max(1, math.ceil(n / ncols))
    panel = 2.4 if ncols <= 5 else 2.1
    row_h = [
        panel * max(_aspect(im) for im in imgs[r * ncols : (r + 1) * ncols]) if imgs else panel
        for r in range(nrows)
    ]
    hgap, vgap, margin = 0.14, 0.14, 0.12
    lines = max((str(t).count("\n") + 1 for t in titles[:n]), default=1)
    title_h = lines * _TEXT_PT * _LINE_IN + 0.1
    width = 2 * margin + ncols * panel + (ncols - 1) * hgap
    height = 2 * margin + nrows * title_h + sum(row_h) + (nrows - 1) * vgap
    fig = new_figure(width, height)
    max_chars = _chars_fitting(panel + hgap, _TEXT_PT)
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncols)
        x = margin + c * (panel + hgap)
        y = height - margin - (r + 1) * title_h - sum(row_h[: r + 1]) - r * vgap
        ax = _add_axes(fig, x, y, panel, row_h[r], f"image:{k}")
        _show(ax, img, panel)
        ax.set_anchor("N")  # top-align images of a row so titles line up
        text = "\n".join(_shorten(s, max_chars) for s in str(titles[k]).split("\n"))
        color = "#222222"
        if colors is not None and k < len(colors):
            color = _NICE_COLORS.get(str(colors[k]), colors[k])
        ax.set_title(text, fontsize=_TEXT_PT, color=color, pad=4)
        if colors is not None and k < len(colors):
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1.5)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Save ``fig`` (PNG unless ``path`` names another format), then close it.

    Creates parent directories; a path without a suffix gets ``.png``.
    Returns the path written.
    """
    from ..runs.outputs import replace

    out = Path(path)
    if not out.suffix:
        out = out.with_suffix(".png")
    try:
        replace(out, _writer(fig, out, dpi))
    finally:
        _close(fig)
    return out


def _writer(fig: Figure, out: Path, dpi: int) -> Any:
    """``write(tmp)`` saving ``fig`` in ``out``'s format, its texts made drawable; a PNG carries attnzoo's mark
    (``outputs.OWN_MARK``), so that ``fit`` never reads a figure of attnzoo's as training data."""
    from ..runs.outputs import own_mark

    _drawable_text(fig)
    fmt = out.suffix.lstrip(".").lower() or "png"
    meta = own_mark() if fmt == "png" else {}
    return lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08,
                                   facecolor="white", metadata=meta)


def _drawable_text(fig: Figure) -> None:
    """Every text of ``fig`` made ``printable`` (FreeType refuses surrogates, and a font has no glyph for a
    control character), tick labels included."""
    from matplotlib.text import Text

    from ..runs.outputs import printable

    for artist in fig.findobj(Text):
        if printable(artist.get_text()) != artist.get_text():
            artist.set_text(printable(artist.get_text()))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t.get_text() for t in axis.get_ticklabels()]
            if any(printable(label) != label for label in labels):
                axis.set_ticks(axis.get_ticklocs(), [printable(label) for label in labels])


def _close(fig: Figure) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:  # only pyplot-managed figures need closing
        plt.close(fig)


def save_new_figure(fig: Figure, path: str | Path, *, fresh: bool = True, dpi: int = DEFAULT_DPI) -> Path:
    """Save ``fig`` under a name no file has yet (``outputs.write_new``), then close it; returns the name."""
    from ..runs.outputs import write_new

    out = Path(path)
    out = out if out.suffix else out.with_suffix(".png")
    try:
        return write_new(out, _writer(fig, out, dpi), fresh=fresh)
    finally:
        _close(fig)
