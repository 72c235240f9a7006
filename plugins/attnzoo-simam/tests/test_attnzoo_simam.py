"""attnzoo-simam: the conformance kit, the paper's formula on numbers worked by hand, and a model."""

from __future__ import annotations

import math

import pytest
import torch
from attnzoo_simam import SimAM

import attnzoo
from attnzoo.model.maps import MapRecorder
from attnzoo.model.plugins import plugin_status
from attnzoo.testing import check_attention


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_conformance():
    assert check_attention("simam")


def test_conformance_of_the_class_itself():
    assert check_attention(SimAM)


def test_discovered_through_its_entry_point():
    st = next(s for s in plugin_status() if s.dist == "attnzoo-simam")
    assert (st.status, st.names) == ("ok", ["simam"])
    spec = attnzoo.get_attention("simam")
    assert spec.cls is SimAM and spec.kind == "gate" and spec.source == "attnzoo-simam"
    assert spec.options["e_lambda"].default == 1e-4 and spec.options["e_lambda"].type is float


def test_the_formula_on_a_hand_made_map():
    # one channel, positions 0 1 / 2 3: mu = 1.5, squared deviations 2.25 0.25 0.25 2.25, n = 3, var = 5/3
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    lam = 0.1
    gates = [sigmoid(d / (4 * (5 / 3 + lam)) + 0.5) for d in (2.25, 0.25, 0.25, 2.25)]
    module = SimAM(1, e_lambda=lam)
    recorder = MapRecorder()
    recorder.watch("m", module)
    y = module(x)
    want = torch.tensor([v * g for v, g in zip((0.0, 1.0, 2.0, 3.0), gates)]).view(1, 1, 2, 2)
    assert torch.allclose(y, want, atol=1e-6)
    assert torch.allclose(recorder.evaluate()["m"], torch.tensor(gates).view(1, 2, 2), atol=1e-6)


def test_map_is_the_gate_averaged_over_channels():
    # channel 0 as above, channel 1 constant: it deviates nowhere, so its gate is sigmoid(0.5), never NaN
    x = torch.stack([torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.full((2, 2), 5.0)]).unsqueeze(0)
    module = SimAM(2)
    recorder = MapRecorder()
    recorder.watch("m", module)
    y = module(x)
    assert torch.allclose(y[0, 1], torch.full((2, 2), 5.0 * sigmoid(0.5)))
    first = [sigmoid(d / (4 * (5 / 3 + 1e-4)) + 0.5) for d in (2.25, 0.25, 0.25, 2.25)]
    want = torch.tensor([(g + sigmoid(0.5)) / 2 for g in first]).view(1, 2, 2)
    assert torch.allclose(recorder.evaluate()["m"], want, atol=1e-6)


def test_a_1x1_site_is_refused():
    with pytest.raises(attnzoo.SiteError, match="at least 2 positions"):
        attnzoo.create_model("test_resnet", "simam", at="layer4", num_classes=3, img_size=32)


def test_trains_in_a_model():
    model = attnzoo.create_model("test_resnet", "simam", at=["layer2", "layer3"], num_classes=3, img_size=64)
    assert sum(p.numel() for p in model.gates.parameters()) == 0
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    maps = model.attention_maps()
    assert maps["layer3"].shape == (2, 4, 4) and bool((maps["layer3"] > sigmoid(0.5) - 1e-6).all())
