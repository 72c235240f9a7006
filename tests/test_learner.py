"""attention_learner: a plain fastai Learner whose attention trains while a pretrained body is frozen."""

from __future__ import annotations

import pytest
import torch
from fastai.learner import Learner

import attnzoo
from attnzoo.data import find_dataset, image_dataloaders
from attnzoo.learner import History, suggest_lr


@pytest.fixture(scope="module")
def dls(tiny_folder):
    return image_dataloaders(find_dataset(tiny_folder), img_size=32, bs=8, num_workers=0)


@pytest.mark.parametrize("attn", ["sagan", "lpa-pc"])
def test_freeze_keeps_attention_and_head_trainable(dls, attn):
    learn = attnzoo.attention_learner(dls, "test_resnet", attn=attn, pretrained=False)
    assert isinstance(learn, Learner)
    learn.freeze()
    attention = {id(p) for m in learn.model.attention_modules() for p in m.parameters()}
    assert attention and all(p.requires_grad for m in learn.model.attention_modules() for p in m.parameters())
    frozen_convs = [p for n, p in learn.model.backbone.named_parameters() if "conv" in n and p.dim() == 4]
    assert frozen_convs and not any(p.requires_grad for p in frozen_convs)
    assert attention <= {id(p) for p in learn.opt.param_lists[-1]}


def test_training_changes_the_attention_parameters(dls):
    learn = attnzoo.attention_learner(dls, "test_resnet", attn="softmask-sigmoid", pretrained=False)
    before = [p.detach().clone() for p in learn.model.gates.parameters()]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    after = list(learn.model.gates.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_lr_find_leaves_no_epochs_in_the_history(dls):
    history = History()
    learn = attnzoo.attention_learner(dls, "test_resnet", attn="sagan", pretrained=False, cbs=[history])
    assert suggest_lr(learn, num_it=12) > 0
    assert history.rows == []


def test_channels_last_training_runs(dls):
    from fastai.callback.channelslast import ChannelsLast

    learn = attnzoo.attention_learner(dls, "test_resnet", attn="sagan", pretrained=False, channels_last=True)
    assert any(isinstance(cb, ChannelsLast) for cb in learn.cbs)
    assert not hasattr(learn, "mixed_precision")  # no mixed precision on CPU
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert learn.recorder.values and all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values)


@pytest.mark.slow
def test_a_compiled_model_trains_saves_and_shows_its_maps(tiny_folder, tmp_path):
    import json

    from attnzoo import load_run
    from attnzoo.learner import fit

    run = fit("test_resnet", "lpa-pc", str(tiny_folder), pretrained=False, bs=8, img_size=32, epochs=1, compile=True,
              out=str(tmp_path / "run"))
    assert json.loads((run / "attnzoo.json").read_text())["request"]["compile"] is True
    assert (run / "attention.png").is_file()
    _, maps = load_run(run).predict([next(tiny_folder.rglob("*.png"))])
    assert set(maps) == {"layer1", "layer2", "layer3"}


def test_denormals_are_flushed_on_the_cpu_while_fitting_only(dls):
    from fastai.callback.core import Callback

    tiny = torch.tensor([1e-39])  # a denormal float32

    class Probe(Callback):
        def after_batch(self):
            self.seen = float(tiny * 1.0)

    probe = Probe()
    learn = attnzoo.attention_learner(dls, "test_resnet", "lpa-pc", pretrained=False, cbs=[probe])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert probe.seen == 0.0  # flushed to zero during the fit
    assert float(tiny * 1.0) > 0  # and not after it
    torch.set_flush_denormal(True)  # a user who flushes already keeps flushing after a fit
    try:
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
        assert float(tiny * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(False)
