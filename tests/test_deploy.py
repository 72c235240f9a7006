"""An attention model is a timm model to the ecosystem's tools: every built-in module at its default site of a
ResNet-like and a ViT-like test model, under torch.compile, timm's gradient checkpointing, torch.save/deepcopy,
torch.export with a dynamic batch, and ONNX (legacy and dynamo, run by onnxruntime at another batch size),
gives eager's logits and maps."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import attnzoo

MODULES = ["lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"]
BACKBONES = {"test_resnet": 32, "test_vit": 160}  # (test_vit at its own grid: no resampled position embedding)
TOL = dict(atol=2e-5, rtol=1e-4)


def opened(backbone: str, attn: str | None, seed: int = 0) -> attnzoo.model.AttentionModel:
    """A model whose attention does something: parameters perturbed, so SAGAN's gamma is not 0."""
    torch.manual_seed(seed)
    model = attnzoo.create_model(backbone, attn, num_classes=3, img_size=BACKBONES[backbone])
    with torch.no_grad():
        for module in model.attention_modules():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def inputs(backbone: str, batch: int, seed: int = 1) -> torch.Tensor:
    size = BACKBONES[backbone]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model(x), model.attention_maps()


def assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert list(got[1]) == list(want[1]) and got[1]
    for site in want[1]:
        torch.testing.assert_close(got[1][site], want[1][site], **TOL)


matrix = pytest.mark.parametrize("attn", MODULES)
backbones = pytest.mark.parametrize("backbone", list(BACKBONES))


@backbones
@matrix
def test_save_load_deepcopy_and_pickle_after_a_forward(backbone, attn):
    model = opened(backbone, attn)
    x = inputs(backbone, 2)
    want = outputs(model, x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.attention_maps() == {}  # a copy carries no maps of the last batch
        assert_same(outputs(twin, x), want)


@backbones
@matrix
def test_grad_checkpointing_keeps_the_attention(backbone, attn):
    model = opened(backbone, attn).train()
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x = inputs(backbone, 2).requires_grad_(True)
    got, want = model(x), plain(x)
    assert_same((got, model.attention_maps()), (want, plain.attention_maps()))
    got.square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(model.attention_modules(), plain.attention_modules()):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


@backbones
@pytest.mark.parametrize("attn", [m if m in ("lpa-pc", "softmask-sigmoid") else pytest.param(m, marks=pytest.mark.slow)
                                  for m in MODULES])  # a readout and a gate by default; all with `pytest -m slow`
def test_torch_export_with_a_dynamic_batch(backbone, attn):
    from attnzoo.runs.export import WithMaps

    model = opened(backbone, attn)
    wrapper = WithMaps(model).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(wrapper, (inputs(backbone, 2),), dynamic_shapes={"x": {0: batch}})
    x = inputs(backbone, 3, seed=2)
    got = program.module()(x)
    want = outputs(model, x)
    assert_same((got[0], dict(zip(model.sites, got[1:]))), want)


def onnx_outputs(path, x) -> list:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


@backbones
@matrix
def test_onnx_legacy_exporter_keeps_the_attention(backbone, attn, tmp_path):
    pytest.importorskip("onnx")
    from attnzoo.runs.export import WithMaps

    model = opened(backbone, attn)
    wrapper = WithMaps(model).eval()
    path = tmp_path / "m.onnx"
    names = wrapper.output_names()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (inputs(backbone, 2),), str(path), dynamo=False, input_names=["image"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image", *names]})
    x = inputs(backbone, 3, seed=2)
    got = onnx_outputs(path, x)
    assert_same((got[0], dict(zip(model.sites, got[1:]))), outputs(model, x))


# the dynamo exporter takes 5-8 s a model here: the matrix runs with `pytest -m slow` (CI runs it too); in the
# default run the export command's test exports a gate's model through it, checked with onnxruntime
@pytest.mark.parametrize("backbone", [b if b == "test_resnet" else pytest.param(b, marks=pytest.mark.slow)
                                      for b in BACKBONES])
@pytest.mark.parametrize("attn", [pytest.param(m, marks=pytest.mark.slow) for m in MODULES])
def test_onnx_dynamo_export_checked_by_onnxruntime(backbone, attn, tmp_path):
    pytest.importorskip("onnxscript")
    model = opened(backbone, attn)
    result = attnzoo.export(model, tmp_path / "m.onnx")
    assert result.max_diff < 1e-4 and result.outputs == ["logits", *(f"map:{s}" for s in model.sites)]
    x = inputs(backbone, 3, seed=2)
    got = onnx_outputs(result.path, x)
    assert_same((got[0], dict(zip(model.sites, got[1:]))), outputs(model, x))


def compiled_twins(backbone: str, attn: str, backend: str) -> None:
    """A second model of one backbone, compiled in the same process as a first one, runs its own graph."""
    first = opened(backbone, None, seed=3)
    second = opened(backbone, attn)
    x = inputs(backbone, 2)
    want = outputs(second, x)
    with torch.no_grad():
        torch.compile(first, backend=backend)(x)
        got = torch.compile(second, backend=backend)(x)
    assert_same((got, second.attention_maps()), want)


@pytest.mark.slow  # 5-7 s: the default run keeps under 3 minutes on a 2-core machine
def test_a_second_compiled_model_of_one_backbone_runs_its_own_gates():
    compiled_twins("test_resnet", "sagan", backend="aot_eager")


@pytest.mark.slow
@backbones
@matrix
def test_compile_matrix(backbone, attn):
    compiled_twins(backbone, attn, backend="aot_eager")


@pytest.mark.slow
def test_inductor_compile_gives_eagers_logits_and_maps():
    compiled_twins("test_resnet", "lpa-pc", backend="inductor")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from attnzoo.runs.folder import RunFolder

    model = opened("test_resnet", "sagan")
    config = dict(backbone="test_resnet", attn="sagan", attn_options={}, sites=model.sites, classes=["a", "b", "c"],
                  img_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    return RunFolder(tmp_path_factory.mktemp("runs") / "tiny-sagan").save(model, config)


def cli(capsys, *args: str) -> tuple[int, str]:
    from attnzoo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def test_export_command_writes_onnx_with_classes_and_preprocessing(run_folder, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    code, out = cli(capsys, "export", str(run_folder), "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and "max |difference| from PyTorch" in out and "map:layer3" in out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["classes"] == '["a", "b", "c"]' and meta["img_size"] == "32" and meta["mean"] == "[0.5, 0.5, 0.5]"
    code, out = cli(capsys, "export", str(run_folder), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "already exists" in out  # never written over


def test_export_pt2_without_maps_runs_at_another_batch(run_folder, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    result = attnzoo.export(run_folder, format="pt2", maps=False)
    assert result.path.name == "tiny-sagan.pt2" and result.outputs == ["logits"]
    err = capfd.readouterr().err  # none of torch's warnings about the archive's name (it is written by attnzoo)
    assert "Expect archive" not in err and "Unable to load" not in err
    again = attnzoo.export(run_folder, format="pt2", maps=False)
    assert again.path.name == "tiny-sagan-2.pt2"  # a default name moves on, never over a file
    extra = {"attnzoo.json": ""}
    program = torch.export.load(str(result.path), extra_files=extra)
    assert '"classes": "[\\"a\\", \\"b\\", \\"c\\"]"' in extra["attnzoo.json"]
    from attnzoo.runs.predict import load_run

    model = load_run(run_folder).model
    x = inputs("test_resnet", 5)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x)[0], model(x), **TOL)


def test_an_export_that_differs_from_pytorch_is_not_written(run_folder, tmp_path, monkeypatch):
    from attnzoo.runs import export as deploy

    monkeypatch.setattr(deploy, "_compare", lambda *a, **k: (_ for _ in ()).throw(
        attnzoo.AttnzooError("export check failed: output 'logits' differs")))
    with pytest.raises(attnzoo.AttnzooError, match="differs"):
        attnzoo.export(run_folder, tmp_path / "m.pt2", format="pt2")
    assert list(tmp_path.iterdir()) == []
