"""Attention inserted at named layers of any timm backbone.

``create_model`` builds the timm model (pretrained weights included), then puts the attention
module in without touching the backbone's modules or their state-dict keys:

- a **gate** runs right after its site, through a forward hook that replaces the site's output;
- a **readout** reads its taps (forward hooks that keep the tap outputs) and the backbone's pooled
  pre-logits feature, and produces the logits in place of the backbone's classifier.

Sites are timm module names (``layer3``, ``features.32``, ``stages.2``, ``blocks.4``) or feature
levels: an integer ``i`` is the i-th entry of the backbone's ``feature_info`` (negative counts from
the end; ``-1`` is the final level). Feature maps are NCHW; ViT-style token backbones are supported
by reshaping the patch tokens to their grid (prefix tokens such as the class token pass through
untouched). Backbones whose stages emit NHWC maps (e.g. Swin) are not supported yet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .errors import AttnzooError, PretrainedUnavailable, SiteError, UnknownNameError
from .maps import MapRecorder, as_spatial
from .registry import AttentionSpec, get_attention, parse_options, site_kwargs

log = logging.getLogger("attnzoo")

READOUT_KEY = "readout"


@dataclass(frozen=True)
class Site:
    """A place in a backbone where attention can go: a module whose output is one feature map."""

    name: str
    channels: int
    stride: int
    size: tuple[int, int]
    fmt: str  # "NCHW" or "NLC" (tokens, reshaped to the grid)
    depth: int  # number of dots + 1 in the name
    level: int | None  # index in timm's feature_info, if it is a feature level
    default_tap: bool  # one of the default taps of a readout
    default_gate: bool  # the default site of a gate
    prefix_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    img_size: int
    sites: tuple[Site, ...]
    global_channels: int  # width of the pooled pre-logits feature (g)
    levels: tuple[str, ...]  # feature_info module names, in order

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def check_backbone(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise UnknownNameError("backbone", str(name), timm.list_models())


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    check_backbone(name)
    return timm.create_model(name, **kwargs)


def _patch_grid(model: nn.Module, h: int, w: int) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    return h // ph, w // pw


@lru_cache(maxsize=32)
def _introspect(name: str, img_size: int) -> BackboneInfo:
    """One forward on the meta device: no memory, no weights, shapes of every module's output."""
    with torch.device("meta"):
        model = _timm_model(name, pretrained=False)
    model.eval()
    shapes: dict[str, list[tuple[int, ...]]] = {}
    order: list[str] = []

    def hook(mod_name: str):
        def fn(_m, _inp, out):
            if mod_name not in shapes:
                order.append(mod_name)
            shapes.setdefault(mod_name, []).append(tuple(out.shape) if isinstance(out, torch.Tensor) else ())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    x = torch.empty(1, 3, img_size, img_size, device="meta")
    with torch.no_grad():
        feats = model.forward_features(x)
        for h in handles:
            h.remove()
        g = model.forward_head(feats, pre_logits=True)
    if g.dim() != 2:
        raise AttnzooError(f"backbone '{name}' has no pooled pre-logits feature (got shape {tuple(g.shape)})")
    grid = _patch_grid(model, img_size, img_size)
    levels = tuple(f["module"] for f in getattr(model, "feature_info", []) or [])
    head_names = {n for n, _ in model.named_modules() if n.startswith(("head", "fc", "classifier", "pre_logits"))}
    sites = []
    for n in order:
        outs = shapes[n]
        if len(outs) != 1 or n in head_names:  # modules called twice (shared) or outside the body
            continue
        shape = outs[0]
        if len(shape) == 4:
            fmt, channels, size, prefix = "NCHW", shape[1], (shape[2], shape[3]), 0
        elif len(shape) == 3 and grid is not None and shape[1] >= grid[0] * grid[1]:
            fmt, channels, size, prefix = "NLC", shape[2], grid, shape[1] - grid[0] * grid[1]
        else:
            continue
        stride = max(1, round(img_size / max(1, size[0])))
        level = levels.index(n) if n in levels else None
        sites.append(Site(n, channels, stride, size, fmt, n.count(".") + 1, level, False, False, prefix))
    names = {s.name for s in sites}
    usable = [lv for lv in levels if lv in names]
    if not usable:
        raise AttnzooError(f"backbone '{name}' has no feature levels attnzoo can use")
    before_final = usable[:-1] or usable
    taps = set(before_final[-3:])
    gate = before_final[-1]
    sites = [
        Site(**{**s.to_dict(), "default_tap": s.name in taps, "default_gate": s.name == gate}) for s in sites
    ]
    return BackboneInfo(name, img_size, tuple(sites), g.shape[1], tuple(usable))


def default_img_size(backbone: str) -> int:
    import timm

    check_backbone(backbone)
    cfg = timm.models.get_pretrained_cfg(backbone)
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-1])


def layers(backbone: str, img_size: int | None = None, all: bool = True) -> list[Site]:
    """Insertable sites of ``backbone``: name, channels, stride, map size and the defaults.

    ``all=False`` keeps the coarse ones (depth <= 2 and the feature levels), as ``attnzoo layers`` shows.
    """
    info = _introspect(backbone, img_size or default_img_size(backbone))
    if all:
        return list(info.sites)
    return [s for s in info.sites if s.depth <= 2 or s.level is not None]


def resolve_sites(info: BackboneInfo, at: str | int | Sequence[str | int] | None, kind: str) -> list[str]:
    """Site names for ``at``; integers and digit strings are feature levels."""
    if at is None:
        return [s.name for s in info.sites if (s.default_tap if kind == "readout" else s.default_gate)]
    items = [at] if isinstance(at, (str, int)) else list(at)
    names = {s.name for s in info.sites}
    out = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            i = int(item)
            if not -len(info.levels) <= i < len(info.levels):
                raise AttnzooError(
                    f"feature level {i} is out of range for '{info.name}' "
                    f"({len(info.levels)} levels: {', '.join(info.levels)})"
                )
            item = info.levels[i]
        if item not in names:
            err = UnknownNameError(f"layer of '{info.name}'", item, names)
            coarse = [s.name for s in info.sites if s.depth <= 1 or s.level is not None]
            raise AttnzooError(
                f"{err}. Feature levels: {', '.join(info.levels)}; other sites include: "
                f"{', '.join(c for c in coarse if c not in info.levels)[:300]} "
                f"(`attnzoo layers {info.name}` lists all {len(names)})"
            )
        if item in out:
            raise AttnzooError(f"site '{item}' is given twice")
        out.append(item)
    return out


class _Hook:
    """Forward hook of one site. A plain object (not a closure) so deep copies of the model work."""

    def __init__(self, model: AttentionModel, site: Site, gate: bool):
        self.model, self.site, self.gate = model, site, gate

    def to_map(self, out: torch.Tensor) -> torch.Tensor:
        if self.site.fmt == "NCHW":
            return out
        h, w = self.model._grid
        p = out.shape[1] - h * w
        return out[:, p:].transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)

    def from_map(self, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.site.fmt == "NCHW":
            return m
        p = out.shape[1] - m.shape[2] * m.shape[3]
        return torch.cat([out[:, :p], m.flatten(2).transpose(1, 2)], 1)

    def __call__(self, _module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
        x = self.to_map(out)
        if not self.gate:
            self.model._tapped[self.site.name] = x
            return None
        where = f"attention '{self.model.attn}' at site '{self.site.name}'"
        try:
            y = self.model.gates[_key(self.site.name)](x)
        except SiteError:
            raise
        except Exception as e:  # a module's own bug or misfit, named: a plugin's errors must say whose they are
            raise SiteError(f"{where} failed: {type(e).__name__}: {e}") from e
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise SiteError(f"{where} returned {got}, but a gate must return its input's shape {tuple(x.shape)}")
        return self.from_map(y, out)


def _key(site: str) -> str:
    return site.replace(".", "__")


class AttentionModel(nn.Module):
    """A timm backbone with attention at named sites. ``attention_maps()`` gives the last forward's maps."""

    def __init__(self, backbone: nn.Module, info: BackboneInfo, spec: AttentionSpec | None,
                 sites: list[str], modules: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.backbone_name = info.name
        self.attn = spec.name if spec else "none"
        self.kind = spec.kind if spec else None
        self.sites = list(sites)
        self.site_info = {s: info.site(s) for s in sites}
        self.gates = nn.ModuleDict()
        self.readout = None
        if spec is not None and spec.kind == "gate":
            for site, m in zip(sites, modules):
                self.gates[_key(site)] = m
        elif spec is not None:
            self.readout = modules
        self._tapped: dict[str, torch.Tensor] = {}
        self._grid: tuple[int, int] = (0, 0)
        self._recorder = MapRecorder()
        named = dict(backbone.named_modules())
        for site in sites:
            named[site].register_forward_hook(_Hook(self, self.site_info[site], gate=self.readout is None))
        self.capture_maps(True)

    # timm-style attributes that fastai and timm helpers read
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _patch_grid(self.backbone, x.shape[-2], x.shape[-1])
        if grid is not None:
            self._grid = grid
        self._recorder.clear()
        feats = self.backbone.forward_features(x)
        if self.readout is None:
            return self.backbone.forward_head(feats)
        g = self.backbone.forward_head(feats, pre_logits=True)
        tapped = [self._tapped.pop(s) for s in self.sites]
        try:
            return self.readout(tapped, g)
        except SiteError:
            raise
        except Exception as e:
            raise SiteError(f"attention '{self.attn}' reading {', '.join(self.sites)} failed: "
                            f"{type(e).__name__}: {e}") from e


def _build_backbone(backbone: str, num_classes: int, pretrained: bool, pretrained_file: str | None,
                    **timm_kwargs: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(num_classes=num_classes, **timm_kwargs)
    if pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(state_dict=load_weights_file(Path(pretrained_file)))
        pretrained = True
    offline = hub.unreachable() if pretrained and pretrained_file is None else None  # seconds, not a minute
    try:
        with hub.offline(offline is not None):
            return _timm_model(backbone, pretrained=pretrained, **kwargs)
    except UnknownNameError:
        raise
    except RuntimeError as e:
        if pretrained_file is not None and ("size mismatch" in str(e) or "Missing key" in str(e)):
            first = str(e).strip().splitlines()[0:2]
            raise AttnzooError(f"weights file {pretrained_file} does not fit '{backbone}': {' '.join(first)}") from e
        if pretrained_file is None and pretrained:
            raise PretrainedUnavailable(_offline_message(backbone, e, offline)) from e
        raise
    except Exception as e:
        if pretrained_file is None and pretrained:
            raise PretrainedUnavailable(_offline_message(backbone, e, offline)) from e
        if pretrained_file is not None:
            raise AttnzooError(f"cannot load weights file {pretrained_file}: {type(e).__name__}: {e}") from e
        raise


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never running code from it: safetensors, or a torch file read with
    ``torch.load(weights_only=True)``; a file that needs full unpickling is refused with an explanation.
    Checkpoints that wrap the weights (``state_dict``, ``model``, ``module.`` prefixes) are unwrapped."""
    if not path.is_file():
        raise AttnzooError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise AttnzooError(f"weights file {path} must be one of {', '.join(WEIGHT_SUFFIXES)}, got '{suffix}'")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise AttnzooError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise AttnzooError(
            f"{path} is not a plain weights file: loading it needs full unpickling, which can run any code the "
            f"file contains, so attnzoo refuses it{f' ({detail})' if detail else ''}. If you trust the file, "
            f"convert it once: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path}', weights_only=False), 'weights.safetensors')\""
        ) from None
    except Exception as e:
        raise AttnzooError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AttnzooError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _offline_message(backbone: str, e: Exception, offline: str | None) -> str:
    why = f"{offline}, and they are not in the local cache" if offline else " ".join(str(e).split()) or type(e).__name__
    return (f"pretrained weights for '{backbone}' could not be fetched ({why}); "
            f"train from scratch with --no-pretrained, or pass a local file with --weights FILE")


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
    ``img_size`` is the size used to size the sites (default: the backbone's pretrained input size).
    """
    check_backbone(backbone)
    spec = None if attn in (None, "none") else get_attention(attn)
    options = parse_options(attn, attn_kwargs) if spec else {}
    if spec is None and attn_kwargs:
        raise AttnzooError(f"attention options given without an attention module: {', '.join(attn_kwargs)}")
    if spec is None and at is not None:
        raise AttnzooError("--at/at names sites for an attention module, but attn is 'none'")
    info = _introspect(backbone, img_size or default_img_size(backbone))
    sites = resolve_sites(info, at, spec.kind) if spec else []
    model = _build_backbone(backbone, num_classes, pretrained, pretrained_file)
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
    result = AttentionModel(model, info, spec, sites, modules)
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

    params = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty(2, 3, img_size, img_size, device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            functional_call(model, params, (x,), strict=False)
    except SiteError as e:
        if not isinstance(e.__cause__, NotImplementedError):  # (an op without a meta kernel)
            raise
        log.debug("meta dry run skipped: %s", e)
    except Exception as e:  # an op without a meta kernel says nothing about the sites
        log.debug("meta dry run skipped: %s", e)
    finally:
        model._tapped.clear()
        model._recorder.clear()
        model.train(was_training)
