"""timm's own model tests (its ``tests/test_models.py``) on attnzoo models of timm's ``test_*`` models.

An attention model is a timm model to the rest of the ecosystem, so the tests timm runs on its own models run on
attnzoo models: a gate (``softmask-sigmoid``) and a readout (``lpa-pc``) at the default sites, next to the plain
timm model, through the same test functions. The test functions are timm's, unchanged: only their
``create_model`` is swapped for ``attnzoo.create_model(..., attn=...)``.

timm's test file is not in its wheel. It is read from ``$ATTNZOO_TIMM_TESTS``, else from
``tests/timm_suite/timm_test_models.py`` (the file of the timm release attnzoo is tested with; the name keeps pytest
from collecting it as a test file of its own); without it these tests are skipped, saying where to put it.

The default run takes the tests attnzoo models once failed (default cfgs and head API, fx, TorchScript) on a
convnet and a token model; ``pytest -m slow`` runs every test on all 18 models, plain too, for the pass counts.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import timm

import attnzoo

TIMM_TESTS = Path(os.environ.get("ATTNZOO_TIMM_TESTS", Path(__file__).parent / "timm_suite" / "timm_test_models.py"))

#: the model tests of timm's file that need no network, by a short name
KINDS = {
    "forward": "test_model_forward",
    "backward": "test_model_backward",
    "default_cfgs": "test_model_default_cfgs",  # test_model_default_cfgs_non_std for timm's NON_STD models
    "fx": "test_model_forward_fx",
    "torchscript": "test_model_forward_torchscript",
    "fx_backward": "test_model_backward_fx",
    "fx_torchscript": "test_model_forward_fx_torchscript",
    "forward_intermediates": "test_model_forward_intermediates",
    "features": "test_model_forward_features",
    "intermediates_features": "test_model_forward_intermediates_features",
}
FLAVOURS = {"plain": None, "gate": "softmask-sigmoid", "readout": "lpa-pc"}
MODELS = timm.list_models("test_*")
QUICK_MODELS = ("test_resnet", "test_vit")  # a convnet and a token model
QUICK_KINDS = ("default_cfgs", "fx", "torchscript")
#: timm's file marks its tests for timm's CI (base, cfg, fxforward...), marks this project does not declare
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


@cache
def timm_tests() -> ModuleType:
    if not TIMM_TESTS.is_file():
        pytest.skip(f"timm's tests/test_models.py (timm {timm.__version__}) is not at {TIMM_TESTS}: put it there or "
                    f"set ATTNZOO_TIMM_TESTS")
    spec = importlib.util.spec_from_file_location("timm_test_models", TIMM_TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_function(module: ModuleType, kind: str, model_name: str) -> tuple[Any, str, int] | None:
    """timm's test function for ``kind``, the model name it runs it with (``name.tag`` for the tests that list
    pretrained tags) and its batch size; None when timm does not run it on the model."""
    names = [KINDS[kind]] + ([f"{KINDS[kind]}_non_std"] if kind == "default_cfgs" else [])
    for name in names:
        fn = getattr(module, name, None)
        params = {m.args[0]: list(m.args[1]) for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"}
        for listed in params.get("model_name", []):
            if listed.partition(".")[0] == model_name:
                return fn, listed, params["batch_size"][0]
    return None


#: where timm's test asserts what attnzoo models differ in by design (checked to fail: a strict xfail)
BY_DESIGN = {
    ("test_model_default_cfgs_non_std", "readout"): (
        "timm's test takes a num_classes=0 model's output to be num_features wide (forward_features' width); a "
        "readout's is its attended features, head_hidden_size wide, as timm's API defines pre-logits"),
}


def run_timm_test(kind: str, model_name: str, flavour: str, request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    module = timm_tests()
    found = _test_function(module, kind, model_name)
    if found is None:
        pytest.skip(f"timm does not run {KINDS[kind]} on {model_name}")
    fn, name, batch_size = found
    if (fn.__name__, flavour) in BY_DESIGN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=BY_DESIGN[fn.__name__, flavour]))
    attn = FLAVOURS[flavour]
    if attn is not None:
        def create_model(backbone: str, pretrained: bool = False, **kwargs: Any) -> Any:
            return attnzoo.create_model(backbone, attn=attn, pretrained=pretrained, **kwargs)

        monkeypatch.setattr(module, "create_model", create_model)
    fixtures = {"cfg_device": module.cfg_device.__wrapped__()} if "cfg_device" in inspect.signature(fn).parameters \
        else {}  # timm's own fixture, called as pytest would
    fn(name, batch_size, **fixtures)


@pytest.mark.parametrize("flavour", ["gate", "readout"])
@pytest.mark.parametrize("kind", QUICK_KINDS)
@pytest.mark.parametrize("model_name", QUICK_MODELS)
def test_timm_model_tests_pass_on_attention_models(model_name, kind, flavour, request, monkeypatch):
    run_timm_test(kind, model_name, flavour, request, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model_name", MODELS)
def test_timm_model_tests_on_every_test_model(model_name, kind, flavour, request, monkeypatch):
    run_timm_test(kind, model_name, flavour, request, monkeypatch)
