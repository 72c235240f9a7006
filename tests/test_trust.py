"""Which map to trust: decision shares with known answers, inverted maps flagged, maps ordered and labelled."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo.explain.metrics import ImageBoxes
from attnzoo.explain.trust import decision_shares, ordered, verdicts


def batches(n: int = 2, size: int = 32):
    torch.manual_seed(0)
    return [(torch.randn(4, 3, size, size), torch.randint(0, 3, (4,))) for _ in range(n)]


def test_a_tap_the_classifier_ignores_carries_none_of_the_decision():
    model = attnzoo.create_model("test_resnet", "lpa-pc", at=["layer1", "layer2"], num_classes=3, img_size=32)
    width = model.readout.taps[0].width
    with torch.no_grad():
        model.readout.classifier.weight[:, :width] = 0  # layer1's attended vector reaches no logit
    shares = decision_shares(model, batches())
    assert shares["layer1"]["drop"] == pytest.approx(0.0, abs=1e-7) and shares["layer1"]["share"] == 0.0
    assert shares["layer2"]["drop"] != pytest.approx(0.0, abs=1e-6)


def test_a_gate_that_passes_its_input_through_carries_none():
    model = attnzoo.create_model("test_resnet", "sagan", at="layer2", num_classes=3, img_size=32)  # gamma = 0
    assert decision_shares(model, batches())["layer2"] == {"drop": pytest.approx(0.0, abs=1e-7), "share": 0.0}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("gamma")).fill_(5.0)
    assert decision_shares(model, batches())["layer2"]["drop"] != pytest.approx(0.0, abs=1e-6)


def test_a_map_that_points_away_from_the_object_is_inverted_and_ordered_by_share():
    on = torch.zeros(4, 4, 4)
    on[:, 0, 0] = 1  # every peak in the top-left cell, where the boxes are
    off = torch.zeros(4, 4, 4)
    off[:, 3, 3] = 1  # every peak in the opposite corner
    boxes = [ImageBoxes(((0.0, 0.0, 8.0, 8.0),))] * 4  # a quarter of a 16 px image: chance 0.25
    shares = {"shallow": {"drop": 0.01, "share": 0.1}, "deep": {"drop": 0.09, "share": 0.9}}
    v = verdicts(shares, {"shallow": off, "deep": on}, boxes, 16)
    assert list(v) == ["deep", "shallow"]
    assert v["deep"]["pointing"] == 1.0 and v["deep"]["flags"] == []
    assert v["shallow"]["pointing"] == 0.0 and v["shallow"]["chance"] == 0.25 and "inverted" in v["shallow"]["flags"]
    shown = ordered({"shallow": off, "deep": on}, v)
    assert list(shown) == ["deep · decides 90%", "shallow · INVERTED · 10%"]


def test_fit_records_the_decision_share_of_every_map(tiny_run):
    config = json.loads((tiny_run / "attnzoo.json").read_text())
    maps = config["maps"]
    assert set(maps) == set(config["sites"])
    shares = [v["share"] for v in maps.values()]
    assert shares == sorted(shares, reverse=True)
    assert sum(shares) == pytest.approx(1.0) or sum(shares) == 0.0
