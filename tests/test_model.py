"""Insertion at named sites across timm families, maps, pretrained weights, and the errors users meet."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import AttnzooError, PretrainedUnavailable, SiteError, UnknownNameError

FAMILIES = ["test_resnet", "vgg11_bn", "test_convnext", "test_efficientnet", "mobilenetv3_small_050",
            "regnetx_002", "test_vit"]
IMG = 64


@pytest.mark.parametrize("attn", ["lpa-pc", "sagan", "softmask-sigmoid"])
@pytest.mark.parametrize("backbone", [f if f in ("test_resnet", "test_convnext", "test_vit") else
                                      pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
# a convnet, a channels-last convnet and a ViT by default; every family (vgg11_bn's 130M parameters: 7 s a module)
# with `pytest -m slow`
def test_attention_trains_at_the_default_sites_of_every_family(backbone, attn):
    torch.manual_seed(0)
    model = attnzoo.create_model(backbone, attn, num_classes=3, img_size=IMG)
    x = torch.randn(2, 3, IMG, IMG)
    logits = model(x)
    assert logits.shape == (2, 3)
    maps = model.attention_maps()
    sites = {s.name: s for s in attnzoo.layers(backbone, img_size=IMG)}
    assert list(maps) == model.sites and model.sites
    for site, m in maps.items():
        assert m.shape == (2, *sites[site].size) and torch.isfinite(m).all()
    logits.square().sum().backward()
    for module in model.attention_modules():
        assert any(p.grad is not None for p in module.parameters())


def test_default_taps_of_vgg16_bn_are_the_papers_layers():
    sites = attnzoo.layers("vgg16_bn")
    assert [s.name for s in sites if s.default_tap] == ["features.22", "features.32", "features.42"]
    by_name = {s.name: s for s in sites}
    assert by_name["features.32"].channels == 512 and by_name["features.32"].size == (28, 28)
    assert by_name["features.32"].stride == 8


def test_layers_reports_tokens_of_a_vit_as_a_grid():
    site = next(s for s in attnzoo.layers("test_vit", img_size=64) if s.name == "blocks.1")
    assert site.fmt == "NLC" and site.size == (4, 4) and site.prefix_tokens >= 1


def test_baseline_is_the_plain_timm_model():
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=4).eval()
    model = attnzoo.create_model("test_resnet", None, num_classes=4).eval()
    model.backbone.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(x), plain(x))
    assert model.attention_maps() == {}


def test_gates_leave_the_backbone_keys_untouched():
    plain = timm.create_model("test_resnet", num_classes=4)
    model = attnzoo.create_model("test_resnet", "sagan", at=["layer2", "layer3"], num_classes=4)
    assert set(model.backbone.state_dict()) == set(plain.state_dict())
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("gates.")} == {"layer2", "layer3"}


def test_sagan_at_init_does_not_change_the_backbone():
    base = attnzoo.create_model("test_convnext", None, num_classes=4).eval()
    gated = attnzoo.create_model("test_convnext", "sagan", at="stages.1", num_classes=4).eval()
    gated.backbone.load_state_dict(base.backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(gated(x), base(x))


def test_feature_levels_are_shorthands_for_sites():
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", at=[-2, "1"], num_classes=2)
    assert model.sites == ["layer3", "layer1"]


def test_capture_off_keeps_no_maps_and_deepcopy_keeps_working():
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", num_classes=2).eval()
    twin = copy.deepcopy(model)
    twin(torch.randn(1, 3, 32, 32))
    assert list(twin.attention_maps()) == ["layer3"]
    assert model.attention_maps() == {}  # the copy reported to its own recorder
    model.capture_maps(False)
    model(torch.randn(1, 3, 32, 32))
    assert model.attention_maps() == {}


def test_unknown_backbone_suggests_names():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        attnzoo.create_model("resnet181", "sagan")


def test_unknown_site_lists_the_valid_ones():
    with pytest.raises(AttnzooError, match="unknown layer of 'test_resnet' 'layer5'.*Feature levels: act1, layer1"):
        attnzoo.create_model("test_resnet", "sagan", at="layer5")


def test_a_module_that_cannot_work_at_a_site_fails_at_create_time():
    with pytest.raises(SiteError, match="'softmask-softmax' cannot work at site 'layer4'.*1x1"):
        attnzoo.create_model("test_resnet", "softmask-softmax", at="layer4", img_size=32)


def test_options_are_checked_at_create_time():
    with pytest.raises(AttnzooError, match="one of concat, indep"):
        attnzoo.create_model("test_resnet", "lpa-pc", attn_kwargs={"agg": "mean"})
    model = attnzoo.create_model("test_resnet", "lpa-pc", num_classes=3,
                                 attn_kwargs={"agg": "indep", "norm": "sigmoid"})
    assert model.readout.agg == "indep" and model.readout.norm == "sigmoid"


def test_pretrained_without_network_says_how_to_proceed(monkeypatch):
    import socket

    def refuse(*_args, **_kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # offline for sure, whatever the hub settings
    with pytest.raises(PretrainedUnavailable, match="--no-pretrained.*--weights FILE"):
        attnzoo.create_model("resnet18", "sagan", pretrained=True)


def _top(model, photo) -> torch.Tensor:
    img = Image.open(photo).convert("RGB").resize((224, 224))
    x = (torch.tensor(np.asarray(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return model.eval()(x[None]).softmax(-1)[0]


def test_a_local_checkpoint_loads_offline_and_predicts(lite0_weights, photo):
    model = attnzoo.create_model("tf_efficientnet_lite0", None, pretrained_file=str(lite0_weights))
    probs = _top(model, photo)
    assert probs.argmax().item() == 652  # ImageNet "military uniform": Grace Hopper in uniform
    assert probs.max() > 0.3


def test_pretrained_weights_are_kept_when_attention_is_inserted(lite0_weights, photo, caplog):
    base = _top(attnzoo.create_model("tf_efficientnet_lite0", None, pretrained_file=str(lite0_weights)), photo)
    with caplog.at_level(logging.INFO, logger="attnzoo"):
        gated = attnzoo.create_model("tf_efficientnet_lite0", "sagan", pretrained_file=str(lite0_weights))
    torch.testing.assert_close(_top(gated, photo), base)  # gamma = 0: the identity at start
    site = gated.sites[0].replace(".", "__")
    assert "new tensors" in caplog.text and f"gates.{site}.gamma" in caplog.text


def test_timm_adapts_a_pretrained_first_conv_to_one_channel(lite0_weights):
    from safetensors.torch import load_file

    model = attnzoo.create_model("tf_efficientnet_lite0", "softmask-sigmoid", num_classes=3, in_chans=1,
                                 pretrained_file=str(lite0_weights), img_size=64)
    rgb = load_file(str(lite0_weights))["conv_stem.weight"]
    torch.testing.assert_close(model.backbone.conv_stem.weight, rgb.sum(1, keepdim=True))  # timm sums RGB
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_a_weights_file_that_does_not_fit_is_a_clear_error(lite0_weights):
    with pytest.raises(AttnzooError, match="does not fit 'test_resnet'"):
        attnzoo.create_model("test_resnet", None, pretrained_file=str(lite0_weights))
