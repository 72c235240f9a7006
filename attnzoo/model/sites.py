"""Sites of a timm backbone and the layout of each: how a module's output reads as a feature map.

A site's output is a feature map in one of three layouts:

- ``NCHW``: convolutional maps;
- ``NHWC``: channels-last stages (Swin, SAM ViT, VOLO, MambaOut, Sequencer);
- ``NLC``: a token sequence ``[B, prefix + h*w, C]`` on an ``h x w`` grid, prefix tokens (class, register,
  distillation tokens) first, as timm keeps them; the grid tokens in raster order, or in the model's own
  order where it has one (Hiera's unrolled tokens, put back in raster order by timm's ``reroll``).

A module that returns a tuple or a list (PiT, TNT, CrossViT, EfficientViM, MViTv2) is a site when one of its
elements is a feature map: the site is named ``module[i]``.

The layout is read off timm's own metadata, never guessed from a shape alone. The feature levels come from
``feature_info`` (channels, reduction, module) and their maps' exact ``(C, h, w)`` from
``forward_intermediates(output_fmt="NCHW")``, both on the meta device. A level's module output must be that
map in one layout (``[C, h, w]``, ``[h, w, C]`` or tokens on ``h x w``), or the level is not used. Every
other module's output is read against the grids of the levels: a layout whose grid is not one of them is not
considered; where both ``NCHW`` and ``NHWC`` fit, the model's declared ``output_fmt`` (or its levels')
decides. A module whose output reads no way, or two ways nothing decides between, is refused with the
reason (``BackboneInfo.refused``), which ``create_model`` gives when a user names it.

A gate always sees ``[B, C, h, w]`` (``to_map``) and its output is put back in the site's layout
(``from_map``); maps are ``[B, h, w]`` on the site's grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import AttnzooError, SiteError, UnknownNameError

PROBE_BATCH = 2  # not 1: window and head reshapes ([B * windows, N, C]) then show in the batch dimension
HEAD_PREFIXES = ("head", "fc", "classifier", "pre_logits")


@dataclass(frozen=True)
class Site:
    """A place in a backbone where attention can go: a module whose output is (or holds) one feature map."""

    name: str  # the module's name, or ``module[i]`` for element i of a module's tuple output
    channels: int
    stride: int
    size: tuple[int, int]
    fmt: str  # "NCHW", "NHWC" or "NLC" (tokens on the grid ``size``)
    depth: int  # number of dots + 1 in the module's name
    level: int | None  # index in ``BackboneInfo.levels``, if it is a feature level
    default_tap: bool  # one of the default taps of a readout
    default_gate: bool  # the default site of a gate
    prefix_tokens: int = 0  # NLC: tokens before the grid's (class, register tokens)
    item: int | None = None  # the element of a tuple/list output that is the feature map
    order: tuple[int, ...] | None = field(default=None, repr=False)  # NLC: token index at each raster cell
    reaches_logits: bool = True  # False: a side output nothing downstream reads (a gate there changes nothing)

    @property
    def module(self) -> str:
        """The backbone module this site wraps."""
        return self.name if self.item is None else self.name.rpartition("[")[0]

    @property
    def layout(self) -> str:
        """The layout in words, as ``attnzoo layers`` shows it: ``NHWC``, ``NLC+1`` (one prefix token)."""
        text = self.fmt + (f"+{self.prefix_tokens}" if self.prefix_tokens else "")
        return text + (" unrolled" if self.order is not None else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["order"] = "model" if self.order is not None else "raster"
        return d


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    img_size: int
    sites: tuple[Site, ...]
    global_channels: int  # width of the pooled pre-logits feature (g)
    levels: tuple[str, ...]  # site names of the feature levels, in order
    # the timm keywords the backbone was read with (those that shape it), and img_size where it needs it to run
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # (module, why its output is not read as a feature map)
    in_chans: int = 3
    feature_shape: tuple[int, ...] = ()  # forward_features' output for one image, in the backbone's layout

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def check_backbone(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise UnknownNameError("backbone", str(name), timm.list_models())


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    check_backbone(name)
    return timm.create_model(name, **kwargs)


#: timm keywords that change neither the sites nor their shapes: introspection leaves them out (and stays cached)
NOT_SHAPING = frozenset({
    "global_pool", "drop_rate", "drop_path_rate", "drop_block_rate", "attn_drop_rate", "proj_drop_rate",
    "pos_drop_rate", "patch_drop_rate", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
    "scriptable", "exportable", "no_jit",
})


def introspect(name: str, img_size: int, timm_kwargs: Mapping[str, Any] | None = None) -> BackboneInfo:
    """The sites of ``name`` at ``img_size``, from one forward on the meta device (no memory, no weights).

    ``timm_kwargs`` are the keywords the backbone is built with (``in_chans``, ``patch_size``, ``depths``...);
    those that cannot change a site (``NOT_SHAPING``) are left out. A backbone that cannot run at ``img_size`` as
    built (a ViT with a fixed 224 grid) is built with ``img_size=img_size`` when its timm constructor takes it.
    Only then: a backbone that runs at any size (``test_vit``, convnets) keeps its parameter shapes, so run folders
    trained before still load."""
    shaping = tuple(sorted((k, v) for k, v in (timm_kwargs or {}).items() if k not in NOT_SHAPING and v is not None))
    try:
        hash(shaping)
    except TypeError:  # a list or dict value: read, not cached
        return _introspect.__wrapped__(name, img_size, shaping)
    return _introspect(name, img_size, shaping)


@lru_cache(maxsize=32)
def _introspect(name: str, img_size: int, timm_kwargs: tuple[tuple[str, Any], ...]) -> BackboneInfo:
    try:
        return _introspect_with(name, img_size, timm_kwargs)
    except AttnzooError:
        raise
    except Exception as first:
        if "img_size" in dict(timm_kwargs):
            raise
        try:
            return _introspect_with(name, img_size, (*timm_kwargs, ("img_size", img_size)))
        except TypeError:  # the constructor takes no img_size: the first error is the one to show
            raise first from None


Shape = tuple[int, ...]
Output = Shape | tuple[Shape | None, ...] | None  # a tensor's shape, a tuple/list of them, or not a tensor


def _shape_of(out: Any) -> Output:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out:
        return tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in out)
    return None


def _is_shape(out: Output) -> bool:
    return isinstance(out, tuple) and all(isinstance(d, int) for d in out)


@dataclass(frozen=True)
class _Level:
    """A feature level as timm describes it: ``feature_info`` entry and its NCHW map's channels and grids."""

    module: str
    channels: int
    grids: tuple[tuple[int, int], ...]  # exact (forward_intermediates), or both roundings of size / reduction


class _Reader:
    """Reads module outputs as feature maps against the levels' grids (see the module docstring)."""

    def __init__(self, model: nn.Module, grids: set[tuple[int, int]], prefixes: set[int], declared: str | None):
        self.model, self.grids, self.prefixes, self.declared = model, grids, prefixes, declared

    def readings(self, name: str, shape: Shape, channels: int | None = None,
                 grids: Sequence[tuple[int, int]] | None = None) -> tuple[list[dict[str, Any]], str]:
        """The layouts ``shape`` reads in (each a dict of Site fields), and why none when there is none."""
        grids = set(grids) if grids is not None else self.grids
        if len(shape) not in (3, 4):
            return [], f"its output is {len(shape)}-dimensional {shape}, not a feature map"
        if shape[0] != PROBE_BATCH:
            return [], (f"its output {_show(shape)} has {shape[0]} rows for a batch of {PROBE_BATCH} "
                        f"(windows or heads), not one map per image")
        out = []
        if len(shape) == 4:
            _, a, b, c = shape
            if (b, c) in grids:
                out.append(dict(fmt="NCHW", channels=a, size=(b, c)))
            if (a, b) in grids:
                out.append(dict(fmt="NHWC", channels=c, size=(a, b)))
        else:
            _, n, c = shape
            for g in sorted(grids):
                if n - g[0] * g[1] in self.prefixes:
                    out.append(dict(fmt="NLC", channels=c, size=g, prefix_tokens=n - g[0] * g[1]))
        if channels is not None:
            out = [r for r in out if r["channels"] == channels]
        out = [self._ordered(name, shape, r) for r in out]
        failed = [r for r in out if isinstance(r, str)]
        out = [r for r in out if not isinstance(r, str)]
        if not out:
            if failed:
                return [], failed[0]
            return [], (f"its output {_show(shape)} is on none of the grids of the feature levels "
                        f"({', '.join(f'{h}x{w}' for h, w in sorted(grids))})")
        return out, ""

    def _ordered(self, name: str, shape: Shape, reading: dict[str, Any]) -> dict[str, Any] | str:
        """A token reading with the model's token order: Hiera keeps its tokens unrolled, and timm's
        ``reroll`` (parameter-free, run here on the token indices) says where each one lies on the grid."""
        reroll = getattr(self.model, "reroll", None)
        if reading["fmt"] != "NLC" or not isinstance(reroll, nn.Module):
            return reading
        block = re.fullmatch(r"blocks\.(\d+)", name)
        if block is None or reading["prefix_tokens"]:
            return "its tokens are in the model's unrolled order, which timm puts back on the grid only at blocks.i"
        n = shape[1]
        idx = torch.arange(n, dtype=torch.float32, device="cpu").view(1, n, 1)
        grid = reroll(idx, int(block[1]))
        if tuple(grid.shape[1:3]) != reading["size"]:
            return f"its tokens roll up to a {tuple(grid.shape[1:3])} grid, not {reading['size']}"
        return {**reading, "order": tuple(int(v) for v in grid.flatten().tolist())}

    def read(self, name: str, out: Output) -> dict[str, Any] | str:
        """The one reading of a module's output (its element, for a tuple), else why there is none."""
        if _is_shape(out):
            found, why = self.readings(name, out)
            if not found:
                if len(out) == 4 and self.declared == "NCHW" and out[0] == PROBE_BATCH:
                    return dict(fmt="NCHW", channels=out[1], size=(out[2], out[3]))  # timm's default layout
                return why
            found, why = _decided(self, found, why, name)
            return found[0] if found else why
        if out is None:
            return "its output is not a tensor"
        return f"its output is a tuple {out}; only the elements of feature levels are read"


def _show(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _levels(model: nn.Module, x: torch.Tensor) -> list[_Level]:
    """timm's feature levels: ``feature_info`` for the modules and channels, ``forward_intermediates`` for
    the exact grid of each (its NCHW maps); where that cannot run on the meta device, the grid is the input
    size over the level's reduction."""
    info = [f for f in (getattr(model, "feature_info", None) or []) if isinstance(f, dict)]
    shapes: list[Shape] = []
    if hasattr(model, "forward_intermediates"):
        try:
            inter = model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
            shapes = [tuple(t.shape) for t in inter]
        except Exception:  # (an op without a meta kernel, or no output_fmt): the reduction gives the grid
            shapes = []
    h, w = x.shape[-2:]
    levels = []
    for i, f in enumerate(info):
        if len(shapes) == len(info) and len(shapes[i]) == 4:
            levels.append(_Level(f.get("module", ""), shapes[i][1], (shapes[i][2:],)))
        else:
            r = int(f.get("reduction") or 1)
            grids = tuple(dict.fromkeys([(h // r, w // r), (-(-h // r), -(-w // r))]))
            levels.append(_Level(f.get("module", ""), int(f.get("num_chs") or 0), grids))
    return levels


def _introspect_with(name: str, img_size: int, timm_kwargs: tuple[tuple[str, Any], ...]) -> BackboneInfo:
    with torch.device("meta"):  # also for tensors a forward makes without a device (ConViT's positions)
        model = timm_model(name, pretrained=False, **dict(timm_kwargs)).eval()
        outputs: dict[str, list[Output]] = {}
        order: list[str] = []

        def hook(mod_name: str):
            def fn(_m, _inp, out):
                if mod_name not in outputs:
                    order.append(mod_name)
                outputs.setdefault(mod_name, []).append(_shape_of(out))

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        in_chans = int(dict(timm_kwargs).get("in_chans", 3))
        x = torch.empty(PROBE_BATCH, in_chans, img_size, img_size)
        with torch.no_grad():
            feats = model.forward_features(x)
            for h in handles:
                h.remove()
            g = model.forward_head(feats, pre_logits=True)
            levels = _levels(model, x)
    if g.dim() != 2:
        raise AttnzooError(f"backbone '{name}' has no pooled pre-logits feature (got shape {tuple(g.shape)})")
    once = {n: outs[0] for n, outs in outputs.items() if len(outs) == 1}
    modules = {n for n, _ in model.named_modules() if n}
    refused = {n: f"it runs {len(outs)} times in a forward" for n, outs in outputs.items() if len(outs) > 1}
    npt = int(getattr(model, "num_prefix_tokens", 0) or 0)
    declared = getattr(model, "output_fmt", None)
    reader = _Reader(model, {gr for lv in levels for gr in lv.grids}, {0, 1, npt}, declared and str(declared))
    found, whys = _find_levels(levels, outputs, order, modules, reader)
    if reader.declared is None:  # the layout of the levels that read one way, else timm's default
        formats = {s["fmt"] for s in found if s["fmt"] != "NLC"}
        reader.declared = formats.pop() if len(formats) == 1 else "NCHW"
        found, whys = _find_levels(levels, outputs, order, modules, reader)
    if not found:
        why = "; ".join(dict.fromkeys(whys)) or "it has no feature_info"
        raise AttnzooError(f"backbone '{name}' has no feature levels attnzoo can read ({why})")
    grids = {s["size"] for s in found}
    prefixes = {0, npt} | {s.get("prefix_tokens", 0) for s in found}
    reader = _Reader(model, grids, prefixes, reader.declared)
    level_of = {s["name"]: i for i, s in enumerate(found)}
    sites: list[Site] = []
    for n in order:
        in_body = not n.startswith(HEAD_PREFIXES)
        for s in [s for s in found if s["module"] == n]:
            sites.append(_site(s, img_size, level_of[s["name"]]))
        if n not in once or any(s["name"] == n for s in found) or not in_body:
            continue
        r = reader.read(n, once[n])
        if isinstance(r, str):
            refused[n] = r
        else:
            sites.append(_site({**r, "name": n, "module": n}, img_size, None))
    level_names = tuple(s["name"] for s in found)
    dead = _side_outputs(model, sites, x)
    sites = [replace(s, reaches_logits=s.name not in dead) for s in sites]
    taps, gate = _defaults(found, dead)
    sites = [replace(s, default_tap=s.name in taps, default_gate=s.name == gate) for s in sites]
    return BackboneInfo(name, img_size, tuple(sites), g.shape[1], level_names, timm_kwargs,
                        tuple(sorted(refused.items())), in_chans,
                        tuple(feats.shape[1:]) if isinstance(feats, torch.Tensor) else ())


def _find_levels(levels: list[_Level], outputs: dict[str, list[Output]], order: list[str], modules: set[str],
                 reader: _Reader) -> tuple[list[dict[str, Any]], list[str]]:
    """A site for each feature level, in timm's order (levels nothing can read are left out):

    1. the level's module (or the one whose name ends with it: ``blocks.0`` of ``encoder.blocks.0``), its
       output or the one element of its tuple output that is the level's map;
    2. else the last of its children that outputs the level's map (``feature_info`` naming a ModuleList);
    3. else the last to run of the modules of the same depth and index in another container, and of their
       children (``block.0`` for ``stages.0``, ``blocks.0.1``);
    4. else the shallowest module after the previous level's that outputs the level's map (the last of them),
       other levels' modules left out.

    Returns the sites found (dicts of Site fields) and, for each level left out, why.
    """
    once: dict[str, Output | str] = {n: outs[0] if len(outs) == 1 else f"it runs {len(outs)} times in a forward"
                                     for n, outs in outputs.items()}
    found: list[dict[str, Any]] = []
    whys: list[str] = []
    seen: set[str] = set()
    named = {lv.module for lv in levels}
    position = {n: i for i, n in enumerate(order)}
    after = -1
    for lv in levels:
        why = "its module does not run in forward_features"
        name = lv.module if lv.module in modules else _by_suffix(lv.module, modules)
        steps = [[name], _children(name, order)[::-1]] if name else []
        if lv.module and re.search(r"\.\d+$", lv.module):
            head, _, idx = lv.module.rpartition(".")
            depth = head.count(".") + 1
            same = [n for n in modules if n.endswith(f".{idx}") and n.count(".") == depth]
            kin = {c for n in same for c in [n, *_children(n, order)]}
            steps.append([n for n in order[::-1] if n in kin])
        steps.append(_shallowest_last(order, after, lv, once, reader, named))
        site = None
        for candidates in steps:
            for cand in candidates:
                r = _read_level(cand, once.get(cand, "it does not run in forward_features"), lv, reader)
                if isinstance(r, str):
                    why = r if cand == name else why
                elif r["name"] not in seen:
                    site = r
                    break
            if site is not None:
                break
        if site is None:
            whys.append(f"{lv.module or '(the model)'}: {why}")
            continue
        seen.add(site["name"])
        after = max(after, position[site["module"]])
        found.append(site)
    return found, whys


def _by_suffix(module: str, modules: set[str]) -> str | None:
    matches = [n for n in modules if module and n.endswith("." + module)]
    return matches[0] if len(matches) == 1 else None


def _children(name: str, order: list[str]) -> list[str]:
    depth = name.count(".") + 1
    return [n for n in order if n.startswith(name + ".") and n.count(".") == depth]


def _shallowest_last(order: list[str], after: int, lv: _Level, once: dict[str, Output | str],
                     reader: _Reader, levels: set[str]) -> list[str]:
    hits = [n for i, n in enumerate(order) if i > after and not n.startswith(HEAD_PREFIXES) and n not in levels
            and not isinstance(_read_level(n, once[n], lv, reader), str)]
    if not hits:
        return []
    top = min(n.count(".") for n in hits)
    return [[n for n in hits if n.count(".") == top][-1]]


def _read_level(name: str, out: Output | str, lv: _Level, reader: _Reader) -> dict[str, Any] | str:
    """The reading of ``name``'s output as level ``lv``'s map: its output, or the one element that is."""
    if isinstance(out, str) or out is None:
        return out or "its output is not a tensor"
    if _is_shape(out):
        found, why = _decided(reader, *reader.readings(name, out, lv.channels, lv.grids), name)
        return {**found[0], "name": name, "module": name} if found else why
    hits = []
    for i, shape in enumerate(out):
        if shape is not None:
            found, _ = _decided(reader, *reader.readings(name, shape, lv.channels, lv.grids), name)
            if found:
                hits.append({**found[0], "name": f"{name}[{i}]", "module": name, "item": i})
    if len(hits) == 1:
        return hits[0]
    return f"{len(hits) or 'none'} of the elements of its output {out} are the level's map"


def _op_layout(module: nn.Module) -> str | None:
    """The layout a module's own op fixes for a 4D output: a conv or a batch norm works on NCHW, a linear
    layer or a layer norm on the last dimension (NHWC); timm's LayerNorm2d normalises NCHW channels."""
    from timm.layers import LayerNorm2d

    if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, LayerNorm2d)):
        return "NCHW"
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return "NHWC"
    return None


def _decided(reader: _Reader, found: list[dict[str, Any]], why: str,
             name: str = "") -> tuple[list[dict[str, Any]], str]:
    """One reading, or none and why: two (a map whose channels equal its height and width) are decided by the
    op of the module (a conv: NCHW, a linear layer: NHWC), else by the model's declared layout."""
    if len(found) > 1:
        own = _op_layout(reader.model.get_submodule(name)) if name else None
        declared = [r for r in found if r["fmt"] == (own or reader.declared)]
        if len(declared) != 1:
            return [], f"it reads as {' or '.join(r['fmt'] for r in found)} and the model declares no layout"
        found = declared
    return found, why


def _site(r: dict[str, Any], img_size: int, level: int | None) -> Site:
    size = tuple(r["size"])
    stride = max(1, round(img_size / max(1, size[0])))
    return Site(r["name"], r["channels"], stride, size, r["fmt"], r["module"].count(".") + 1, level, False, False,
                r.get("prefix_tokens", 0), r.get("item"), r.get("order"))


def _side_outputs(model: nn.Module, sites: list[Site], x: torch.Tensor) -> set[str]:
    """The sites whose output does not reach the logits (an output timm keeps for ``forward_intermediates``
    only, as EfficientViM's stage maps): a gate there would change nothing. Found with a backward pass on the
    meta device, each site's map scaled by a probe; where that cannot run, no site is called one."""
    modules = dict(model.named_modules())
    probes = {s.name: torch.ones((), device="meta", requires_grad=True) for s in sites}

    def scale(site: Site):
        def hook(_m, _inp, out):
            if site.item is None:
                return out * probes[site.name]
            items = list(out)
            items[site.item] = items[site.item] * probes[site.name]
            return type(out)(items)

        return hook

    handles = [modules[s.module].register_forward_hook(scale(s)) for s in sites]
    try:
        with torch.device("meta"):
            logits = model(torch.empty_like(x))
            grads = torch.autograd.grad(logits.sum(), list(probes.values()), allow_unused=True)
    except Exception:  # (an op without a meta kernel, or one the scaling upsets): nothing is claimed
        return set()
    finally:
        for h in handles:
            h.remove()
    return {name for name, grad in zip(probes, grads) if grad is None}


def _defaults(found: list[dict[str, Any]], dead: set[str]) -> tuple[set[str], str]:
    """Default taps: the three levels before the final one (one per module, from the last); the default gate:
    the level just before the final one whose output reaches the logits (else the final one)."""
    before_final = found[:-1] or found
    taps, modules = [], set()
    for s in reversed(before_final):
        if s["module"] not in modules and len(taps) < 3:
            taps.append(s["name"])
            modules.add(s["module"])
    live = [s["name"] for s in before_final if s["name"] not in dead] or [s["name"] for s in found[-1:]]
    return set(taps), live[-1]


def to_map(site: Site, out: Any) -> torch.Tensor:
    """A site's output as a feature map ``[B, C, h, w]``: NCHW as it is, NHWC permuted, tokens (prefix tokens
    dropped) on their grid. The grid is the site's built size, or a square one for another number of patches."""
    if site.item is not None:
        out = out[site.item]
    if site.fmt == "NCHW":
        return out
    if site.fmt == "NHWC":
        return out.permute(0, 3, 1, 2)
    tokens = out[:, site.prefix_tokens:]
    if site.order is not None:
        tokens = tokens[:, _index(site.order, tokens.device)]
    return tokens_on_grid(tokens, site.size[0], site.size[1], site.order is None, site.name)


def tokens_on_grid(tokens: torch.Tensor, h: int, w: int, resizable: bool, name: str) -> torch.Tensor:
    """Grid tokens ``[B, N, C]`` as a map ``[B, C, h, w]``: on the site's built grid, or on a square one for another
    number of tokens (the model run at another image size) where the tokens are in raster order (``resizable``).

    The grid depends on the number of tokens, so ``torch.fx`` keeps this function a leaf of its graphs (it is
    ``torch.fx.wrap``-ped), and TorchScript compiles it: plain types, no ``math.isqrt``."""
    n = tokens.shape[1]
    if h * w != n:
        side = int(math.sqrt(n) + 0.5)
        if side * side != n or not resizable:
            raise SiteError(f"site '{name}' has {n} patch tokens, which is not the {h}x{w} grid it was built "
                            f"for nor a square one: build the model for the image size you feed it")
        h = side
        w = side
    return tokens.transpose(1, 2).unflatten(2, (h, w))


torch.fx.wrap("tokens_on_grid")


def from_map(site: Site, m: torch.Tensor, out: Any) -> Any:
    """The inverse of ``to_map``: a gated map back into the site's output (layout, prefix tokens, tuple)."""
    whole = out
    if site.item is not None:
        out = out[site.item]
    if site.fmt == "NCHW":
        y = m
    elif site.fmt == "NHWC":
        y = m.permute(0, 2, 3, 1).contiguous()
    else:
        tokens = m.flatten(2).transpose(1, 2)
        if site.order is not None:
            tokens = tokens[:, _index(_inverse(site.order), tokens.device)]
        y = torch.cat([out[:, : site.prefix_tokens], tokens], 1)
    if site.item is None:
        return y
    items = list(whole)
    items[site.item] = y
    return type(whole)(items) if isinstance(whole, (tuple, list)) else items


@lru_cache(maxsize=64)
def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for cell, token in enumerate(order):
        inv[token] = cell
    return tuple(inv)


@lru_cache(maxsize=64)
def _cpu_index(order: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(order, dtype=torch.long)


def _index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _cpu_index(order).to(device)


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
    info = introspect(backbone, img_size or default_img_size(backbone))
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
        refused = dict(info.refused)
        if item not in names and item in refused:
            here = [s.name for s in info.sites if s.module == item]
            raise SiteError(f"site '{item}' of '{info.name}' cannot take attention: {refused[item]}"
                            + (f"; its sites: {', '.join(here)}" if here else ""))
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
        if kind == "gate" and not info.site(item).reaches_logits:
            raise SiteError(f"site '{item}' of '{info.name}' is a side output that does not reach the logits "
                            f"(timm keeps it for forward_intermediates): a gate there would change nothing; "
                            f"a readout can read it")
        shared = [o for o in out if info.site(o).module == info.site(item).module]
        if shared:
            raise AttnzooError(f"sites '{shared[0]}' and '{item}' are two outputs of one module "
                               f"'{info.site(item).module}': attnzoo inserts at one of them")
        out.append(item)
    return out
