"""Tests for attnzoo.demo: the synthetic demo dataset with known object boxes."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from attnzoo.train import demo
from attnzoo.train.demo import DEMO_CLASSES, demo_root, make_demo, read_boxes, render_sample

SMALL = {"n_train": 24, "n_valid": 12, "size": 64}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A small demo set shared by the read-only tests."""
    return make_demo(tmp_path_factory.mktemp("demo") / "set", seed=0, **SMALL)


def _png_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(root.rglob("*.png"))


def _read_rows(root: pathlib.Path) -> list[dict[str, str]]:
    with open(root / "boxes.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_classes_are_six_sorted_names() -> None:
    assert len(DEMO_CLASSES) == 6
    assert list(DEMO_CLASSES) == sorted(DEMO_CLASSES)
    assert len(set(DEMO_CLASSES)) == 6


def test_layout_has_split_and_class_folders(small_set: pathlib.Path) -> None:
    assert sorted(p.name for p in small_set.iterdir()) == ["boxes.csv", "demo.json", "train", "valid"]
    for split, n in (("train", SMALL["n_train"]), ("valid", SMALL["n_valid"])):
        assert sorted(p.name for p in (small_set / split).iterdir()) == list(DEMO_CLASSES)
        counts = [len(list((small_set / split / c).glob("*.png"))) for c in DEMO_CLASSES]
        assert sum(counts) == n
        assert max(counts) - min(counts) <= 1  # balanced
        for c in DEMO_CLASSES:
            names = sorted(p.name for p in (small_set / split / c).iterdir())
            assert names == [f"{c}_{i:05d}.png" for i in range(len(names))]


def test_images_are_rgb_pngs_of_requested_size(small_set: pathlib.Path) -> None:
    files = _png_files(small_set)
    assert len(files) == SMALL["n_train"] + SMALL["n_valid"]
    for p in files:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (SMALL["size"], SMALL["size"])


def test_classes_balanced_when_not_divisible(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "odd", n_train=8, n_valid=7, size=32)
    train = [len(list((root / "train" / c).glob("*.png"))) for c in DEMO_CLASSES]
    valid = [len(list((root / "valid" / c).glob("*.png"))) for c in DEMO_CLASSES]
    assert sum(train) == 8 and max(train) - min(train) <= 1
    assert sum(valid) == 7 and max(valid) - min(valid) <= 1


def test_boxes_csv_has_one_row_per_image_inside_and_nonempty(small_set: pathlib.Path) -> None:
    with open(small_set / "boxes.csv", encoding="utf-8") as f:
        assert f.readline().rstrip("\n") == "image,x_min,y_min,x_max,y_max"
    rows = _read_rows(small_set)
    images = [r["image"] for r in rows]
    expected = sorted(p.relative_to(small_set).as_posix() for p in _png_files(small_set))
    assert sorted(images) == expected
    assert len(set(images)) == len(images)
    size = SMALL["size"]
    for r in rows:
        assert "\\" not in r["image"]
        x0, y0, x1, y1 = (int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= x0 < x1 <= size
        assert 0 <= y0 < y1 <= size
        # Objects span roughly 25%-55% of the side.
        assert 0.15 * size <= max(x1 - x0, y1 - y0) <= 0.65 * size


def test_read_boxes_matches_csv(small_set: pathlib.Path) -> None:
    boxes = read_boxes(small_set)
    rows = _read_rows(small_set)
    assert len(boxes) == len(rows)
    for r in rows:
        assert boxes[r["image"]] == tuple(int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))


def test_same_seed_gives_identical_bytes(tmp_path: pathlib.Path) -> None:
    a = make_demo(tmp_path / "a", seed=3, **SMALL)
    b = make_demo(tmp_path / "b", seed=3, **SMALL)
    files_a = [p.relative_to(a) for p in _png_files(a)]
    assert files_a == [p.relative_to(b) for p in _png_files(b)]
    for rel in [*files_a, pathlib.Path("boxes.csv"), pathlib.Path("demo.json")]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_different_seeds_differ(tmp_path: pathlib.Path) -> None:
    a = make_demo(tmp_path / "a", seed=0, **SMALL)
    b = make_demo(tmp_path / "b", seed=1, **SMALL)
    assert (a / "boxes.csv").read_bytes() != (b / "boxes.csv").read_bytes()
    same = sum((a / p.relative_to(b)).read_bytes() == p.read_bytes() for p in _png_files(b))
    assert same == 0


def test_render_is_independent_of_call_order() -> None:
    first = render_sample(np.random.default_rng([5, 1, 2, 3]), "star", 64)
    render_sample(np.random.default_rng(99), "ring", 64)  # unrelated draw in between
    again = render_sample(np.random.default_rng([5, 1, 2, 3]), "star", 64)
    assert first[1] == again[1]
    assert first[0].tobytes() == again[0].tobytes()


@pytest.mark.parametrize("shape", DEMO_CLASSES)
def test_box_is_tight_bbox_of_object_on_plain_background(shape: str) -> None:
    for i in range(10):
        img, box = render_sample(np.random.default_rng([i, 7]), shape, 64, plain=True)
        arr = np.asarray(img)
        ys, xs = np.nonzero(arr.any(axis=2))  # plain background is black
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.mark.parametrize("shape", DEMO_CLASSES)
def test_plain_render_is_the_same_object_as_full_render(shape: str) -> None:
    full, box = render_sample(np.random.default_rng([1, 2]), shape, 64)
    plain, plain_box = render_sample(np.random.default_rng([1, 2]), shape, 64, plain=True)
    assert box == plain_box
    f, p = np.asarray(full), np.asarray(plain)
    obj = p.any(axis=2)
    assert np.array_equal(f[obj], p[obj])  # object pixels are drawn on top, unoccluded
    # The background under and around the object is textured, not flat.
    assert f[~obj].std() > 5


def test_saved_boxes_are_where_the_objects_are(small_set: pathlib.Path) -> None:
    for r in _read_rows(small_set):
        split, cls, name = r["image"].split("/")
        index = int(name.rsplit("_", 1)[1].split(".")[0])
        rng = demo.sample_rng(0, split, DEMO_CLASSES.index(cls), index)
        plain, box = render_sample(rng, cls, SMALL["size"], plain=True)
        assert box == tuple(int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        obj = np.asarray(plain).any(axis=2)
        with Image.open(small_set / r["image"]) as im:
            saved = np.asarray(im.convert("RGB"))
        assert np.array_equal(saved[obj], np.asarray(plain)[obj])
        x0, y0, x1, y1 = box
        assert obj[y0:y1, x0:x1].sum() == obj.sum()


def test_object_differs_from_background_inside_box(small_set: pathlib.Path) -> None:
    # Without knowing the renderer: the box region holds one flat colour that
    # covers much of it, which the noisy background never does.
    for r in _read_rows(small_set)[:12]:
        with Image.open(small_set / r["image"]) as im:
            arr = np.asarray(im.convert("RGB")).reshape(-1, 3)
        x0, y0, x1, y1 = (int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        size = SMALL["size"]
        inside = np.zeros((size, size), bool)
        inside[y0:y1, x0:x1] = True
        colors, counts = np.unique(arr[inside.ravel()], axis=0, return_counts=True)
        top = colors[counts.argmax()]
        assert counts.max() >= 0.2 * inside.sum()
        assert (arr[~inside.ravel()] == top).all(axis=1).sum() < counts.max()


def test_second_call_returns_quickly_without_rewriting(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "set", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    t0 = time.perf_counter()
    again = make_demo(tmp_path / "set", **SMALL)
    assert time.perf_counter() - t0 < 0.5
    assert again == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_incomplete_folder_is_regenerated(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "set", **SMALL)
    reference = (root / "boxes.csv").read_bytes()
    (root / "demo.json").unlink()
    victim = next(iter(_png_files(root)))
    victim.unlink()
    make_demo(root, **SMALL)
    assert (root / "demo.json").exists()
    assert victim.exists()
    assert len(_png_files(root)) == SMALL["n_train"] + SMALL["n_valid"]
    assert (root / "boxes.csv").read_bytes() == reference


def test_changed_parameters_are_regenerated(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "set", **SMALL)
    make_demo(root, n_train=12, n_valid=6, size=48)
    meta = json.loads((root / "demo.json").read_text())
    assert (meta["n_train"], meta["n_valid"], meta["size"]) == (12, 6, 48)
    assert len(_png_files(root)) == 18
    with Image.open(next(iter(_png_files(root)))) as im:
        assert im.size == (48, 48)


def test_set_from_an_older_generator_is_regenerated(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "set", **SMALL)
    meta = json.loads((root / "demo.json").read_text())
    stale = dict(meta, generator=meta["generator"] - 1)
    (root / "demo.json").write_text(json.dumps(stale))
    (root / "boxes.csv").write_text("stale\n")
    make_demo(root, **SMALL)
    assert json.loads((root / "demo.json").read_text()) == meta
    assert (root / "boxes.csv").read_text().startswith("image,")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_dataset_folder_gets_umask_permissions(tmp_path: pathlib.Path) -> None:
    old = os.umask(0o022)
    try:
        root = make_demo(tmp_path / "set", n_train=6, n_valid=6, size=32)
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o755


def test_force_rewrites(tmp_path: pathlib.Path) -> None:
    root = make_demo(tmp_path / "set", **SMALL)
    marker = root / "train" / "stale.txt"
    marker.write_text("x")
    make_demo(root, force=True, **SMALL)
    assert not marker.exists()


def test_demo_json_records_parameters(small_set: pathlib.Path) -> None:
    meta = json.loads((small_set / "demo.json").read_text())
    assert meta["version"] == demo.DEMO_VERSION
    assert isinstance(meta["generator"], int)
    assert meta["seed"] == 0
    assert meta["classes"] == list(DEMO_CLASSES)
    assert {k: meta[k] for k in SMALL} == SMALL


def test_no_temporary_folders_left_behind(tmp_path: pathlib.Path) -> None:
    make_demo(tmp_path / "set", **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        make_demo(root, **SMALL)
    assert (root / "thesis.tex").read_text() == "precious"


def test_default_root_honours_attnzoo_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path / "cache"))
    assert demo_root(4) == tmp_path / "cache" / "demo-v1-seed4"
    root = make_demo(seed=4, n_train=6, n_valid=6, size=32)
    assert root == tmp_path / "cache" / "demo-v1-seed4"
    assert (root / "demo.json").exists()


def test_default_root_without_env_is_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNZOO_CACHE", raising=False)
    assert demo_root() == pathlib.Path.home() / ".cache" / "attnzoo" / "demo-v1-seed0"


def test_accepts_str_root(tmp_path: pathlib.Path) -> None:
    root = make_demo(os.fspath(tmp_path / "s"), n_train=6, n_valid=6, size=32)
    assert isinstance(root, pathlib.Path) and (root / "demo.json").exists()


def test_rejects_bad_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        make_demo(tmp_path / "x", size=8)
    with pytest.raises(ValueError):
        make_demo(tmp_path / "x", n_train=-1)
    with pytest.raises(ValueError):
        render_sample(np.random.default_rng(0), "hexagon", 64)
