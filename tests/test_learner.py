"""attention_learner: a plain fastai Learner whose attention trains while a pretrained body is frozen."""

from __future__ import annotations

import pytest
import torch
from fastai.learner import Learner

import attnzoo
from attnzoo.train.data import find_dataset, image_dataloaders
from attnzoo.train.learner import History, suggest_lr


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


def test_lr_find_leaves_no_models_folder_behind(dls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fastai's learn.path is '.', where lr_find saves its scratch copy in models/
    learn = attnzoo.attention_learner(dls, "test_resnet", attn="sagan", pretrained=False)
    path = learn.path
    suggest_lr(learn, num_it=6)
    assert list(tmp_path.iterdir()) == [] and learn.path == path
