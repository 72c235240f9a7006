"""The conformance kit: the checks every attention module must pass, built-in or plugin.

    from attnzoo.testing import check_attention
    def test_my_module():
        check_attention("my-module")          # a registered name, or the class itself

Each check raises ``AssertionError`` naming the module, the options and what went wrong. Modules are
checked with their defaults and once for every choice of every ``Literal`` option; the module is also
copied and pickled after a forward (an attnzoo model is saved with ``torch.save`` and copied by fastai), traced by
``torch.compile`` (its outputs and maps must equal eager's), and traced by ``torch.fx`` then compiled by TorchScript
(what torchvision's feature extraction and ``torch.jit.script`` of a model do: outputs equal to eager's), with its
default options.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any

import torch
from torch import nn

from .maps import MapRecorder, as_spatial
from .registry import AttentionSpec, get_attention, options_of, site_kwargs

GATE_CHANNELS = 24
GATE_SIZES = ((7, 9), (1, 1), (16, 16))
LOCAL_CHANNELS = (16, 24)
LOCAL_SIZES = ((9, 7), (5, 4))
GLOBAL_CHANNELS = 40
NUM_CLASSES = 5


def _spec(name_or_class: str | type) -> AttentionSpec:
    if isinstance(name_or_class, str):
        return get_attention(name_or_class)
    specs = getattr(name_or_class, "__attnzoo_specs__", None)
    if specs:
        return next(iter(specs.values()))
    kind = getattr(name_or_class, "attnzoo_kind", None)
    if kind is None:
        raise AssertionError(f"{name_or_class!r} is not registered and has no attnzoo_kind")
    return AttentionSpec(name_or_class.__name__, name_or_class, kind, getattr(name_or_class, "attnzoo_summary", ""),
                         options_of(name_or_class, kind))


def _variants(spec: AttentionSpec) -> list[dict[str, Any]]:
    variants: list[dict[str, Any]] = [{}]
    for opt in spec.options.values():
        for choice in opt.choices or ():
            if choice != opt.default:
                variants.append({opt.name: choice})
    return variants


def _watch(module: nn.Module) -> MapRecorder:
    rec = MapRecorder()
    rec.watch("m", module)
    return rec


def _inputs(spec: AttentionSpec, batch: int, size: tuple[int, int] | None = None,
            channels_last: bool = False) -> tuple[Any, ...]:
    def fm(c: int, hw: tuple[int, int]) -> torch.Tensor:
        x = torch.randn(batch, c, *hw)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if spec.kind == "gate":
        return (fm(GATE_CHANNELS, size or GATE_SIZES[0]),)
    return ([fm(c, hw) for c, hw in zip(LOCAL_CHANNELS, LOCAL_SIZES)], torch.randn(batch, GLOBAL_CHANNELS))


def _build(spec: AttentionSpec, options: dict[str, Any], size: tuple[int, int]) -> nn.Module | None:
    args = (GATE_CHANNELS,) if spec.kind == "gate" else (list(LOCAL_CHANNELS), GLOBAL_CHANNELS, NUM_CLASSES)
    options = {**options, **site_kwargs(spec, size)}  # as create_model passes the site's map size
    module = spec.cls(*args, **{**spec.defaults, **options})
    assert isinstance(module, nn.Module), f"{spec.name} built a {type(module).__name__}, not an nn.Module"
    check = getattr(module, "check_site", None)
    if check is not None and spec.kind == "gate":
        try:
            check((1, GATE_CHANNELS, *size))
        except ValueError:  # the module refuses this map size, as create_model would report
            return None
    return module


def _maps(spec: AttentionSpec, rec: MapRecorder, inputs: tuple[Any, ...], where: str) -> list[torch.Tensor]:
    raw = rec.evaluate()
    assert "m" in raw, f"{where}: forward reported no attention map (call attnzoo.report_map in forward)"
    value = raw["m"]
    if spec.kind == "gate":
        maps, expected = [value], [inputs[0].shape[-2:]]
    else:
        assert isinstance(value, (list, tuple)), f"{where}: a readout must report a list of maps, one per tap"
        maps, expected = list(value), [x.shape[-2:] for x in inputs[0]]
        assert len(maps) == len(expected), f"{where}: {len(maps)} maps for {len(expected)} taps"
    out = []
    for m, hw in zip(maps, expected):
        m = as_spatial(m)
        want = (inputs[-1].shape[0], *hw)
        assert m.shape == want, f"{where}: map shape {tuple(m.shape)}, expected [B, {hw[0]}, {hw[1]}]"
        assert torch.isfinite(m).all(), f"{where}: map has NaN or inf"
        out.append(m)
    return out


def _check_output(spec: AttentionSpec, y: Any, inputs: tuple[Any, ...], where: str) -> None:
    assert isinstance(y, torch.Tensor), f"{where}: forward returned {type(y).__name__}, not a Tensor"
    want = inputs[0].shape if spec.kind == "gate" else (inputs[1].shape[0], NUM_CLASSES)
    assert tuple(y.shape) == tuple(want), f"{where}: output shape {tuple(y.shape)}, expected {tuple(want)}"
    assert torch.isfinite(y).all(), f"{where}: output has NaN or inf"


def _check_gradients(module: nn.Module, spec: AttentionSpec, where: str) -> None:
    """After a random perturbation (so zero-initialised gates such as SAGAN's gamma open), every parameter
    gets a gradient, and a gate passes one back to the features it gates. The inputs require gradients, so a
    module without parameters (SimAM) is checked too."""
    m = copy.deepcopy(module).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    inputs = _inputs(spec, batch=2)
    for x in [*inputs[0], inputs[1]] if spec.kind == "readout" else inputs:
        x.requires_grad_(True)
    y = m(*inputs)
    (y * torch.randn_like(y)).sum().backward()
    if spec.kind == "gate":
        g = inputs[0].grad
        assert g is not None and g.abs().sum() > 0, f"{where}: no gradient reaches the gated features"
        assert torch.isfinite(g).all(), f"{where}: gradient of the gated features has NaN or inf"
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{where}: parameter '{name}' gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{where}: gradient of '{name}' has NaN or inf"
        assert p.grad.abs().sum() > 0, f"{where}: gradient of '{name}' is zero"


def _check_round_trip(module: nn.Module, spec: AttentionSpec, options: dict[str, Any], where: str) -> None:
    module.eval()
    twin = _build(spec, options, GATE_SIZES[0])
    twin.load_state_dict(module.state_dict())
    twin.eval()
    inputs = _inputs(spec, batch=2)
    with torch.no_grad():
        same = torch.allclose(module(*inputs), twin(*inputs), atol=1e-5)
    assert same, f"{where}: state_dict round trip changes outputs"


def _check_channels_last(module: nn.Module, spec: AttentionSpec, where: str) -> None:
    module.eval()
    torch.manual_seed(1)
    plain = _inputs(spec, batch=2)
    torch.manual_seed(1)
    last = _inputs(spec, batch=2, channels_last=True)
    with torch.no_grad():
        a, b = module(*plain), module(*last)
    assert torch.allclose(a, b, atol=1e-5), f"{where}: channels_last input changes the output"


def _check_silent(spec: AttentionSpec, module: nn.Module, where: str) -> None:
    """With nobody watching, forward keeps no map."""
    MapRecorder.unwatch(module)
    module(*_inputs(spec, batch=1))
    assert not any(isinstance(v, torch.Tensor) for v in vars(module).values() if not isinstance(v, nn.Module)), (
        f"{where}: forward stores tensors on the module; report maps through attnzoo.report_map instead"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _check_copies_after_forward(spec: AttentionSpec, module: nn.Module, where: str) -> None:
    """After a watched forward, ``copy.deepcopy`` and pickling work and the copies compute the same outputs."""
    module.eval()
    _watch(module)
    inputs = _inputs(spec, batch=2)
    with torch.no_grad():
        want = module(*inputs)
    for how, copier in (("deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m)))):
        try:
            twin = copier(module)
        except Exception as e:
            raise AssertionError(f"{where}: {how} after a forward fails ({type(e).__name__}: {e}); keep no "
                                 f"closures or lambdas on the module (report maps through attnzoo.report_map)") from e
        with torch.no_grad():
            assert _same(twin(*inputs), want), f"{where}: a {how} copy computes other outputs"


def _check_compiles(spec: AttentionSpec, module: nn.Module, where: str) -> None:
    """``torch.compile`` (dynamo's trace, run eagerly) gives eager's outputs and maps."""
    module.eval()
    rec = _watch(module)
    inputs = _inputs(spec, batch=2)
    with torch.no_grad():
        want = module(*inputs)
        want_maps = _maps(spec, rec, inputs, where)
        try:
            got = torch.compile(module, backend="eager")(*inputs)
        except Exception as e:
            raise AssertionError(f"{where}: torch.compile fails: {type(e).__name__}: {str(e)[:300]}") from e
        got_maps = _maps(spec, rec, inputs, f"{where} compiled")
    assert _same(got, want), f"{where}: the compiled module computes other outputs than eager"
    assert _same(got_maps, want_maps), f"{where}: the compiled module reports other maps than eager"


class _Flat(nn.Module):
    """A readout with its taps as separate arguments: fx traces a model whose taps are separate tensors."""

    def __init__(self, readout: nn.Module):
        super().__init__()
        self.readout = readout

    def forward(self, l0: torch.Tensor, l1: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.readout([l0, l1], g)


def _check_traces(spec: AttentionSpec, module: nn.Module, where: str) -> None:
    """``torch.fx`` traces the module (timm's notrace modules and functions are leaves) and TorchScript compiles the
    traced graph; both compute eager's outputs."""
    from .create import fx_graph

    module.eval()
    inputs = _inputs(spec, batch=2)
    if spec.kind == "readout":
        module, inputs = _Flat(module), (*inputs[0], inputs[1])
    with torch.no_grad():
        want = module(*inputs)
        try:
            graph = fx_graph(module)
        except Exception as e:
            raise AssertionError(f"{where}: torch.fx cannot trace it ({type(e).__name__}: {str(e)[:200]}); branch on "
                                 f"no tensor value or shape, or register it with timm's register_notrace_module (it "
                                 f"is then scripted as it is)") from e
        assert _same(graph(*inputs), want), f"{where}: its torch.fx graph computes other outputs than eager"
        try:
            scripted = torch.jit.script(graph)
        except Exception as e:
            raise AssertionError(f"{where}: TorchScript cannot compile its fx graph ({type(e).__name__}: "
                                 f"{str(e).strip()[:300]})") from e
        assert _same(scripted(*inputs), want), f"{where}: its TorchScript computes other outputs than eager"


def check_attention(name_or_class: str | type, options: dict[str, Any] | None = None) -> list[str]:
    """Run the conformance checks; return the list of checks passed (raises AssertionError on the first failure)."""
    spec = _spec(name_or_class)
    assert spec.kind in ("gate", "readout"), f"{spec.name}: kind must be gate or readout, got {spec.kind!r}"
    assert spec.summary, f"{spec.name}: no summary"
    for opt in spec.options.values():
        assert opt.parse(opt.default) == opt.default, f"{spec.name}: default of '{opt.name}' does not fit its type"
    passed: list[str] = []
    variants = [options] if options is not None else _variants(spec)
    for opts in variants:
        where = f"{spec.name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"
        torch.manual_seed(0)
        sizes = GATE_SIZES if spec.kind == "gate" else (None,)
        module = None
        for size in sizes:
            for batch in (1, 3):
                built = _build(spec, opts, size or GATE_SIZES[0])
                if built is None:
                    break
                module = built
                rec = _watch(module)
                inputs = _inputs(spec, batch, size)
                y = module.train()(*inputs)
                _check_output(spec, y, inputs, f"{where} at {size}, batch {batch}")
                _maps(spec, rec, inputs, f"{where} at {size}, batch {batch}")
                module.eval()
                with torch.no_grad():
                    y = module(*inputs)
                _check_output(spec, y, inputs, f"{where} eval at {size}, batch {batch}")
        assert module is not None, f"{where}: refuses every test map size {sizes}"
        module = _build(spec, opts, GATE_SIZES[0])
        _check_gradients(module, spec, where)
        _check_round_trip(module, spec, opts, where)
        _check_channels_last(module, spec, where)
        _check_silent(spec, module, where)
        passed += [f"{where}: {label}" for label in ("gradients", "state_dict", "channels_last", "silent")]
        if opts == variants[0]:
            _check_copies_after_forward(spec, _build(spec, opts, GATE_SIZES[0]), where)
            _check_compiles(spec, _build(spec, opts, GATE_SIZES[0]), where)
            _check_traces(spec, _build(spec, opts, GATE_SIZES[0]), where)
            passed += [f"{where}: deepcopy and pickle after a forward", f"{where}: torch.compile",
                       f"{where}: torch.fx and TorchScript"]
    assert inspect.getdoc(spec.cls), f"{spec.name}: the class needs a docstring (paper, options)"
    return passed
