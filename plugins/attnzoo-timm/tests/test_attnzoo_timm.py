"""attnzoo-timm: every exposed timm layer passes attnzoo's conformance kit and works in a model."""

from __future__ import annotations

import pytest
import torch
from attnzoo_timm import GATES, LEFT_OUT
from timm.layers import get_attn

import attnzoo
from attnzoo.model.plugins import plugin_status
from attnzoo.testing import check_attention


@pytest.mark.parametrize("name", sorted(GATES))
def test_conformance(name: str):
    assert check_attention(name)


def test_discovery_finds_every_gate_through_one_entry_point():
    st = next(s for s in plugin_status() if s.dist == "attnzoo-timm")
    assert st.status == "ok", st.reason
    assert set(st.names) == set(GATES) == set(attnzoo.list_attention("timm-*"))


@pytest.mark.parametrize("name", sorted(LEFT_OUT))
def test_left_out_layers_do_not_work_as_gates(name: str):
    """Keeps the README's list honest: when timm fixes one of these, this fails and it can be added."""
    with pytest.raises((AssertionError, TypeError, ValueError, RuntimeError)):
        layer = get_attn(name)(24).train()
        layer(torch.randn(1, 24, 7, 9))


def test_cbam_at_layer3_trains_a_step_and_gives_its_spatial_gate():
    model = attnzoo.create_model("test_resnet", "timm-cbam", at="layer3", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(2, 3, 160, 160), torch.tensor([0, 2])
    before = model.gates["layer3"].layer.spatial.conv.conv.weight.clone()
    torch.nn.functional.cross_entropy(model(x), target).backward()
    opt.step()
    assert not torch.equal(before, model.gates["layer3"].layer.spatial.conv.conv.weight)
    m = model.attention_maps()["layer3"]
    assert m.shape == (2, 10, 10) and bool(((m > 0) & (m < 1)).all())


def test_cbam_map_is_the_layers_spatial_gate():
    gate = attnzoo.create_attention("timm-cbam", 16).eval()
    recorder = attnzoo.model.MapRecorder()
    recorder.watch("g", gate)
    x = torch.randn(2, 16, 7, 9)
    gate(x)
    spatial = gate.layer.spatial
    c = gate.layer.channel(x)
    want = spatial.gate(spatial.conv(torch.cat([c.mean(1, keepdim=True), c.amax(1, keepdim=True)], 1)))[:, 0]
    assert torch.allclose(recorder.evaluate()["g"], want)


def test_context_attention_has_mean_one():
    gate = attnzoo.create_attention("timm-gc", 16)
    recorder = attnzoo.model.MapRecorder()
    recorder.watch("g", gate)
    gate(torch.randn(2, 16, 5, 6))
    assert torch.allclose(recorder.evaluate()["g"].mean((1, 2)), torch.ones(2))


def test_effective_gate_of_a_channel_gate_is_its_energy_weighted_mean():
    gate = attnzoo.create_attention("timm-se", 16).eval()
    recorder = attnzoo.model.MapRecorder()
    recorder.watch("g", gate)
    x = torch.zeros(1, 16, 3, 3)
    x[0, 4] = 1.0  # only channel 4 has energy: the map is channel 4's gate at every position
    y = gate(x)
    assert torch.allclose(recorder.evaluate()["g"], y[0, 4].expand(1, 3, 3))


@pytest.mark.parametrize("name", ["timm-splat", "timm-bottleneck", "timm-lambda"])
def test_residual_layers_start_as_the_identity(name: str):
    x = torch.randn(2, 24, 6, 6)
    gate = GATES[name](24, **({"feat_size": (6, 6)} if name == "timm-bottleneck" else {}))  # as attnzoo builds it
    assert torch.equal(gate.eval()(x), x)


def test_bottleneck_is_built_for_its_sites_map_size():
    model = attnzoo.create_model("test_resnet", "timm-bottleneck", at="layer3", num_classes=3, img_size=64)
    assert model.gates["layer3"].feat_size == (4, 4)
    model(torch.randn(1, 3, 64, 64))
    assert model.attention_maps()["layer3"].shape == (1, 4, 4)
    with pytest.raises(attnzoo.SiteError, match="built for 4x4 maps, got 2x2"):
        model(torch.randn(1, 3, 32, 32))


def test_options_reach_the_timm_layer():
    assert set(attnzoo.get_attention("timm-cbam").options) == {"rd_ratio", "spatial_kernel_size"}
    gate = attnzoo.create_attention("timm-cbam", 32, spatial_kernel_size="3", rd_ratio="0.25")
    assert gate.layer.spatial.conv.conv.kernel_size == (3, 3)
    assert gate.layer.channel.fc1.out_channels == 8
    with pytest.raises(ValueError, match="refuses 30 channels"):
        GATES["timm-bottleneck"](30, feat_size=(4, 4))  # 30 channels, 4 heads
