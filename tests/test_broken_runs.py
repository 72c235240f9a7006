"""A broken run never ends "done": non-finite validation numbers, batches larger than the data, modules that
return the wrong shape or NaN, and errors inside modules that must name the module and the site."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_folder
from torch import nn

import attnzoo
from attnzoo import register_attention
from attnzoo.errors import SiteError, TrainingFailed
from attnzoo.testing import check_attention


class ScaledGate(nn.Module):
    """A gate with one trainable scale, for the test gates below to misbehave around."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))


@register_attention("test-nan-in-eval", kind="gate", summary="test only: NaN output when evaluating")
class NanInEval(ScaledGate):
    """Finite while training, NaN in eval mode: the validation loss is NaN, the training loss is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale if self.training else x * float("nan")


@register_attention("test-upsample", kind="gate", summary="test only: returns a 2x larger map")
class Upsample(ScaledGate):
    """Breaks the gate contract: the output is twice the input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=2.0) * self.scale


@register_attention("test-more-channels", kind="gate", summary="test only: returns twice the channels")
class MoreChannels(ScaledGate):
    """Breaks the gate contract: the output has twice the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1) * self.scale


@register_attention("test-keyerror", kind="gate", summary="test only: a bug in forward")
class KeyErrorGate(nn.Module):
    """Raises KeyError in forward, as a buggy plugin might."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return {}["missing"]


@register_attention("test-bad-init", kind="gate", summary="test only: a bug in __init__")
class BadInit(nn.Module):
    """Raises AttributeError in __init__."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.nothing.here = 1


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """12 training and 6 validation images: fewer than the default batch of 32."""
    return make_folder(tmp_path_factory.mktemp("small"), n=4, size=16)


def test_a_nan_validation_loss_fails_the_run_and_is_never_best(tiny_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=r"valid_loss nan at epoch 1") as e:
        attnzoo.fit("test_resnet", "test-nan-in-eval", str(tiny_folder), pretrained=False, epochs=2, bs=8,
                    img_size=32, out=str(run))
    assert "attention 'test-nan-in-eval' at site" in str(e.value)  # the module that made it is named
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["status"] == "failed" and "valid_loss nan" in config["error"]
    assert not (run / "checkpoints" / "best.safetensors").exists()


def test_a_batch_larger_than_the_training_set_is_lowered_with_a_warning(small, tmp_path):
    run = attnzoo.fit("test_resnet", "none", str(small), pretrained=False, epochs=1, img_size=32, plots=False,
                      out=str(tmp_path / "run"))  # the default batch, 32
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["request"]["bs"] == 12
    assert any("--bs 32" in w and "12 training images" in w for w in config["warnings"])
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in config["metrics"]["per_epoch"])


@pytest.mark.parametrize("name", ["test-upsample", "test-more-channels"])
def test_a_gate_that_changes_the_shape_is_refused_when_built(name):
    with pytest.raises(SiteError, match=rf"attention '{name}' at site 'layer2' returned .* input's shape"):
        attnzoo.create_model("test_resnet", name, at="layer2", num_classes=3, img_size=32)


def test_the_kit_refuses_a_gate_that_changes_the_shape():
    with pytest.raises(AssertionError, match="output shape"):
        check_attention("test-upsample")


def test_errors_inside_a_module_name_it_and_its_site():
    with pytest.raises(SiteError, match=r"'test-bad-init' cannot be built at site 'layer2': AttributeError"):
        attnzoo.create_model("test_resnet", "test-bad-init", at="layer2", num_classes=3, img_size=32)
    with pytest.raises(SiteError, match=r"'test-keyerror' at site 'layer2' failed: KeyError"):
        attnzoo.create_model("test_resnet", "test-keyerror", at="layer2", num_classes=3, img_size=32)


def test_predict_refuses_to_print_nan_probabilities(tiny_run, tiny_folder):
    from attnzoo.errors import AttnzooError

    image = sorted((tiny_folder / "valid" / "red").glob("*.png"))[0]
    run = attnzoo.load_run(tiny_run)
    run.std = (0.0, 0.0, 0.0)  # a forged preprocessing: every input becomes inf
    with pytest.raises(AttnzooError, match=rf"NaN/inf for {image}"):
        run.predict([image])
    run = attnzoo.load_run(tiny_run)
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    with pytest.raises(AttnzooError, match="weights"):
        run.predict([image])


def test_the_best_epochs_weights_are_stored_once(tiny_folder, tmp_path):
    from attnzoo.runs.folder import BEST

    run = attnzoo.fit("test_resnet", "none", str(tiny_folder), pretrained=False, epochs=2, bs=8, img_size=32,
                      plots=False, out=str(tmp_path / "run"))
    best = json.loads((run / "attnzoo.json").read_text())["best"]
    if best["epoch"] == 2:  # the last epoch: model.safetensors holds its weights, no second copy
        assert best["weights"] == "model.safetensors" and not (run / BEST).exists()
    else:
        assert best["weights"] == BEST and (run / BEST).is_file()
