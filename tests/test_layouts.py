"""Data folders laid out in awkward ways: what is data, what is ignored, and what is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image

from attnzoo.errors import AttnzooError
from attnzoo.train.data import find_dataset, resolve_data


def images(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(folder / f"{seed}_{i}.png")


def test_empty_data_is_an_error_not_the_demo():
    with pytest.raises(AttnzooError, match="--data is empty"):
        resolve_data("")
    with pytest.raises(AttnzooError, match="--data is empty"):
        resolve_data("  ")


def test_run_folders_inside_the_data_are_never_read_as_a_class(tmp_path):
    images(tmp_path / "cat", 4)
    images(tmp_path / "dog", 4, 1)
    run = tmp_path / "runs" / "resnet18-lpa-pc-1"
    images(run, 3, 2)  # the run's plots
    (run / "attnzoo.json").write_text("{}")
    info = find_dataset(tmp_path)
    assert info.classes == ["cat", "dog"]
    assert any("runs/" in w and "run folders" in w for w in info.warnings)


def test_hidden_and_system_folders_are_ignored_and_named(tmp_path):
    images(tmp_path / "cat", 4)
    images(tmp_path / "dog", 4, 1)
    images(tmp_path / "cat" / ".ipynb_checkpoints", 3, 2)  # copies a notebook left inside a class
    images(tmp_path / "__MACOSX" / "cat", 2, 3)
    info = find_dataset(tmp_path)
    assert info.classes == ["cat", "dog"]
    assert len(info.train) + len(info.valid) == 8
    assert any("__MACOSX" in w for w in info.warnings)


def test_split_folders_differing_only_in_case_are_ambiguous(tmp_path):
    make_folder(tmp_path, n=4, size=8)
    images(tmp_path / "Train" / "red", 3, 5)
    with pytest.raises(AttnzooError, match="'Train/' and 'train/'|'train/' and 'Train/'"):
        find_dataset(tmp_path)


def test_a_class_named_train_in_a_flat_folder_is_a_class(tmp_path):
    images(tmp_path / "train", 4)
    images(tmp_path / "bus", 4, 1)
    info = find_dataset(tmp_path)
    assert info.classes == ["bus", "train"] and info.layout.startswith("folder")


def test_a_symlink_back_to_the_data_root_is_refused(tmp_path):
    images(tmp_path / "cat", 4)
    images(tmp_path / "dog", 4, 1)
    os.symlink(tmp_path, tmp_path / "loop")
    with pytest.raises(AttnzooError, match="loop"):
        find_dataset(tmp_path)


def test_two_links_to_one_class_folder_are_refused(tmp_path):
    images(tmp_path / "cat", 4)
    images(tmp_path / "dog", 4, 1)
    os.symlink(tmp_path / "cat", tmp_path / "kitten")
    with pytest.raises(AttnzooError, match="same folder"):
        find_dataset(tmp_path)


def test_swapping_two_classes_changes_the_fingerprint_not_the_counts(tmp_path):
    make_folder(tmp_path, n=4, size=8)
    before = find_dataset(tmp_path)
    counts, fingerprint = before.counts(), before.fingerprint()
    red, blue = tmp_path / "train" / "red", tmp_path / "train" / "blue"
    red.rename(tmp_path / "swap")
    blue.rename(red)
    (tmp_path / "swap").rename(blue)
    after = find_dataset(tmp_path)
    assert after.counts() == counts
    assert after.fingerprint() != fingerprint


def test_resume_refuses_data_whose_classes_swapped(tmp_path):
    import attnzoo
    from attnzoo.runs.folder import LAST
    from attnzoo.train.checkpoints import save_checkpoint

    data = make_folder(tmp_path / "data", n=4, size=16)
    run = attnzoo.fit("test_resnet", "none", str(data), pretrained=False, epochs=1, bs=4, img_size=32, plots=False,
                      out=str(tmp_path / "run"))
    config = json.loads((run / "attnzoo.json").read_text())
    (run / "attnzoo.json").write_text(json.dumps({**config, "status": "interrupted"}))
    save_checkpoint(run / LAST, None, attnzoo.load_run(run).model, {"epoch": 1})  # as if stopped after epoch 1
    red, blue = data / "train" / "red", data / "train" / "blue"
    red.rename(data / "swap")
    blue.rename(red)
    (data / "swap").rename(blue)
    with pytest.raises(AttnzooError, match="moved between classes"):
        attnzoo.fit(resume=run)
