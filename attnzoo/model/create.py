"""Attention inserted at named layers of any timm backbone.

``create_model`` builds the timm model (pretrained weights included), then puts the attention
module in, the backbone's state-dict keys unchanged: each site's module is replaced in its parent by a
``SiteModule`` that runs it and then what is inserted there (see ``SiteModule`` for why, and the cost):

- a **gate** runs right after its site and replaces the site's output;
- a **readout** reads its taps (the ``SiteModule`` of a tap hands its output over during the forward)
  and the backbone's pooled pre-logits feature, and produces the logits in place of the classifier.

Sites are timm module names (``layer3``, ``features.32``, ``stages.2``, ``blocks.4``, ``module[i]`` for an
element of a tuple output) or feature levels: an integer ``i`` is the i-th feature level (timm's
``feature_info``; negative counts from the end; ``-1`` is the final level). Each site knows its layout
(NCHW, NHWC, or tokens on a grid: see ``attnzoo.model.sites``); a gate sees NCHW whatever the layout, and its
output is put back in the site's layout; maps are ``[B, h, w]`` on the site's grid.

To the rest of the ecosystem the model is a timm model: timm's model API (``head_hidden_size``,
``forward_intermediates``, ``reset_classifier(0, '')``...), ``features_only=True`` (``AttentionFeatures``), every
keyword of timm's ``create_model`` (``in_chans``, ``drop_path_rate``, ``global_pool``...), ``torch.fx`` (the sites
branch on no traced value) and TorchScript (``torch.jit.script`` compiles the model's fx graph, ``fx_graph``).
"""


import inspect
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from timm.layers import is_notrace_module
from timm.models._features import FeatureGetterNet
from torch import nn

from ..errors import AttnzooError, SiteError, UnknownKeywordError
from .maps import MapRecorder, as_spatial, fx_tracing
from .registry import AttentionSpec, get_attention, parse_options, site_kwargs
from .sites import (
    BackboneInfo,
    Site,
    check_backbone,
    default_img_size,
    from_map,
    introspect,
    resolve_sites,
    to_map,
)
from .weights import build_backbone

log = logging.getLogger("attnzoo")

READOUT_KEY = "readout"
#: keywords of timm's ``create_model`` for a ``features_only`` model, which attnzoo builds (``AttentionFeatures``)
FEATURE_KEYWORDS = ("out_indices", "feature_cls")
#: pretrained_cfg entries timm drops from a ``features_only`` model's
HEAD_CFG = ("num_classes", "classifier", "global_pool")


def _named(where: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; any error is re-raised as a ``SiteError`` naming the module and its site(s)."""
    try:
        return fn(*args)
    except SiteError:
        raise
    except Exception as e:  # a module's own bug or misfit, named: a plugin's errors must say whose they are
        if type(e).__module__ == "torch.utils.checkpoint":  # checkpointing's own control flow (early stop)
            raise
        raise SiteError(f"{where} failed: {type(e).__name__}: {e}") from e


class _Taps:
    """Where tap sites leave their feature maps for the readout while one forward runs (``current``).

    A plain object shared by the model and its tap sites. Outside a forward ``current`` is None, so the
    recomputation of a checkpointed segment in the backward pass stores nothing, and a pickled or copied
    model never carries feature maps."""

    def __init__(self) -> None:
        self.current: dict[str, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"current": None}


class SiteModule(nn.Module):
    """A site's module followed by what attnzoo inserts there: a gate, or a tap that hands its output to
    the readout. It takes the site module's place in its parent, so the inserted module is part of the
    module graph that ``torch.compile``, ``torch.export``, ONNX tracing and timm's ``checkpoint_seq`` see.

    Why a wrapper, and not forward hooks (attnzoo <= 0.1) or an extra child of a ``Sequential`` stage:

    - hooks are invisible to timm's gradient checkpointing (``checkpoint_seq(..., flatten=True)`` calls a
      stage's children, never the stage), and dynamo does not guard on them by default, so a second compiled
      model of one backbone could run the first one's graph without its gates;
    - appending to a stage works only where the site is a ``Sequential`` and shifts its indices.

    The wrapper iterates as the site's children followed by the inserted step, so ``checkpoint_seq`` (which
    iterates what it runs) runs and checkpoints the gate as its own segment.

    ``torch.fx`` traces it (the checks of a gate's output run eagerly only), and names the gated map after the
    site: ``create_feature_extractor(model, ["backbone.layer3"])`` returns what the next layer sees.

    State-dict keys stay timm's: a state-dict hook renames ``<site>.inner.*`` to ``<site>.*`` and leaves
    the gate out (its tensors are saved once, under the model's ``gates.<site>``), and a load pre-hook does
    the reverse, so timm checkpoints, ``--weights`` files and existing run folders load strict, into the
    backbone or the whole model. What it costs: the gate is registered twice (here and in ``gates``):
    ``named_parameters()`` lists it once (as ``gates.*``, registered first), but ``print(model)`` shows it
    twice and ``model.apply(fn)`` visits it twice; ``named_modules()`` paths inside the site gain ``inner``
    (``layer3.inner.0.conv1``), while state-dict keys do not.
    """

    def __init__(self, inner: nn.Module, site: Site, where: str, gate: nn.Module | None = None,
                 taps: _Taps | None = None):
        super().__init__()
        self.inner = inner
        if gate is not None:
            self.gate = gate
        self.site, self.where, self.taps = site, where, taps
        self.register_state_dict_post_hook(_timm_keys)
        self.register_load_state_dict_pre_hook(_internal_keys)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.after(self.inner(*args, **kwargs))

    def after(self, out: Any) -> Any:
        """What runs after the site's module: the gate (on the map, back to the site's layout) or the tap."""
        x = to_map(self.site, out)
        if self.taps is not None:
            if self.taps.current is not None:
                self.taps.current[self.site.name] = x
            return out
        if not fx_tracing():
            y = _named(self.where, self.gate, x)
            _check_gate_output(self.where, x, y)
            return from_map(self.site, y, out)
        # A graph keeps no check (it would branch on traced values; the build checked the gate). The gate's forward
        # is traced as this module's code, so fx names its output after the site: torchvision's
        # create_feature_extractor(model, ["backbone.layer3"]) takes the gated map, as the next layer sees it. (Called
        # as a module, it would be named after its first path, gates.<site>: the site's last node would be ungated.)
        gate = self.gate if is_notrace_module(type(self.gate)) else self.gate.forward
        return from_map(self.site, _named(self.where, gate, x), out)

    def __iter__(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """As timm's ``checkpoint_seq`` runs a stage: its children one by one, then the inserted step."""
        yield from (self.inner if isinstance(self.inner, nn.Sequential) else (self.inner,))
        yield self.after

    def __getitem__(self, idx: int | slice) -> Any:  # ``layer3[-1]`` is the site's last block, as in timm
        return self.inner[idx]

    def __len__(self) -> int:
        return len(self.inner)

    def __bool__(self) -> bool:
        return True


def _check_gate_output(where: str, x: torch.Tensor, y: Any) -> None:
    """A gate hands the next layer what it was given: the input's shape, and its dtype (under autocast, any float
    but double: autocast picks each op's precision itself)."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise SiteError(f"{where} returned {got}, but a gate must return its input's shape {tuple(x.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type != "meta" else False
    if y.dtype != x.dtype and (not autocast or not y.is_floating_point() or y.dtype == torch.float64):
        raise SiteError(f"{where} returned {y.dtype}, but a gate must return its input's dtype {x.dtype} (the next "
                        f"layer's weights are {x.dtype})")


def _timm_keys(module: SiteModule, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict post-hook of a site: ``<site>.inner.X`` -> ``<site>.X``, the gate left out (see SiteModule)."""
    inner, gate = prefix + "inner.", prefix + "gate."
    for key in [k for k in state_dict if k.startswith(prefix)]:  # this site's keys, last in the dict
        value = state_dict.pop(key)
        if key.startswith(inner):
            state_dict[prefix + key[len(inner):]] = value
        elif not key.startswith(gate):
            state_dict[key] = value


def _internal_keys(module: SiteModule, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook of a site: timm's ``<site>.X`` -> ``<site>.inner.X``; the gate keeps its tensors here
    (they load under the model's ``gates.<site>``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith((prefix + "inner.", prefix + "gate.")):
            state_dict[prefix + "inner." + key[len(prefix):]] = state_dict.pop(key)
    if hasattr(module, "gate"):
        for key, value in module.gate.state_dict().items():
            state_dict.setdefault(prefix + "gate." + key, value)


def _key(site: str) -> str:
    return site.replace(".", "__")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def preprocessing_cfg(img_size: int, mean: Sequence[float], std: Sequence[float],
                      classes: Sequence[str] | None = None, in_chans: int = 3) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` describing attnzoo's preprocessing: squash resize (bilinear) to
    ``img_size``, no crop, then ``mean``/``std``; timm's ``resolve_data_config`` + ``create_transform``
    reproduce it."""
    cfg: dict[str, Any] = dict(input_size=(in_chans, img_size, img_size), interpolation="bilinear", crop_pct=1.0,
                               crop_mode="squash", mean=tuple(mean), std=tuple(std))
    if classes is not None:
        cfg.update(num_classes=len(classes), label_names=list(classes))
    return cfg


def _prefixed(prefix: str, names: str | Sequence[str]) -> str | tuple[str, ...]:
    return prefix + names if isinstance(names, str) else tuple(prefix + n for n in names)


def _model_cfg(backbone: nn.Module, info: BackboneInfo) -> dict[str, Any]:
    """The backbone's ``pretrained_cfg`` as this model's: its input size, the final map's size (``pool_size``) at
    that size, and module names (``first_conv``, ``classifier``) from the model, as timm reads them."""
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    cfg["input_size"] = (info.in_chans, info.img_size, info.img_size)
    shape = info.feature_shape
    if "pool_size" in cfg and len(shape) == 3:
        cfg["pool_size"] = tuple(shape[:2]) if str(getattr(backbone, "output_fmt", "NCHW")) == "NHWC" else shape[1:]
    for key in ("first_conv", "classifier"):
        if cfg.get(key):
            cfg[key] = _prefixed("backbone.", cfg[key])
    return cfg


class AttentionModel(nn.Module):
    """A timm backbone with attention at named sites. ``attention_maps()`` gives the last forward's maps.

    It is a timm model to its users: ``num_classes``, ``num_features``, ``head_hidden_size``, ``get_classifier``,
    ``reset_classifier`` (``0``: pooled features; ``0, ''``: unpooled), ``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``prune_intermediate_layers``, ``set_grad_checkpointing``, ``feature_info`` (the
    backbone's levels) and ``pretrained_cfg`` behave as timm's do; ``torch.fx`` traces it and ``torch.jit.script``
    compiles it (see ``__prepare_scriptable__``).

    A readout is the model's head: it reads the backbone's pooled feature. Without pooling (``global_pool=''``,
    as for ``reset_classifier(0, '')``) there is no head, and the readout is not run: the model gives the backbone's
    unpooled features, with the gates of a gate model applied.
    """

    def __init__(self, backbone: nn.Module, info: BackboneInfo, spec: AttentionSpec | None,
                 sites: list[str], modules: nn.Module | None, options: dict[str, Any] | None = None,
                 num_classes: int | None = None, pooled: bool = True):
        super().__init__()
        self.gates = nn.ModuleDict()  # registered before the backbone, so gate parameters are named gates.*
        self.backbone = backbone
        self.backbone_name = info.name
        self.attn = spec.name if spec else "none"
        self.kind = spec.kind if spec else None
        self.attn_options = dict(options or {})
        self.sites = list(sites)
        self.site_info = {s: info.site(s) for s in sites}
        self.global_channels = info.global_channels
        self.in_chans = info.in_chans
        self.readout = None
        self.pooled = pooled
        self._spec = spec
        self._taps = _Taps()
        self._recorder = MapRecorder()
        named = dict(backbone.named_modules())
        for i, site in enumerate(sites):
            where = f"attention '{self.attn}' at site '{site}'"
            module = self.site_info[site].module
            if spec is not None and spec.kind == "gate":
                self.gates[_key(site)] = modules[i]
                wrapped = SiteModule(named[module], self.site_info[site], where, gate=modules[i])
            else:
                wrapped = SiteModule(named[module], self.site_info[site], where, taps=self._taps)
            _replace(backbone, module, wrapped)
        if spec is not None and spec.kind == "readout":
            self.readout = modules
        self.num_classes = getattr(backbone, "num_classes", 0) if num_classes is None else num_classes
        self.pretrained_cfg = _model_cfg(backbone, info)
        self._traits = {**getattr(backbone, "_traits", {}), "img_size": (info.img_size, info.img_size),
                        "first_conv": self.pretrained_cfg.get("first_conv")}
        self._readout_width = self._pre_logits_width()
        self._name_classifier()
        self.capture_maps(True)

    # timm's model API
    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def head_hidden_size(self) -> int:
        """Width of ``forward_head(x, pre_logits=True)``: the backbone's, or a readout's attended features."""
        if not self._readout_runs():
            return getattr(self.backbone, "head_hidden_size", self.backbone.num_features)
        if self._readout_width is None:
            raise AttributeError(f"attention '{self.attn}' has no pre_logits(locals, g): no head_hidden_size")
        return self._readout_width

    @property
    def output_fmt(self) -> Any:
        """The layout of ``forward_features``' output, where the backbone declares one (timm's default: NCHW)."""
        return self.backbone.output_fmt

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: the backbone's feature levels (channels, reduction, module named from this
        model), which ``forward_intermediates`` and ``features_only`` follow. The sites are ``sites``/``site_info``."""
        levels = getattr(self.backbone.feature_info, "info", self.backbone.feature_info)
        return [{**f, "module": "backbone." + f["module"]} if f.get("module") else dict(f) for f in levels]

    def set_preprocessing(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                          classes: Sequence[str] | None = None) -> None:
        """Make ``pretrained_cfg`` describe the preprocessing this model was trained with (see ``load_run``)."""
        self.pretrained_cfg = {**self.pretrained_cfg,
                               **preprocessing_cfg(img_size, mean, std, classes, in_chans=self.in_chans)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.readout if self.readout is not None else self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: features), as timm's; a readout keeps its attention and
        gets a new classifier (``reset_classifier`` of the module, else rebuilt with its attention copied).
        ``global_pool=''`` (no pooling) turns a readout off (see the class docstring)."""
        if self.readout is None:
            self.backbone.reset_classifier(num_classes, *([global_pool] if global_pool is not None else []))
        else:
            if global_pool is not None:
                _check_pooled(self.attn, num_classes, global_pool)
                self.backbone.reset_classifier(0, global_pool)
                self.pooled = global_pool != ""
            placed = next(self.readout.parameters(), None)
            reset = getattr(self.readout, "reset_classifier", None)
            if reset is not None:
                reset(num_classes)
            else:
                self.readout = self._rebuilt_readout(num_classes)
            if placed is not None:  # a new classifier where the readout's tensors are (device, dtype), as timm's
                self.readout.to(device=placed.device, dtype=placed.dtype)
            self.readout.train(self.training)  # and in the model's mode
            self.capture_maps(True)
        self.num_classes = num_classes
        self.pretrained_cfg = {k: v for k, v in self.pretrained_cfg.items() if k != "label_names"}
        self._name_classifier()

    def _readout_runs(self) -> bool:
        return self.readout is not None and self.pooled

    def _name_classifier(self) -> None:
        """``pretrained_cfg['classifier']``: the readout's classifier layers, named from this model, as timm names
        a model's classifier (a gate model keeps the backbone's)."""
        if self.readout is None or "classifier" not in self.pretrained_cfg:
            return
        head = getattr(self.readout, "classifier", None)
        if not isinstance(head, nn.Module):
            names = ["readout"]
        else:
            names = [f"readout.classifier{'.' + n if n else ''}" for n, m in head.named_modules()
                     if "weight" in m._parameters]
        self.pretrained_cfg = {**self.pretrained_cfg, "classifier": names[0] if len(names) == 1 else tuple(names)}

    def _pre_logits_width(self) -> int | None:
        """Width of the readout's ``pre_logits`` (None without one), from a twin built on the meta device."""
        if self.readout is None or not hasattr(self.readout, "pre_logits"):
            return None
        infos = [self.site_info[s] for s in self.sites]
        try:
            with torch.device("meta"), torch.no_grad():
                twin = self._spec.cls([i.channels for i in infos], self.global_channels, self.num_classes,
                                      **{**self._spec.defaults, **self.attn_options})
                out = twin.pre_logits([torch.empty(1, i.channels, *i.size) for i in infos],
                                      torch.empty(1, self.global_channels))
        except Exception as e:  # a plugin's readout that cannot run on the meta device: no head_hidden_size
            log.debug("the pre_logits width of '%s' is unknown: %s", self.attn, e)
            return None
        return int(out.shape[1])

    def _rebuilt_readout(self, num_classes: int) -> nn.Module:
        """The readout built anew for ``num_classes``, with every tensor that keeps its shape copied over."""
        channels = [self.site_info[s].channels for s in self.sites]
        options = {**self._spec.defaults, **self.attn_options}
        new = self._spec.cls(channels, self.global_channels, num_classes, **options)
        old = self.readout.state_dict()
        own = new.state_dict()
        new.load_state_dict({k: old[k] if k in old and old[k].shape == v.shape else v for k, v in own.items()})
        return new  # reset_classifier places it where the old readout's tensors are

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features, with the gates applied; a readout's taps are kept for ``forward_head``."""
        self._recorder.clear()
        if self._readout_runs():
            self._taps.current = {}
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self._readout_runs():
            return self.backbone.forward_head(x, pre_logits=pre_logits)
        return self._read(self.backbone.forward_head(x, pre_logits=True), pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own forward (a readout's backbone has no classifier: it gives the pooled feature,
        after timm's head dropout), read by the readout where it runs.

        Calling the backbone, not its ``forward_features`` and ``forward_head``, is what timm's ``forward`` does,
        and lets ``torch.fx`` see the backbone as a module: fx wraps the ``register_notrace_function`` functions of
        a module's file when the module is called."""
        self._recorder.clear()
        if not self._readout_runs():
            return self.backbone(x)
        self._taps.current = {}
        return self._read(self.backbone(x), False)

    def _read(self, g: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        """The readout on the taps of this forward and the pooled feature ``g``."""
        tapped, self._taps.current = self._taps.current, None
        if tapped is None:
            raise AttnzooError("forward_head of a readout model reads the taps of forward_features: call it first")
        missing = [s for s in self.sites if s not in tapped]
        if missing:
            raise SiteError(f"attention '{self.attn}': taps {', '.join(missing)} did not run in forward_features")
        locals_ = [tapped[s] for s in self.sites]
        where = f"attention '{self.attn}' reading {', '.join(self.sites)}"
        if not pre_logits:
            return _named(where, self.readout, locals_, g)
        if not hasattr(self.readout, "pre_logits"):
            raise AttnzooError(f"attention '{self.attn}' has no pre_logits(locals, g): its features are not exposed")
        return _named(where, self.readout.pre_logits, locals_, g)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` (same arguments: ``indices``, ``output_fmt``, ``intermediates_only``...)
        with the attention applied: each intermediate is what the next layer sees, a gate's output where a gate is.
        The head is not run, so a readout reads none of them (and reports no maps)."""
        if not hasattr(self.backbone, "forward_intermediates"):
            raise AttnzooError(f"backbone '{self.backbone_name}' has no forward_intermediates in timm")
        self._recorder.clear()
        return self.backbone.forward_intermediates(x, *args, **kwargs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: the layers after the last of ``indices`` go, and the head with ``prune_head`` (a readout is
        the head). Returns the indices kept, as timm's."""
        kept = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head and self.readout is not None:
            MapRecorder.unwatch(self.readout)
            self.readout = None
            self.num_classes = 0
        return kept

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(model)`` compiles: the model's ``torch.fx`` graph (``fx_graph``), a plain sequence
        of ops in which the readout's taps are data flow. It computes the model's outputs and reports no maps."""
        return fx_graph(self)

    def attention_modules(self) -> list[nn.Module]:
        """The inserted modules (gates or the readout): new parameters, trained even when the body is frozen."""
        return list(self.gates.values()) + ([self.readout] if self.readout is not None else [])

    def named_attention_modules(self) -> list[tuple[str, nn.Module]]:
        """``(label, module)`` of every inserted module, the label naming the module and its site(s)."""
        if self.readout is not None:
            return [(f"attention '{self.attn}' reading {', '.join(self.sites)}", self.readout)]
        return [(f"attention '{self.attn}' at site '{site}'", self.gates[_key(site)]) for site in self.sites]

    def capture_maps(self, enabled: bool = True) -> None:
        """Turn map capture on or off. On, a forward keeps what each module reports; nothing is computed."""
        for key, m in self.gates.items():
            self._recorder.watch(key, m) if enabled else MapRecorder.unwatch(m)
        if self.readout is not None:
            self._recorder.watch(READOUT_KEY, self.readout) if enabled else MapRecorder.unwatch(self.readout)
        self._recorder.clear()

    def attention_maps(self) -> dict[str, torch.Tensor]:
        """``{site: Tensor[B, h, w]}`` of the last forward, for every inserted module (float32, detached)."""
        raw = self._recorder.evaluate()
        maps: dict[str, torch.Tensor] = {}
        if READOUT_KEY in raw:
            for site, m in zip(self.sites, raw[READOUT_KEY]):
                maps[site] = as_spatial(m)
        for site in self.sites:
            if _key(site) in raw:
                maps[site] = as_spatial(raw[_key(site)])
        return maps


def fx_graph(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` symbolically traced by ``torch.fx``, as timm's feature extraction traces it: timm's
    ``register_notrace_module`` modules and ``register_notrace_function`` functions are leaves, parameter shapes
    constants. Maps are not reported while tracing, so the graph has no side channel."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaves = tuple(get_notrace_modules())

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)
    graph = tracer.trace(model)
    for node in graph.nodes:  # annotations of a file with ``from __future__ import annotations`` are strings,
        if node.op in ("placeholder", "output"):  # which the generated code names and TorchScript cannot read
            node.type = None
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


class AttentionFeatures(FeatureGetterNet):
    """An attention model as timm's ``features_only`` model: a list of feature maps ``[B, C, h, w]`` (at
    ``out_indices`` of ``feature_info``), taken with ``forward_intermediates``, so with the gates applied.
    ``attention_maps()`` are the gates' maps of the last forward."""

    def attention_maps(self) -> dict[str, torch.Tensor]:
        return self.model.attention_maps()


def _check_pooled(attn: str, num_classes: int, global_pool: str | None) -> None:
    if global_pool == "" and num_classes:
        raise AttnzooError(f"attention '{attn}' is a readout: it classifies the pooled feature, which "
                           f"global_pool='' leaves out; use num_classes=0 for the unpooled features, or a pooling")


def _attention_options(spec: AttentionSpec | None, attn_kwargs: Mapping[str, Any] | None,
                       timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The attention's options: ``attn_kwargs``; before it (attnzoo 0.1), the keywords of ``create_model`` that are
    options of the attention, taken out of ``timm_kwargs`` with a DeprecationWarning."""
    if attn_kwargs is not None or spec is None:
        return dict(attn_kwargs or {})
    old = {k: timm_kwargs.pop(k) for k in list(timm_kwargs) if k in spec.options}
    if old:
        given = ", ".join(f"{k!r}: {v!r}" for k, v in old.items())
        warnings.warn(f"attention options as keywords of create_model are deprecated: pass attn_kwargs={{{given}}} "
                      f"(keywords go to timm)", DeprecationWarning, stacklevel=3)
    return old


def _timm_keywords(backbone: str) -> set[str]:
    """The keywords timm's ``create_model`` takes for ``backbone``: its own and its model class's."""
    import timm

    with torch.device("meta"):
        cls = type(timm.create_model(backbone))
    names = {*inspect.signature(timm.create_model).parameters, *inspect.signature(cls.__init__).parameters,
             "features_only", *FEATURE_KEYWORDS, "img_size", "in_chans", "drop_rate", "drop_path_rate", "global_pool"}
    return names - {"self", "args", "kwargs", "model_name"}


@contextmanager
def _keywords_of(backbone: str, spec: AttentionSpec | None, given: Mapping[str, Any]) -> Iterator[None]:
    """A keyword nothing takes is named in one line, with the closest names, instead of a TypeError from timm."""
    try:
        yield
    except TypeError as e:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if found is None or found[1] not in given:
            raise
        what = f"keyword of timm's '{backbone}'" + (f" or option of attention '{spec.name}'" if spec else "")
        valid = _timm_keywords(backbone) | set(spec.options if spec else ())
        raise UnknownKeywordError(what, found[1], valid) from None


def create_model(
    backbone: str,
    attn: str | None = None,
    at: str | int | Sequence[str | int] | None = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    attn_kwargs: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> AttentionModel | AttentionFeatures:
    """A timm ``backbone`` with attention ``attn`` at sites ``at`` (defaults: see ``layers``).

    ``attn=None`` or ``"none"`` gives the plain backbone with the same head: the fair baseline.
    ``attn_kwargs`` are the attention's options (``attnzoo list`` shows them).
    ``pretrained_file`` loads a local safetensors/pth state dict through timm (works offline).
    Every other keyword is timm's ``create_model``'s and reaches timm: ``in_chans`` (timm adapts a pretrained
    first conv), ``drop_rate``, ``drop_path_rate``, ``global_pool``, model-specific ones. Two are attnzoo's too:
    ``img_size`` is the size the sites are sized for (default: the backbone's pretrained input size), and reaches the
    timm constructor of backbones that cannot run at that size otherwise (ViTs with a fixed grid);
    ``features_only=True`` (with ``out_indices``) gives timm's feature extractor of the model (``AttentionFeatures``).
    """
    check_backbone(backbone)
    spec = None if attn in (None, "none") else get_attention(attn)
    img_size = timm_kwargs.pop("img_size", None)
    features = timm_kwargs.pop("features_only", False)
    feature_kwargs = {k: timm_kwargs.pop(k) for k in FEATURE_KEYWORDS if features and k in timm_kwargs}
    attn_kwargs = _attention_options(spec, attn_kwargs, timm_kwargs)
    if spec is None and attn_kwargs:
        raise AttnzooError(f"attention options given without an attention module: {', '.join(attn_kwargs)}")
    if spec is None and at is not None:
        raise AttnzooError("--at/at names sites for an attention module, but attn is 'none'")
    options = parse_options(attn, attn_kwargs) if spec else {}
    if spec is not None and spec.kind == "readout":
        _check_pooled(spec.name, num_classes, timm_kwargs.get("global_pool"))
    placement = {k: timm_kwargs[k] for k in ("device", "dtype") if timm_kwargs.get(k) is not None}
    with _keywords_of(backbone, spec, timm_kwargs):
        shape_kwargs = {k: v for k, v in timm_kwargs.items() if k not in ("device", "dtype")}
        info = introspect(backbone, img_size or default_img_size(backbone), shape_kwargs)
        sites = resolve_sites(info, at, spec.kind) if spec else []
        model = build_backbone(backbone, num_classes, pretrained, pretrained_file,
                               **{**timm_kwargs, **dict(info.timm_kwargs)})
    modules: nn.Module | None = None
    if spec is not None and spec.kind == "gate":
        built = []
        for site in sites:
            s = info.site(site)
            built.append(_construct(spec, site, (1, s.channels, *s.size), s.channels, **options))
        modules = nn.ModuleList(built)
    elif spec is not None:
        model.reset_classifier(0)  # the readout classifies; the backbone's classifier would be dead weight
        shapes = [(1, info.site(s).channels, *info.site(s).size) for s in sites]
        modules = _construct(spec, ", ".join(sites), shapes, [sh[1] for sh in shapes], info.global_channels,
                             num_classes, **options)
    result = AttentionModel(model, info, spec, sites, modules, options, num_classes,
                            pooled=timm_kwargs.get("global_pool") != "")
    if placement:  # timm's device= and dtype=: the attention modules where timm put the backbone
        result.to(**placement)
    if pretrained or pretrained_file:
        new = [k for k in result.state_dict() if not k.startswith("backbone.")]
        log.info("pretrained weights loaded into '%s'; %d new tensors (attention, randomly initialised)%s",
                 backbone, len(new), f": {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}" if new else "")
    _dry_run(result, info)
    if features:
        return _features(result, info, **feature_kwargs)
    return result


def _features(model: AttentionModel, info: BackboneInfo, out_indices: Any = None,
              feature_cls: str | None = None) -> AttentionFeatures:
    """``model`` as timm's ``features_only`` model, at timm's ``out_indices`` for the backbone by default."""
    if feature_cls not in (None, "getter"):
        raise AttnzooError(f"feature_cls={feature_cls!r}: attnzoo's features_only model takes the features from "
                           f"forward_intermediates (timm's feature_cls='getter')")
    if not hasattr(model.backbone, "forward_intermediates"):
        raise AttnzooError(f"backbone '{info.name}' has no forward_intermediates in timm, which features_only uses")
    if model.readout is not None:
        warnings.warn(f"features_only: attention '{model.attn}' is a readout, the head of the model, which "
                      f"features_only leaves out: the features are the backbone's", stacklevel=3)
    if out_indices is None:
        out_indices = _timm_out_indices(info)
    features = AttentionFeatures(model, out_indices=out_indices)
    features.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in HEAD_CFG}
    features.default_cfg = features.pretrained_cfg
    return features


def _timm_out_indices(info: BackboneInfo) -> tuple[int, ...]:
    """The feature levels timm's ``features_only`` model of the backbone returns (a model built on the meta
    device); all levels where timm builds none."""
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(info.name, features_only=True, **dict(info.timm_kwargs))
        return tuple(probe.feature_info.out_indices)
    except Exception as e:
        log.debug("timm builds no features_only model of '%s' (%s): every feature level is returned", info.name, e)
        return tuple(range(len(info.levels)))


def _construct(spec: AttentionSpec, where: str, shape: Any, *args: Any, **options: Any) -> nn.Module:
    """Build the module for its site(s); a gate that takes ``feat_size`` gets the site's map size ``(h, w)``."""
    options = {**options, **site_kwargs(spec, tuple(shape[-2:]))}
    try:
        module = spec.cls(*args, **{**spec.defaults, **options})
        check = getattr(module, "check_site", None)
        if check is not None:
            check(shape)
    except SiteError as e:
        raise SiteError(f"attention '{spec.name}' cannot work at site '{where}': {e}") from None
    except Exception as e:
        raise SiteError(f"attention '{spec.name}' cannot be built at site '{where}': {type(e).__name__}: {e}") from e
    return module


def _dry_run(model: AttentionModel, info: BackboneInfo) -> None:
    """A forward on the meta device, so a module that does not fit its site fails now, naming it."""
    if model.attn == "none":
        return
    from torch.func import functional_call

    named = [*model.named_parameters(), *model.named_buffers()]  # module paths, not the (timm) state-dict keys
    params = {k: torch.empty_like(v, device="meta") for k, v in named}
    x = torch.empty(2, info.in_chans, info.img_size, info.img_size, device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            functional_call(model, params, (x,), strict=False, tie_weights=False)  # gates appear twice
    except SiteError as e:
        if not isinstance(e.__cause__, NotImplementedError):  # (an op without a meta kernel)
            raise
        log.debug("meta dry run skipped: %s", e)
    except Exception as e:  # an op without a meta kernel says nothing about the sites
        log.debug("meta dry run skipped: %s", e)
    finally:
        model._taps.current = None
        model._recorder.clear()
        model.train(was_training)
