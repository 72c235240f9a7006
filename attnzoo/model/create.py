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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AttnzooError, SiteError
from .maps import MapRecorder, as_spatial
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
        y = _named(self.where, self.gate, x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise SiteError(f"{self.where} returned {got}, but a gate must return its input's shape {tuple(x.shape)}")
        return from_map(self.site, y, out)

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
                      classes: Sequence[str] | None = None) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` describing attnzoo's preprocessing: squash resize (bilinear) to
    ``img_size``, no crop, then ``mean``/``std``; timm's ``resolve_data_config`` + ``create_transform``
    reproduce it."""
    cfg: dict[str, Any] = dict(input_size=(3, img_size, img_size), interpolation="bilinear", crop_pct=1.0,
                               crop_mode="squash", mean=tuple(mean), std=tuple(std))
    if classes is not None:
        cfg.update(num_classes=len(classes), label_names=list(classes))
    return cfg


class AttentionModel(nn.Module):
    """A timm backbone with attention at named sites. ``attention_maps()`` gives the last forward's maps.

    It is a timm model to its users: ``num_classes``, ``num_features``, ``get_classifier``,
    ``reset_classifier``, ``forward_features``, ``forward_head``, ``set_grad_checkpointing``,
    ``feature_info`` (of the sites) and ``pretrained_cfg`` behave as timm's do.
    """

    def __init__(self, backbone: nn.Module, info: BackboneInfo, spec: AttentionSpec | None,
                 sites: list[str], modules: nn.Module | None, options: dict[str, Any] | None = None,
                 num_classes: int | None = None):
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
        self.readout = None
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
        size = (3, info.img_size, info.img_size)
        self.pretrained_cfg = {**getattr(backbone, "pretrained_cfg", {}), "input_size": size}
        self.capture_maps(True)

    # timm's model API
    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info`` of the sites: module name (in the backbone), channels, reduction."""
        return [dict(module=s, num_chs=self.site_info[s].channels, reduction=self.site_info[s].stride)
                for s in self.sites]

    def set_preprocessing(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                          classes: Sequence[str] | None = None) -> None:
        """Make ``pretrained_cfg`` describe the preprocessing this model was trained with (see ``load_run``)."""
        self.pretrained_cfg = {**self.pretrained_cfg, **preprocessing_cfg(img_size, mean, std, classes)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.readout if self.readout is not None else self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: features), as timm's; a readout keeps its attention and
        gets a new classifier (``reset_classifier`` of the module, else rebuilt with its attention copied)."""
        if self.readout is None:
            self.backbone.reset_classifier(num_classes, *([global_pool] if global_pool is not None else []))
        else:
            if global_pool is not None:
                self.backbone.reset_classifier(0, global_pool)
            reset = getattr(self.readout, "reset_classifier", None)
            if reset is not None:
                reset(num_classes)
            else:
                self.readout = self._rebuilt_readout(num_classes)
            self.capture_maps(True)
        self.num_classes = num_classes
        self.pretrained_cfg = {k: v for k, v in self.pretrained_cfg.items() if k != "label_names"}

    def _rebuilt_readout(self, num_classes: int) -> nn.Module:
        """The readout built anew for ``num_classes``, with every tensor that keeps its shape copied over."""
        channels = [self.site_info[s].channels for s in self.sites]
        options = {**self._spec.defaults, **self.attn_options}
        new = self._spec.cls(channels, self.global_channels, num_classes, **options)
        old = self.readout.state_dict()
        own = new.state_dict()
        new.load_state_dict({k: old[k] if k in old and old[k].shape == v.shape else v for k, v in own.items()})
        params = list(self.readout.parameters())
        return new.to(params[0].device) if params else new

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features, with the gates applied; a readout's taps are kept for ``forward_head``."""
        self._recorder.clear()
        if self.readout is not None:
            self._taps.current = {}
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.readout is None:
            return self.backbone.forward_head(x, pre_logits=pre_logits)
        g = self.backbone.forward_head(x, pre_logits=True)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_modules(self) -> list[nn.Module]:
        """The inserted modules (gates or the readout): new parameters, trained even when the body is frozen."""
        return list(self.gates.values()) + ([self.readout] if self.readout is not None else [])

    def named_attention_modules(self) -> list[tuple[str, nn.Module]]:
        """``(label, module)`` of every inserted module, the label naming the module and its site(s)."""
        if self.readout is not None:
            return [(f"attention '{self.attn}' reading {', '.join(self.sites)}", self.readout)]
        return [(f"attention '{self.attn}' at site '{site}'", self.gates[_key(site)]) for site in self.sites]

    def capture_maps(self, enabled: bool = True) -> None:
        """Turn map capture on or off. On, a forward keeps a cheap thunk per module; nothing is computed."""
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


def create_model(
    backbone: str,
    attn: str | None = None,
    at: str | int | Sequence[str | int] | None = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    img_size: int | None = None,
    **attn_kwargs: Any,
) -> AttentionModel:
    """A timm ``backbone`` with attention ``attn`` at sites ``at`` (defaults: see ``layers``).

    ``attn=None`` or ``"none"`` gives the plain backbone with the same head: the fair baseline.
    ``pretrained_file`` loads a local safetensors/pth state dict through timm (works offline).
    ``img_size`` is the size used to size the sites (default: the backbone's pretrained input size); it
    reaches the timm constructor of backbones that cannot run at that size otherwise (ViTs with a fixed grid).
    """
    check_backbone(backbone)
    spec = None if attn in (None, "none") else get_attention(attn)
    options = parse_options(attn, attn_kwargs) if spec else {}
    if spec is None and attn_kwargs:
        raise AttnzooError(f"attention options given without an attention module: {', '.join(attn_kwargs)}")
    if spec is None and at is not None:
        raise AttnzooError("--at/at names sites for an attention module, but attn is 'none'")
    info = introspect(backbone, img_size or default_img_size(backbone))
    sites = resolve_sites(info, at, spec.kind) if spec else []
    model = build_backbone(backbone, num_classes, pretrained, pretrained_file, **dict(info.timm_kwargs))
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
    result = AttentionModel(model, info, spec, sites, modules, options, num_classes)
    if pretrained or pretrained_file:
        new = [k for k in result.state_dict() if not k.startswith("backbone.")]
        log.info("pretrained weights loaded into '%s'; %d new tensors (attention, randomly initialised)%s",
                 backbone, len(new), f": {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}" if new else "")
    _dry_run(result, info.img_size)
    return result


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


def _dry_run(model: AttentionModel, img_size: int) -> None:
    """A forward on the meta device, so a module that does not fit its site fails now, naming it."""
    if model.attn == "none":
        return
    from torch.func import functional_call

    named = [*model.named_parameters(), *model.named_buffers()]  # module paths, not the (timm) state-dict keys
    params = {k: torch.empty_like(v, device="meta") for k, v in named}
    x = torch.empty(2, 3, img_size, img_size, device="meta")
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
