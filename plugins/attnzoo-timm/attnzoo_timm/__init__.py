"""timm's own attention layers (``timm.layers.create_attn``) as attnzoo gates named ``timm-<name>``.

Each gate builds the timm layer for its site's channels and reports an attention map ``[B, h, w]``:

- **spatial gate** (cbam, lcbam): the layer's own sigmoid spatial gate, in (0, 1), captured by a
  forward hook on the gate submodule.
- **context attention** (gc, gca): the softmax over positions that pools the global context, times
  ``h*w`` (1 = uniform), recomputed from the layer's ``conv_attn`` logits when read.
- **attended** (nl, bottleneck): how much attention each position receives, averaged over query
  positions (and heads), times ``h*w``; recomputed from the layer's own projections when read.
- **lambda keys** (lambda): the softmax over positions of the content keys, averaged over key
  channels, times ``h*w``; recomputed from the layer's projection when read.
- **effective gate** (se, ese, eca, ecam, ceca, coord, scoord, ela, strip): ``sum_c |y| / sum_c |x|``
  per position: the channel (or per-element) gate averaged over channels, weighted by each channel's
  energy at that position. It equals the gate itself where the gate is one number per position.
- **update** (splat): ``sum_c |y - x| / sum_c |x|``: the relative size of the residual update.

splat, bottleneck and lambda replace convolutions inside timm's residual blocks (ResNeSt, BoTNet,
LambdaNet); as gates they are residual, ``y = x + gamma * layer(x)`` with ``gamma = 0`` at the start,
so inserting one into a pretrained backbone changes nothing until it is trained. bottleneck has a
relative position table of its map's size: it gets the site's ``feat_size`` and refuses other sizes.

Every gate is traced by ``torch.fx``, and so scripts with its model (``torch.jit.script`` compiles the fx graph).
That is why the context attention is recomputed when read rather than caught by a hook on ``conv_attn``: a
``torch.nn`` layer stays a module of the graph, with its hooks, which TorchScript would have to compile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from attnzoo import SiteError, register_attention, report_map

__version__ = "0.1.0"
ATTNZOO_API = ">=1,<2"

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def effective_gate(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.float().abs().sum(1) / x.float().abs().sum(1).clamp_min(1e-6)


def update(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return effective_gate(layer, x, y - x)


def _per_position(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B, ..., h*w]`` attention weights over positions -> their mean ``[B, h, w]``, times h*w (1 = uniform)."""
    b, _, h, w = x.shape
    return weights.reshape(b, -1, h * w).float().mean(1).view(b, h, w) * (h * w)


def nonlocal_attended(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t = layer.t(x).flatten(2).transpose(1, 2)  # queries [B, hw, c]
    p = layer.p(x).flatten(2)  # keys [B, c, hw]
    return _per_position(torch.softmax(t @ p * layer.scale, dim=2), x)


def bottleneck_attended(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    q, k, _ = torch.split(layer.qkv(x), [layer.dim_out_qk, layer.dim_out_qk, layer.dim_out_v], dim=1)
    q = q.reshape(b * layer.num_heads, layer.dim_head_qk, -1).transpose(-1, -2)
    k = k.reshape(b * layer.num_heads, layer.dim_head_qk, -1)
    return _per_position(((q @ k) * layer.scale + layer.pos_embed(q)).softmax(-1), x)


def lambda_keys(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k = torch.split(layer.qkv(x), [layer.num_heads * layer.dim_qk, layer.dim_qk, layer.dim_v], dim=1)[1]
    return _per_position(torch.softmax(k.flatten(2), -1), x)


def _spatial_gate(out: torch.Tensor) -> torch.Tensor:
    return out[:, 0]


def context_attention(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_position(torch.softmax(layer.conv_attn(x).flatten(1), 1), x)


@dataclass(frozen=True)
class Layer:
    """One timm attention layer and how attnzoo uses it."""

    name: str  # timm's get_attn name
    summary: str
    paper: str
    map: str  # what the attention map is (see the module docstring)
    options: dict[str, Any] = field(default_factory=dict)  # user options, passed to timm; types from the defaults
    read: MapFn | None = None  # map from (layer, x, y), evaluated only when somebody looks
    hook: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None  # (submodule, its output -> map)
    residual: bool = False  # y = x + gamma * layer(x), gamma = 0 at the start
    fixed_size: bool = False  # built for one map size: takes the site's feat_size
    min_positions: int = 1  # smaller maps are refused (attention over one position, or BatchNorm over it)


ECA_OPTIONS = {"gamma": 2.0, "beta": 1.0}  # kernel size k = odd(|log2(C) + beta| / gamma), at least 3
LAYERS = [
    Layer("se", "Squeeze-and-Excitation (timm): channel gate from an MLP on the globally pooled features",
          "https://arxiv.org/abs/1709.01507", "effective gate", {"rd_ratio": 1 / 16, "add_maxpool": False},
          read=effective_gate),
    Layer("ese", "Effective SE (timm): channel gate from one 1x1 conv on the pooled features, hard sigmoid",
          "https://arxiv.org/abs/1911.06667", "effective gate", {"add_maxpool": False}, read=effective_gate),
    Layer("eca", "ECA (timm): channel gate from a 1-D conv across the pooled channels, kernel adapted to C",
          "https://arxiv.org/abs/1910.03151", "effective gate", ECA_OPTIONS, read=effective_gate),
    Layer("ecam", "ECA with an MLP (timm's variant): per-channel MLP then the 1-D conv across channels",
          "https://arxiv.org/abs/1910.03151", "effective gate", {**ECA_OPTIONS, "rd_ratio": 1 / 8},
          read=effective_gate),
    Layer("ceca", "Circular ECA (timm): ECA whose 1-D conv wraps around the channel ends",
          "https://arxiv.org/abs/1910.03151", "effective gate", ECA_OPTIONS, read=effective_gate),
    Layer("gc", "Global Context (timm): softmax-pooled context, channel gate", "https://arxiv.org/abs/1904.11492",
          "context attention", {"rd_ratio": 1 / 8}, read=context_attention),
    Layer("gca", "Global Context, additive (timm): softmax-pooled context transformed and added everywhere",
          "https://arxiv.org/abs/1904.11492", "context attention", {"rd_ratio": 1 / 8}, read=context_attention),
    Layer("cbam", "CBAM (timm): channel gate (avg+max pooled MLP), then spatial gate (conv on channel avg+max)",
          "https://arxiv.org/abs/1807.06521", "spatial gate", {"rd_ratio": 1 / 16, "spatial_kernel_size": 7},
          hook=("spatial.gate", _spatial_gate), min_positions=2),
    Layer("lcbam", "Light CBAM (timm): CBAM with avg and max pooling averaged before one MLP / conv",
          "https://arxiv.org/abs/1807.06521", "spatial gate", {"rd_ratio": 1 / 16, "spatial_kernel_size": 7},
          hook=("spatial.gate", _spatial_gate), min_positions=2),
    Layer("coord", "Coordinate Attention (timm): row and column channel gates from strip pooling",
          "https://arxiv.org/abs/2103.02907", "effective gate", {"rd_ratio": 1 / 16, "has_skip": False},
          read=effective_gate),
    Layer("scoord", "Simple Coordinate Attention (timm): linear row and column scores, summed, one sigmoid",
          "https://arxiv.org/abs/2103.02907", "effective gate", {"rd_ratio": 0.25, "has_skip": False},
          read=effective_gate),
    Layer("ela", "Efficient Local Attention (timm): 1-D depthwise convs on strip-pooled rows and columns",
          "https://arxiv.org/abs/2403.01123", "effective gate", {"kernel_size": 7, "has_skip": False},
          read=effective_gate),
    Layer("strip", "Strip attention (timm): sigmoid of the row mean plus the column mean, depthwise refined",
          "", "effective gate", {"kernel_size": 3, "use_conv": True, "has_skip": False}, read=effective_gate),
    Layer("nl", "Non-local block (timm): softmax self-attention over all positions, residual",
          "https://arxiv.org/abs/1711.07971", "attended", {"rd_ratio": 1 / 8, "use_scale": True},
          read=nonlocal_attended, min_positions=2),
    Layer("splat", "Split attention (timm, ResNeSt): radix softmax over grouped 3x3 conv branches, residual",
          "https://arxiv.org/abs/2004.08955", "update", {"radix": 2, "rd_ratio": 0.25}, read=update, residual=True),
    Layer("bottleneck", "Bottleneck self-attention (timm, BoTNet): multi-head, relative positions, residual",
          "https://arxiv.org/abs/2101.11605", "attended", {"num_heads": 4}, read=bottleneck_attended,
          residual=True, fixed_size=True, min_positions=2),
    Layer("lambda", "Lambda layer (timm): content and local positional lambdas, residual",
          "https://arxiv.org/abs/2102.08602", "lambda keys", {"num_heads": 4, "dim_head": 16, "r": 9},
          read=lambda_keys, residual=True, min_positions=2),
]

#: timm get_attn names that are not exposed, and why (checked against timm 1.0.31)
LEFT_OUT = {
    "ge": "timm's GatherExcite cannot be built (it passes its device/dtype dict positionally to ConvMlp: TypeError)",
    "sk": "SelectiveKernel's attention puts BatchNorm on pooled [B, C, 1, 1] vectors: it cannot train with batch 1",
    "halo": "HaloAttn needs h and w divisible by its block size (8): it fails on odd maps such as 7x9",
    "bat": "BatNonLocalAttn needs h and w divisible by its block size (7): it fails on 7x9 and 16x16 maps",
}


class _ReportOutput:
    """Forward hook on a timm submodule: reports its output as the gate's map. A plain object, not a
    closure, so a deep copy of the model reports to the copy."""

    def __init__(self, owner: nn.Module, to_map: Callable[[torch.Tensor], torch.Tensor]):
        self.owner, self.to_map = owner, to_map

    def __call__(self, _module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        report_map(self.owner, self.to_map, out)


class TimmGate(nn.Module):
    """A timm attention layer as an attnzoo gate; one subclass per ``Layer`` (see ``LAYERS``)."""

    layer_spec: Layer

    def __init__(self, channels: int, feat_size: tuple[int, int] | None = None, **options: Any):
        super().__init__()
        from timm.layers import create_attn

        spec = self.layer_spec
        unknown = set(options) - set(spec.options)
        if unknown:
            raise TypeError(f"timm-{spec.name} takes no option {', '.join(sorted(unknown))}")
        kwargs = {**spec.options, **options}
        self.feat_size = None
        if spec.fixed_size:
            if feat_size is None:
                raise ValueError(f"timm-{spec.name} is built for one map size: pass feat_size=(h, w)")
            self.feat_size = kwargs["feat_size"] = (int(feat_size[0]), int(feat_size[1]))
        try:
            self.layer = create_attn(spec.name, channels, **kwargs)
        except AssertionError as e:  # timm checks its arguments with bare asserts
            raise ValueError(f"timm's '{spec.name}' layer refuses {channels} channels with {kwargs}: {e}") from None
        self.gamma = nn.Parameter(torch.zeros(1)) if spec.residual else None
        if spec.hook is not None:
            path, to_map = spec.hook
            self.layer.get_submodule(path).register_forward_hook(_ReportOutput(self, to_map))

    def check_site(self, shape: tuple[int, ...]) -> None:
        """Called by attnzoo with the site's output shape [B, C, h, w]."""
        h, w = shape[-2:]
        if h * w < self.layer_spec.min_positions:
            raise SiteError(f"timm-{self.layer_spec.name} does not work on a {h}x{w} map (use an earlier site)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feat_size is not None and not isinstance(x, torch.fx.Proxy) and tuple(x.shape[-2:]) != self.feat_size:
            h, w = self.feat_size
            raise ValueError(f"timm-{self.layer_spec.name} was built for {h}x{w} maps, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; build the model for the image size you feed it")
        y = self.layer(x)
        if self.gamma is not None:
            y = x + self.gamma * y
        read = self.layer_spec.read
        if read is not None:
            report_map(self, read, self.layer, x, y)
        return y


def _docstring(spec: Layer) -> str:
    options = "\n".join(f"    {k}: passed to timm's layer (default {v!r})." for k, v in spec.options.items())
    return (f"{spec.summary}.\n\n{spec.paper or 'No paper; see timm.layers.'}\n\nAttention map: {spec.map} "
            f"(see attnzoo_timm's docstring).\n\nArgs:\n    channels: channels of the gated feature map.\n{options}")


def _gate_class(spec: Layer) -> type[TimmGate]:
    """A ``TimmGate`` subclass whose signature lists this layer's options, as attnzoo reads them."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("channels", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    if spec.fixed_size:
        params.append(inspect.Parameter("feat_size", kw, default=None))
    params += [inspect.Parameter(k, kw, default=v, annotation=type(v)) for k, v in spec.options.items()]
    name = "Timm" + spec.name.capitalize()
    return type(name, (TimmGate,), {
        "layer_spec": spec, "__doc__": _docstring(spec), "__module__": __name__, "__qualname__": name,
        "__signature__": inspect.Signature(params),
    })


#: ``timm-<name>`` -> its gate class; also module attributes (TimmCbam, ...) so models pickle
GATES = {f"timm-{spec.name}": _gate_class(spec) for spec in LAYERS}
globals().update({cls.__name__: cls for cls in GATES.values()})


def register() -> None:
    """The entry point (group ``attnzoo.attention``): registers every ``timm-<name>`` gate."""
    for name, cls in GATES.items():
        register_attention(name, kind="gate", summary=cls.layer_spec.summary, paper=cls.layer_spec.paper)(cls)
