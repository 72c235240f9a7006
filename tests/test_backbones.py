"""Sites across timm's families read in their own layout: NCHW, NHWC, tokens on a grid (with prefix tokens,
hierarchical, unrolled), elements of tuple outputs; maps are [B, h, w] on the grid, and what cannot be read is
refused with the reason. The full sweep over every family is benchmarks/backbones.py."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import register_model

import attnzoo
from attnzoo.errors import SiteError
from attnzoo.model.sites import introspect, to_map

IMG = 64


@register_model
def attnzoo_tiny_swin(pretrained: bool = False, **kwargs):
    """Swin (NHWC stages) small enough for a test."""
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), window_size=4, **kwargs)


@register_model
def attnzoo_tiny_hiera(pretrained: bool = False, **kwargs):
    """Hiera (hierarchical tokens, kept in an unrolled order) small enough for a test."""
    return timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), **kwargs)


# one per layout: a CNN, a ViT (class token), Swin (NHWC), MambaOut (declared NHWC), Hiera (unrolled tokens),
# CoAtNet (conv + transformer hybrid), PiT (the map is an element of a tuple)
FAMILIES = {"test_resnet": "NCHW", "test_vit": "NLC+1", "attnzoo_tiny_swin": "NHWC", "test_mambaout": "NHWC",
            "attnzoo_tiny_hiera": "NLC unrolled", "test_coatnet": "NCHW", "pit_ti_224": "NCHW"}


def _backbone(name: str) -> torch.nn.Module:
    info = introspect(name, IMG)
    return timm.create_model(name, num_classes=3, **dict(info.timm_kwargs)).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_levels_read_as_timm_forward_intermediates_gives_them(name):
    info = introspect(name, IMG)
    model = _backbone(name)
    levels = [info.site(n) for n in info.levels]
    assert {s.layout for s in levels} == {FAMILIES[name]}
    seen = {}

    def keep(site):
        def hook(_m, _i, out):
            seen[site.name] = to_map(site, out)

        return hook

    modules = dict(model.named_modules())
    for s in levels:
        modules[s.module].register_forward_hook(keep(s))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        model.forward_features(x)
        timm_maps = model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
    assert len(timm_maps) == len(levels)
    for s, expected in zip(levels, timm_maps):
        assert seen[s.name].shape == (2, s.channels, *s.size)
        torch.testing.assert_close(seen[s.name], expected)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn", ["softmask-sigmoid", "lpa-pc"])
def test_gates_and_readouts_give_maps_on_the_grid_in_every_layout(name, attn):
    torch.manual_seed(0)
    model = attnzoo.create_model(name, attn, num_classes=3, img_size=IMG)
    logits = model(torch.randn(2, 3, IMG, IMG))
    assert logits.shape == (2, 3)
    maps = model.attention_maps()
    assert list(maps) == model.sites
    for site, m in maps.items():
        assert m.shape == (2, *model.site_info[site].size) and torch.isfinite(m).all()
    logits.square().sum().backward()
    for module in model.attention_modules():
        assert any(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_a_gate_sees_nchw_and_its_output_goes_back_in_the_site_layout(name):
    torch.manual_seed(0)
    base = attnzoo.create_model(name, None, num_classes=3, img_size=IMG).eval()
    gated = attnzoo.create_model(name, "sagan", num_classes=3, img_size=IMG).eval()  # gamma = 0: the identity
    gated.backbone.load_state_dict(base.backbone.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), base(x))


def test_swin_stages_are_channels_last_maps():
    site = next(s for s in attnzoo.layers("attnzoo_tiny_swin", IMG) if s.name == "layers.2")
    assert (site.fmt, site.channels, site.size, site.stride) == ("NHWC", 64, (4, 4), 16)


def test_channels_last_layers_inside_a_convnext_block_are_read_as_nhwc():
    sites = {s.name: s for s in attnzoo.layers("test_convnext", IMG)}
    assert sites["stages.1.blocks.0.mlp.fc1"].fmt == "NHWC" and sites["stages.1.blocks.0.mlp.fc1"].size == (8, 8)
    assert sites["stages.1.blocks.0.conv_dw"].fmt == "NCHW"


def test_a_site_attnzoo_cannot_read_is_refused_with_the_reason():
    with pytest.raises(SiteError, match="'layers.1.blocks.0.attn'.*windows or heads"):
        attnzoo.create_model("attnzoo_tiny_swin", "softmask-sigmoid", at="layers.1.blocks.0.attn", img_size=IMG)


def test_the_element_of_a_tuple_output_is_a_site_named_by_its_index():
    sites = [s for s in attnzoo.layers("pit_ti_224", IMG) if s.level is not None]
    assert [s.name for s in sites] == ["transformers.0[0]", "transformers.1[0]", "transformers.2[0]"]
    with pytest.raises(SiteError, match="'transformers.1'.*tuple.*its sites: transformers.1\\[0\\]"):
        attnzoo.create_model("pit_ti_224", "softmask-sigmoid", at="transformers.1", img_size=IMG)


def test_hiera_tokens_are_unrolled_back_onto_their_grid():
    site = attnzoo.layers("attnzoo_tiny_hiera", IMG)[0]
    levels = [s for s in attnzoo.layers("attnzoo_tiny_hiera", IMG) if s.level is not None]
    assert site.order is None and all(s.order is not None for s in levels)
    assert sorted(levels[0].order) == list(range(16 * 16)) and levels[0].order != tuple(range(16 * 16))


def test_attnzoo_layers_shows_each_sites_layout(capsys):
    from attnzoo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["layers", "attnzoo_tiny_swin", "--img-size", str(IMG)])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]  # a pipe: tab-separated rows
    assert exit_info.value.code == 0
    by_site = {r[0]: r for r in rows if len(r) > 4}
    assert by_site["site"][4] == "layout"
    assert by_site["layers.2"][3:5] == ["4x4", "NHWC"] and by_site["patch_embed.proj"][4] == "NCHW"


def test_a_gate_is_refused_at_a_side_output_that_does_not_reach_the_logits():
    sites = {s.name: s for s in attnzoo.layers("efficientvim_m1")}  # stage maps kept for forward_intermediates
    assert not sites["stages.1[0]"].reaches_logits and not sites["stages.1[0]"].default_gate
    with pytest.raises(SiteError, match="'stages.1\\[0\\]'.*does not reach the logits"):
        attnzoo.create_model("efficientvim_m1", "softmask-sigmoid", at="stages.1[0]")
