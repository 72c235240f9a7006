"""The run folder round trip: what load_run gives back predicts exactly as the trained model did."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import AttnzooError
from attnzoo.run import Run, latest_run, load_run, save_run


def make_run(path, attn="lpa-dp", **options) -> Run:
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32, **options).eval()
    config = dict(backbone="test_resnet", attn=attn, attn_options=options, sites=model.sites,
                  classes=["a", "b", "c"], img_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    save_run(path, model, config, [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5}])
    return Run(model, config["classes"], 32, (0.5,) * 3, (0.25,) * 3, config, path)


def test_load_run_predicts_like_the_saved_model(tmp_path):
    saved = make_run(tmp_path / "r", agg="indep")
    image = tmp_path / "x.png"
    Image.new("RGB", (50, 30), (200, 30, 90)).save(image)
    loaded = load_run(tmp_path / "r")
    p1, m1 = saved.predict([image])
    p2, m2 = loaded.predict([image])
    torch.testing.assert_close(p1, p2)
    assert m1.keys() == m2.keys() == {"layer1", "layer2", "layer3"}
    assert loaded.model.readout.agg == "indep"


def test_run_folder_holds_json_and_safetensors_only(tmp_path):
    make_run(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["attnzoo.json", "history.csv", "model.safetensors"]
    config = json.loads((tmp_path / "r" / "attnzoo.json").read_text())
    assert config["metrics"]["final"] == {"train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5}
    assert set(config["versions"]) >= {"torch", "timm", "fastai", "attnzoo"}
    assert not list((tmp_path / "r").glob(".*tmp"))


def test_latest_run_is_the_newest(tmp_path):
    import os

    make_run(tmp_path / "old")
    make_run(tmp_path / "new")
    os.utime(tmp_path / "old" / "attnzoo.json", (1, 1))
    assert latest_run(tmp_path) == tmp_path / "new"


def test_missing_runs_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(AttnzooError, match="no run folder"):
        latest_run(tmp_path)
    make_run(tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").unlink()
    with pytest.raises(AttnzooError, match="no weights"):
        load_run(tmp_path / "r")


def test_a_crash_while_saving_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    import safetensors.torch

    make_run(tmp_path / "r")
    before = (tmp_path / "r" / "model.safetensors").read_bytes()

    def crash(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        make_run(tmp_path / "r")
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]
    load_run(tmp_path / "r")  # still loads
