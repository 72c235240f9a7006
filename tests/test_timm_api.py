"""An attention model answers timm's model API, keeps timm's state-dict keys, and carries its preprocessing."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

import attnzoo
from attnzoo.runs.folder import RunFolder
from attnzoo.runs.predict import load_run


def test_backbone_keys_are_timms_and_load_strict_both_ways():
    plain = timm.create_model("test_resnet", num_classes=4)
    model = attnzoo.create_model("test_resnet", "sagan", at=["layer2", "layer3"], num_classes=4)
    assert list(model.backbone.state_dict()) == list(plain.state_dict())
    model.backbone.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
    keys = set(model.state_dict())
    assert keys == {f"backbone.{k}" for k in plain.state_dict()} | {
        f"gates.{site}.{k}" for site in ("layer2", "layer3") for k in model.gates[site].state_dict()}
    model.load_state_dict(model.state_dict(), strict=True)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(p for _, p in model.named_parameters()))  # each parameter once, gates as gates.*
    assert "gates.layer3.gamma" in names


def test_gates_are_modules_in_the_backbone_graph():
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", at="layer3", num_classes=2)
    site = model.backbone.layer3
    assert isinstance(site, attnzoo.model.SiteModule) and site.gate is model.gates["layer3"]
    assert not site._forward_hooks and not model.backbone._forward_hooks
    assert model.backbone.layer3[0] is site.inner[0]  # indexing a stage still reaches its blocks


@pytest.mark.parametrize("attn", ["sagan", "lpa-pc"])
def test_timm_model_api(attn):
    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.num_classes == 3 and model.num_features == model.backbone.num_features
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
        assert model.forward_head(model.forward_features(x), pre_logits=True).dim() == 2
    assert [f["module"] for f in model.feature_info] == model.sites
    assert all(f["num_chs"] == model.site_info[f["module"]].channels for f in model.feature_info)
    assert model.get_classifier() is (model.readout if attn == "lpa-pc" else model.backbone.get_classifier())
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    assert list(model.attention_maps()) == model.sites
    model.reset_classifier(0)
    assert model(x).dim() == 2 and model.num_classes == 0


def test_reset_classifier_of_a_readout_keeps_its_attention():
    model = attnzoo.create_model("test_resnet", "lpa-pc", num_classes=3, img_size=32)
    taps = {k: v.clone() for k, v in model.readout.taps.state_dict().items()}
    model.reset_classifier(5)
    assert model.readout.classifier.out_features == 5
    for k, v in model.readout.taps.state_dict().items():
        assert torch.equal(v, taps[k])


def test_forward_head_of_a_readout_needs_forward_features_first():
    model = attnzoo.create_model("test_resnet", "lpa-dp", num_classes=3, img_size=32)
    with pytest.raises(attnzoo.AttnzooError, match="forward_features"):
        model.forward_head(torch.randn(1, model.num_features, 1, 1))


def test_img_size_reaches_a_vit_with_a_fixed_grid():
    model = attnzoo.create_model("vit_tiny_patch16_224", "softmask-sigmoid", num_classes=3, img_size=64)
    assert model.backbone.patch_embed.img_size == (64, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert model.attention_maps()[model.sites[0]].shape == (1, 4, 4)


def test_a_vit_that_runs_at_any_size_keeps_its_parameter_shapes():
    """Run folders trained before img_size reached timm still load: test_vit resizes its grid at run time."""
    plain = timm.create_model("test_vit", num_classes=3)
    model = attnzoo.create_model("test_vit", "sagan", num_classes=3, img_size=64)
    assert model.backbone.pos_embed.shape == plain.pos_embed.shape


def test_structural_arguments_by_keyword():
    gate = attnzoo.create_attention("sagan", channels=64)
    assert gate.value.in_channels == 64
    readout = attnzoo.create_attention("lpa-pc", local_channels=[8, 16], global_channels=32, num_classes=4)
    assert readout([torch.randn(1, 8, 3, 3), torch.randn(1, 16, 2, 2)], torch.randn(1, 32)).shape == (1, 4)


def test_timm_data_config_of_a_run_reproduces_its_predictions(tmp_path):
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", num_classes=3, img_size=40).eval()
    config = dict(backbone="test_resnet", attn="softmask-sigmoid", attn_options={}, sites=model.sites,
                  classes=["a", "b", "c"], img_size=40, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    RunFolder(tmp_path / "r").save(model, config)
    run = load_run(tmp_path / "r")
    gen = torch.Generator().manual_seed(0)
    images = []
    for i, size in enumerate([(90, 50), (40, 40), (33, 71)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(images[-1])
    data_config = resolve_data_config({}, model=run.model)
    assert data_config["input_size"] == (3, 40, 40) and data_config["interpolation"] == "bilinear"
    assert run.model.pretrained_cfg["label_names"] == ["a", "b", "c"]
    transform = create_transform(**data_config)
    with torch.no_grad():
        timm_probs = run.model(torch.stack([transform(Image.open(p).convert("RGB")) for p in images])).softmax(-1)
    probs, _ = run.predict(images)
    torch.testing.assert_close(timm_probs, probs, atol=1e-3, rtol=1e-3)
