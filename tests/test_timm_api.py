"""An attention model answers timm's model API, keeps timm's state-dict keys, and carries its preprocessing."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

import attnzoo
from attnzoo.model.create import fx_graph
from attnzoo.model.sites import to_map
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
    levels = model.backbone.feature_info
    assert [f["module"] for f in model.feature_info] == [f"backbone.{f['module']}" for f in levels]
    assert [f["num_chs"] for f in model.feature_info] == [f["num_chs"] for f in levels]
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


def test_timm_keywords_reach_timm():
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", num_classes=3, in_chans=1, drop_rate=0.2,
                                 drop_path_rate=0.1, global_pool="max", img_size=32)
    assert model.backbone.conv1[0].in_channels == 1 and model.in_chans == 1
    assert model.backbone.drop_rate == 0.2 and model.backbone.global_pool.pool_type == "max"
    assert model.backbone.layer4[-1].drop_path.drop_prob > 0
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)


@pytest.mark.parametrize("attn", ["softmask-sigmoid", "lpa-pc"])
def test_a_one_channel_model_with_drop_path_and_max_pooling_trains(attn):
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", attn, num_classes=2, in_chans=1, drop_path_rate=0.1,
                                 global_pool="max", img_size=32)
    x, y = torch.randn(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    x[y == 1, :, :16] += 2  # class 1: a bright top half
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.grad is not None for p in model.attention_modules()[0].parameters())


def test_attn_kwargs_are_the_attention_options_and_the_other_keywords_timms():
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", attn_kwargs={"hidden": 4}, drop_rate=0.3)
    assert isinstance(model.gates["layer3"].score, torch.nn.Sequential) and model.backbone.drop_rate == 0.3


def test_attention_options_as_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"attn_kwargs=\{'hidden': 4\}"):
        model = attnzoo.create_model("test_resnet", "softmask-sigmoid", hidden=4)
    assert isinstance(model.gates["layer3"].score, torch.nn.Sequential)


def test_a_keyword_nothing_takes_is_named_with_the_closest_names():
    with pytest.raises(attnzoo.AttnzooError, match=r"unknown keyword .* 'in_chan'; did you mean 'in_chans'"):
        attnzoo.create_model("test_resnet", "softmask-sigmoid", in_chan=1)


def test_head_hidden_size_is_the_width_of_pre_logits():
    x = torch.randn(2, 3, 32, 32)
    for attn in ["softmask-sigmoid", "lpa-pc"]:
        model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32).eval()
        with torch.no_grad():
            assert model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == model.head_hidden_size
    assert model.head_hidden_size == sum(t.width for t in model.readout.taps)  # the readout's attended features


@pytest.mark.parametrize("attn", ["softmask-sigmoid", "lpa-pc"])
def test_pretrained_cfg_names_modules_of_the_model(attn):
    model = attnzoo.create_model("test_resnet", attn, num_classes=3)
    keys = model.state_dict()
    classifier = model.pretrained_cfg["classifier"]
    assert model.pretrained_cfg["first_conv"] + ".weight" in keys
    assert all(c + ".weight" in keys for c in ([classifier] if isinstance(classifier, str) else classifier))


@pytest.mark.parametrize("attn", ["softmask-sigmoid", "lpa-pc"])
def test_reset_classifier_without_pooling_gives_the_unpooled_features(attn):
    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32).eval()
    model.reset_classifier(0, "")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))
    assert model(x).shape == (2, model.num_features, 1, 1)


def test_a_readout_without_pooling_cannot_classify():
    with pytest.raises(attnzoo.AttnzooError, match="global_pool=''"):
        attnzoo.create_model("test_resnet", "lpa-pc", num_classes=3, global_pool="")


def _next_layer_input(model, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("backbone, site, level, after", [
    ("test_resnet", "layer3", 3, "backbone.layer4"),
    ("test_vit", "blocks.4", 4, "backbone.blocks.5"),
])
def test_forward_intermediates_are_what_the_next_layer_sees_gated(backbone, site, level, after):
    torch.manual_seed(0)
    model = attnzoo.create_model(backbone, "softmask-sigmoid", at=site, num_classes=3).eval()
    x = torch.randn(2, 3, 160, 160)
    seen = to_map(model.site_info[site], _next_layer_input(model, after, x))
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        ungated = to_map(model.site_info[site], model.get_submodule(f"backbone.{site}").inner(
            _next_layer_input(model, f"backbone.{site}", x)))
    torch.testing.assert_close(intermediates[level], seen)
    torch.testing.assert_close(seen, ungated * model.attention_maps()[site][:, None])  # the gate is applied
    torch.testing.assert_close(final, model.forward_features(x))


def test_features_only_gives_timms_feature_maps_with_the_attention_inside():
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", at="layer2", features_only=True,
                                 out_indices=(1, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 64)
    inner = model.model.backbone.layer2.inner
    ungated = []
    handle = inner.register_forward_hook(lambda _m, _a, out: ungated.append(out))
    with torch.no_grad():
        features = model(x)
    handle.remove()
    assert model.feature_info.channels() == [f.shape[1] for f in features] == [32, 48, 192]
    torch.testing.assert_close(features[1], ungated[0] * model.attention_maps()["layer2"][:, None])


def test_features_only_takes_the_features_from_forward_intermediates():
    with pytest.raises(attnzoo.AttnzooError, match="feature_cls='hook'.*forward_intermediates"):
        attnzoo.create_model("test_resnet", "softmask-sigmoid", features_only=True, feature_cls="hook")


@pytest.mark.parametrize("attn", ["softmask-sigmoid", "lpa-pc", "sagan"])
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_fx_and_torchscript_give_eagers_logits(backbone, attn):
    torch.manual_seed(0)
    model = attnzoo.create_model(backbone, attn, num_classes=3, img_size=64).eval()
    with torch.no_grad():
        for p in model.attention_modules()[0].parameters():  # SAGAN's gamma starts at 0
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fx_graph(model)(x), want)
        torch.testing.assert_close(torch.jit.script(model)(x), want)
        torch.testing.assert_close(model(x), want)  # tracing and scripting leave the eager model whole
    assert list(model.attention_maps()) == model.sites


def test_torchvisions_feature_extractor_takes_gated_features_out():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "softmask-sigmoid", at="layer3", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    extractor = create_feature_extractor(model, {"backbone.layer3": "layer3"})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["layer3"], _next_layer_input(model, "backbone.layer4", x))
