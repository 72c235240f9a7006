"""Tests for attnzoo.viz: map upsampling, overlays, figure structure and saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from attnzoo.explain import figures as viz


def _panels(fig):
    """Image/overlay axes of a figure: every axes that is not a colour bar."""
    return [ax for ax in fig.axes if not _is_colorbar(ax)]


def _is_colorbar(ax) -> bool:
    # matplotlib marks the axes a Colorbar draws into with ``ax._colorbar``
    return getattr(ax, "_colorbar", None) is not None


def _image(h: int = 64, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((h, w, 3)).astype(np.float32)


def _row_titles(fig) -> list:
    return [t for ax in fig.axes for t in ax.texts if t.get_gid() == "row-title"]


# ---------------------------------------------------------------- upsample_map


def test_upsample_shape_dtype_range():
    m = np.random.default_rng(1).normal(size=(7, 5)) * 10 + 3
    up = viz.upsample_map(m, (70, 40))
    assert up.shape == (70, 40)
    assert up.dtype == np.float32
    assert up.min() == pytest.approx(0.0) and up.max() == pytest.approx(1.0)


def test_upsample_keeps_peak_location():
    m = np.zeros((4, 4))
    m[1, 2] = 5.0
    up = viz.upsample_map(m, (64, 64))
    r, c = np.unravel_index(np.argmax(up), up.shape)
    assert 16 <= r < 32 and 32 <= c < 48


def test_upsample_is_smooth_not_blocky():
    m = np.zeros((4, 4))
    m[1, 2] = 1.0
    up = viz.upsample_map(m, (64, 64))
    # nearest-neighbour would give only 2 distinct values
    assert len(np.unique(np.round(up, 4))) > 10


def test_upsample_constant_map_is_half_without_nan():
    up = viz.upsample_map(np.full((7, 7), 3.0), (32, 32))
    assert not np.isnan(up).any()
    np.testing.assert_allclose(up, 0.5)


def test_upsample_accepts_torch_and_singleton_dims():
    m = torch.rand(1, 1, 6, 6)
    assert viz.upsample_map(m, (12, 12)).shape == (12, 12)


# ---------------------------------------------------------------------- overlay


def test_overlay_shape_dtype_range():
    img = (_image() * 255).astype(np.uint8)
    out = viz.overlay(img, np.random.default_rng(2).random((7, 7)))
    assert out.shape == (64, 48, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_overlay_alpha_zero_returns_image():
    img = _image()
    np.testing.assert_allclose(viz.overlay(img, np.random.rand(7, 7), alpha=0.0), img, atol=1e-6)
    u8 = (img * 255).astype(np.uint8)
    np.testing.assert_allclose(viz.overlay(u8, np.random.rand(7, 7), alpha=0.0), u8 / 255.0, atol=1e-6)


def test_overlay_colours_the_peak_red_with_jet():
    img = np.zeros((32, 32, 3), np.float32)
    m = np.zeros((4, 4))
    m[0, 0] = 1.0
    out = viz.overlay(img, m, alpha=1.0)
    assert out[0, 0, 0] > 0.4 and out[0, 0, 2] < 0.1  # jet top = dark red
    assert out[-1, -1, 2] > 0.4 and out[-1, -1, 0] < 0.1  # jet bottom = dark blue


# ------------------------------------------------------------- attention_figure


@pytest.mark.parametrize("n_sites", [0, 1, 3, 6])
def test_attention_figure_panels(n_sites):
    maps = {f"layer{i}": np.random.rand(7 * (i + 1), 7 * (i + 1)) for i in range(n_sites)}
    fig = viz.attention_figure(_image(), maps, predictions=[("cat", 0.931), ("dog", 0.05)], title="t")
    panels = _panels(fig)
    assert len(panels) == 1 + n_sites
    assert sum(_is_colorbar(ax) for ax in fig.axes) == n_sites
    assert [ax.get_label() for ax in panels] == ["image"] + [f"overlay:{s}" for s in maps]
    assert all(len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0 for ax in panels)


def test_attention_figure_titles_and_predictions():
    maps = {"layer3": np.random.rand(14, 14), "features.32": np.random.rand(7, 7)}
    fig = viz.attention_figure(_image(), maps, predictions=[("tabby cat", 0.931), ("lynx", 0.042)])
    titles = [ax.get_title() for ax in _panels(fig)]
    assert titles[1:] == ["layer3 (14x14)", "features.32 (7x7)"]
    texts = [t.get_text() for t in _panels(fig)[0].texts]
    assert texts == ["tabby cat 93.1%", "lynx 4.2%"]
    for ax in fig.axes:
        if _is_colorbar(ax):
            assert ax.get_ylabel() == "attention"
            assert ax.get_ylim() == pytest.approx((0.0, 1.0))


def test_attention_figure_width_grows_with_sites():
    w1 = viz.attention_figure(_image(), {"a": np.random.rand(7, 7)}).get_size_inches()[0]
    w3 = viz.attention_figure(_image(), {k: np.random.rand(7, 7) for k in "abc"}).get_size_inches()[0]
    assert w3 > w1 * 1.8


# --------------------------------------------------------------- attention_grid


def _grid_inputs(n: int = 4, sites=("layer2", "layer3", "layer4")):
    images = [_image() for _ in range(n)]
    maps = {
        sites[0]: np.random.rand(n, 28, 28),
        sites[1]: [np.random.rand(14, 14) for _ in range(n)],
        sites[2]: torch.rand(n, 1, 7, 7),
    }
    labels = ["cat", "dog", "cat", "bird"][:n]
    preds = ["cat", "cat", "cat", "plane"][:n]
    return images, maps, labels, preds


def test_attention_grid_panels_and_headers():
    images, maps, labels, preds = _grid_inputs()
    fig = viz.attention_grid(images, maps, labels, preds, probs=[0.9, 0.6, 0.7, 0.4], title="g")
    assert len(_panels(fig)) == 4 * (1 + 3)
    assert sum(_is_colorbar(ax) for ax in fig.axes) == 1
    headers = [t.get_text() for t in fig.texts if t.get_gid() == "column-header"]
    assert headers == ["image", "layer2 (28x28)", "layer3 (14x14)", "layer4 (7x7)"]


def test_attention_grid_row_titles_colours_and_marks():
    images, maps, labels, preds = _grid_inputs()
    fig = viz.attention_grid(images, maps, labels, preds, probs=[0.9, 0.6, 0.7, 0.4])
    rows = _row_titles(fig)
    assert len(rows) == 4
    for text, label, pred in zip(rows, labels, preds, strict=True):
        s = text.get_text()
        assert f"true: {label}" in s and f"pred: {pred}" in s
        r, g, b = to_rgb(text.get_color())
        if label == pred:
            assert g > r and viz.CORRECT_MARK in s and viz.WRONG_MARK not in s
        else:
            assert r > g and viz.WRONG_MARK in s and viz.CORRECT_MARK not in s
    assert "(90.0%)" in rows[0].get_text()


def test_attention_grid_max_rows_and_no_probs():
    images, maps, labels, preds = _grid_inputs()
    fig = viz.attention_grid(images, maps, labels, preds, max_rows=2)
    assert len(_panels(fig)) == 2 * 4
    assert all("%" not in t.get_text() for t in _row_titles(fig))


def test_attention_grid_without_sites():
    images, _, labels, preds = _grid_inputs()
    fig = viz.attention_grid(images, {}, labels, preds)
    assert len(_panels(fig)) == 4
    assert not any(_is_colorbar(ax) for ax in fig.axes)


def test_attention_grid_rejects_too_few_maps():
    images, maps, labels, preds = _grid_inputs()
    maps["layer2"] = maps["layer2"][:2]
    with pytest.raises(ValueError):
        viz.attention_grid(images, maps, labels, preds)


# ------------------------------------------------------------ images_figure


def test_images_figure_grid_titles_colours():
    imgs = [_image() for _ in range(5)]
    fig = viz.images_figure(
        imgs, [f"t{i}" for i in range(5)], colors=["red", "green"] * 2 + ["blue"], ncols=3
    )
    axes = _panels(fig)
    assert len(axes) == 5
    assert [ax.get_title() for ax in axes] == [f"t{i}" for i in range(5)]
    assert to_rgb(axes[0].title.get_color())[0] > 0.5
    assert to_rgb(axes[4].title.get_color()) == to_rgb("blue")
    # 3 columns, 2 rows: the figure is wider than tall-ish and rows differ in y
    ys = sorted({round(ax.get_position().y0, 3) for ax in axes})
    assert len(ys) == 2


# ------------------------------------------------------------- save / denorm


def test_save_figure_writes_png(tmp_path):
    fig = viz.attention_figure(_image(), {"layer3": np.random.rand(14, 14)}, [("cat", 0.5)])
    w_in, h_in = fig.get_size_inches()
    out = viz.save_figure(fig, tmp_path / "sub" / "dir" / "fig.png")
    assert out.exists() and out.parent.name == "dir"
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    # tight bbox trims margins but stays close to figure size at 110 dpi
    assert 0.6 * w_in * 110 < w < 1.3 * w_in * 110
    assert 0.6 * h_in * 110 < h < 1.3 * h_in * 110


def test_save_figure_adds_png_suffix(tmp_path):
    out = viz.save_figure(viz.images_figure([_image()], ["x"]), tmp_path / "plain")
    assert out.suffix == ".png" and out.exists()


def test_denormalize_inverts_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 8, 6)
    normed = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    back = viz.denormalize(normed, mean, std)
    assert back.shape == (2, 8, 6, 3)
    np.testing.assert_allclose(back, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    single = viz.denormalize(normed[0], mean, std)
    assert single.shape == (8, 6, 3)
    np.testing.assert_allclose(single, back[0], atol=1e-6)


def test_denormalize_clips():
    out = viz.denormalize(torch.full((3, 2, 2), 10.0), (0.5,) * 3, (0.5,) * 3)
    assert out.max() == 1.0


@pytest.mark.slow  # 5-7 s: the default run keeps under 3 minutes on a 2-core machine
def test_import_and_figures_leave_pyplot_alone(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np, attnzoo.viz as v;"
        "f = v.attention_figure(np.zeros((8, 8, 3)), {'a': np.eye(4)});"
        f"v.save_figure(f, {str(tmp_path / 'f.png')!r});"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "f.png").exists()
