"""Image-folder layouts, image modes, and the errors of a bad folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.errors import AttnzooError
from attnzoo.train.data import find_dataset, image_dataloaders


def write(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def classes_tree(root: Path, classes=("cat", "dog"), n: int = 3) -> None:
    for c in classes:
        for i in range(n):
            write(root / c / f"{i}.png")


def test_train_valid_layout(tmp_path):
    classes_tree(tmp_path / "train")
    classes_tree(tmp_path / "valid", n=2)
    info = find_dataset(tmp_path)
    assert info.layout == "train/valid" and info.classes == ["cat", "dog"]
    assert info.counts() == {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}}


def test_test_folder_serves_as_validation(tmp_path):
    classes_tree(tmp_path / "train")
    classes_tree(tmp_path / "test", n=1)
    assert len(find_dataset(tmp_path).valid) == 2


def test_intel_layout_ignores_seg_pred(tmp_path):
    classes_tree(tmp_path / "seg_train" / "seg_train", classes=("forest", "sea", "street"))
    classes_tree(tmp_path / "seg_test" / "seg_test", classes=("forest", "sea", "street"), n=1)
    write(tmp_path / "seg_pred" / "seg_pred" / "999.jpg")
    info = find_dataset(tmp_path)
    assert info.layout == "intel" and info.classes == ["forest", "sea", "street"]
    assert len(info.train) == 9 and len(info.valid) == 3
    assert not any("seg_pred" in str(p) for p in info.train + info.valid)


def test_single_folder_is_split_at_random_with_a_seed(tmp_path):
    classes_tree(tmp_path, n=10)
    a, b, c = (find_dataset(tmp_path, valid_pct=0.25, seed=s) for s in (1, 1, 2))
    assert len(a.valid) == 5 and len(a.train) == 15
    assert a.valid == b.valid and a.valid != c.valid
    assert not set(a.valid) & set(a.train)


def test_upper_case_extensions_count_and_other_files_do_not(tmp_path):
    classes_tree(tmp_path, n=2)
    write(tmp_path / "cat" / "BIG.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")
    info = find_dataset(tmp_path, valid_pct=0.2)
    names = {p.name for p in info.train + info.valid}
    assert "BIG.PNG" in names and "notes.txt" not in names and ".DS_Store" not in names


def test_one_class_is_a_clear_error(tmp_path):
    classes_tree(tmp_path, classes=("only",))
    with pytest.raises(AttnzooError, match="at least two classes"):
        find_dataset(tmp_path)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AttnzooError, match="not found"):
        find_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(AttnzooError, match="no usable images"):
        find_dataset(tmp_path / "empty")


def test_any_image_mode_and_size_becomes_an_rgb_batch(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "P", "RGB"]):
        write(tmp_path / "train" / "a" / f"{i}.png", mode, size=(30 + i, 17))
        write(tmp_path / "train" / "b" / f"{i}.png", mode, size=(12, 40 + i))
        write(tmp_path / "valid" / ("a" if i % 2 else "b") / f"{i}.png", mode)
    dls = image_dataloaders(find_dataset(tmp_path), img_size=24, bs=8, num_workers=0)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (8, 3, 24, 24) and torch.isfinite(xb).all()
    assert dls.vocab == ["a", "b"] and dls.c == 2


# --- messy folders: every kind in tests/badfiles.py -------------------------------------------------------------

def test_bad_files_are_skipped_with_reasons_and_the_rest_is_kept(tmp_path):
    from badfiles import make_bad_folder

    usable, skipped = make_bad_folder(tmp_path)
    info = find_dataset(tmp_path)
    assert sorted(info.train + info.valid) == sorted(usable)
    got = {Path(p): reason for p, reason in info.skipped}
    assert set(got) == set(skipped)
    for path, fragment in skipped.items():
        assert fragment in got[path], (path, got[path])
    assert info.classes == ["cat", "dog", "owl"]
    assert info.label(tmp_path / "train" / "dog" / "linked.png") == "dog"  # a symlink counts where it is found
    assert any("'empty' has no images" in w for w in info.warnings)
    assert any("'owl' has a single training image" in w for w in info.warnings)
    assert info.to_dict()["skipped"] == len(skipped)


def test_without_the_check_bad_image_files_are_not_looked_at(tmp_path):
    from badfiles import make_bad_folder

    make_bad_folder(tmp_path)
    info = find_dataset(tmp_path, check=False)
    assert tmp_path / "train" / "cat" / "zero.jpg" in info.train
    assert all("not an image" in r or "broken" in r for _, r in info.skipped) or not info.skipped


def test_awkward_images_are_read_right(tmp_path):
    from badfiles import bomb_png, exif_rotated_jpeg, sixteen_bit_png, transparent_palette_png

    from attnzoo.train.data import open_rgb

    rotated = open_rgb(exif_rotated_jpeg(tmp_path / "r.jpg"))
    assert rotated.size == (20, 40)  # the EXIF rotation is applied
    top, bottom = np.asarray(rotated)[:15].mean((0, 1)), np.asarray(rotated)[25:].mean((0, 1))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, blue below
    deep = np.asarray(open_rgb(sixteen_bit_png(tmp_path / "d.png")))[..., 0]
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 20  # rescaled, not saturated
    pal = np.asarray(open_rgb(transparent_palette_png(tmp_path / "p.png")))
    assert (pal[:, :8] == 255).all() and (pal[:, 8:] == (0, 0, 255)).all()  # transparency flattened onto white
    with pytest.raises(ValueError, match="decompression-bomb"):
        open_rgb(bomb_png(tmp_path / "b.png"))


def test_a_folder_of_only_bad_files_is_a_clear_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.jpg").write_bytes(b"")
    with pytest.raises(AttnzooError, match=r"no usable images .*2 files skipped"):
        find_dataset(tmp_path)


def test_a_random_split_keeps_a_training_image_of_every_class(tmp_path):
    classes_tree(tmp_path, classes=("many",), n=10)
    write(tmp_path / "rare" / "0.png")
    write(tmp_path / "rare" / "1.png")
    for seed in range(6):
        info = find_dataset(tmp_path, valid_pct=0.5, seed=seed)
        assert "rare" in info.counts()["train"] and info.counts()["train"]["rare"] >= 1


def test_the_bad_folder_trains_into_batches(tmp_path):
    from badfiles import make_bad_folder

    make_bad_folder(tmp_path)
    dls = image_dataloaders(find_dataset(tmp_path), img_size=24, bs=4, num_workers=0)
    for xb, _ in dls.train:
        assert xb.shape[1:] == (3, 24, 24) and torch.isfinite(xb).all()
