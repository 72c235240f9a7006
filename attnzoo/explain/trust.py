"""Which attention map to trust: how much of the decision each map carries, and whether it finds the object.

A map shows where the model looks only if the decision depends on it. For each site, attnzoo takes that map's
attention away and measures the drop in the mean probability of the true class: a gate is skipped (its input
passes through), and a readout's tap gets its feature map's spatial mean at every position, so any attention
over it is uniform (for Learn To Pay Attention the attended vector is then the tap's plain average). The drops,
as shares of their sum, order the maps: the first carries the most of the decision. With object boxes, a map
whose pointing game is below half of a random map's (``metrics.flags``) is *inverted*: it points away from the
object and is never presented as where the model looks.

Why LPA's shallowest tap may avoid the object: with the paper's softmax over positions, the global feature g
adds the same ``<u, g>`` to every score and cancels, so a tap's map is a learned 1x1-conv saliency of its own
local features. At a shallow tap those are edges and colours: on the demo set the object's colour is random
and carries nothing about its shape, so the tap learns to average something else (the background), and the
classifier leans on the deeper taps. Its decision share says so (``fit`` records it in ``attnzoo.json``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..runs.outputs import strict_json
from . import metrics


@contextlib.contextmanager
def _without(model: Any, site: str) -> Iterator[None]:
    """The model with the attention at ``site`` taken away (see the module docstring)."""
    if model.readout is not None:
        index = model.sites.index(site)

        def flatten_tap(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            locals_, *rest = args
            locals_ = list(locals_)
            l = locals_[index]
            locals_[index] = l.mean((2, 3), keepdim=True).expand_as(l)
            return (locals_, *rest)

        handle = model.readout.register_forward_pre_hook(flatten_tap)
    else:
        gate = dict(zip(model.sites, (m for _, m in model.named_attention_modules())))[site]
        handle = gate.register_forward_hook(lambda _m, args, _out: args[0])
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def decision_shares(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    maps: dict[str, list[torch.Tensor]] | None = None) -> dict[str, dict[str, float]]:
    """``{site: {"drop", "share"}}``: the drop in the true class's mean probability when the map at ``site`` is
    taken away, and that drop's share of all sites' drops (0 where no drop is positive). ``batches`` are
    ``(normalised images, class indices)``, reused for every site. ``maps``, when given, receives the maps of
    the whole model's pass, a list per site (one tensor per batch)."""
    was_training = model.training
    model.eval()
    batches = list(batches)

    def true_prob(keep: dict[str, list[torch.Tensor]] | None = None) -> float:
        total, n = 0.0, 0
        for x, y in batches:
            p = model(x).float().softmax(-1)
            total += float(p.gather(1, y.view(-1, 1).to(p.device)).sum())
            n += len(y)
            if keep is not None:
                for site, m in model.attention_maps().items():
                    keep.setdefault(site, []).append(m.cpu())
        return total / max(n, 1)

    try:
        full = true_prob(maps)
        drops = {}
        for site in model.sites:
            with _without(model, site):
                drops[site] = full - true_prob()
    finally:
        model.train(was_training)
    total = sum(max(0.0, d) for d in drops.values())
    return {s: {"drop": d, "share": max(0.0, d) / total if total > 0 else 0.0} for s, d in drops.items()}


def verdicts(shares: Mapping[str, Mapping[str, float]], maps: Mapping[str, torch.Tensor] | None = None,
             boxes: Sequence[Any] | None = None, image_size: int | None = None) -> dict[str, dict[str, Any]]:
    """Per site: ``share`` and ``drop`` (``decision_shares``), and with ``maps`` ``[N, h, w]`` and their images'
    ``boxes`` (``explain.boxes.load_boxes``), ``pointing``, ``chance`` (a random map's pointing) and ``flags``
    (``metrics.flags``: ``inverted``, ``flat``). Ordered by share, the map that carries the decision first."""
    out: dict[str, dict[str, Any]] = {s: dict(v) for s, v in shares.items()}
    if maps is not None and boxes is not None and any(b is not None for b in boxes):
        kept = [b for b in boxes if b is not None]
        chance = metrics.random_baseline(kept, image_size)["pointing"]
        scores = metrics.score_maps({s: maps[s] for s in out if s in maps}, boxes, image_size)
        for site, score in scores.items():
            out[site].update(pointing=score["pointing"], chance=chance, flags=metrics.flags(score, chance))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["share"]))


def label(site: str, verdict: Mapping[str, Any] | None) -> str:
    """A map's panel title, short enough for a figure's column: its site, its share of the decision, and
    ``INVERTED`` (it points away from the object) or ``flat`` (it points nowhere) when so."""
    if not verdict:
        return site
    flags = verdict.get("flags") or []
    if "inverted" in flags:
        return f"{site} · INVERTED · {verdict['share']:.0%}"
    return f"{site} · decides {verdict['share']:.0%}" + (" · flat" if "flat" in flags else "")


def ordered(maps: Mapping[str, Any], recorded: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``maps`` keyed by their labels, in the order of the run's recorded verdicts (decision share first); as
    they are when the run recorded none."""
    if not recorded:
        return dict(maps)
    order = [s for s in recorded if s in maps] + [s for s in maps if s not in recorded]
    return {label(s, recorded.get(s)): maps[s] for s in order}


def valid_batches(learn: Any, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fastai Learner's validation batches (images, class indices), in the order of its items, as plain tensors:
    read straight from the loader, so no callback of a fit that may be running is called again."""
    batches, n = [], 0
    for x, y in learn.dls.valid:  # not shuffled
        keep = len(y) if limit is None else limit - n
        batches.append((x[:keep].as_subclass(torch.Tensor), y[:keep].as_subclass(torch.Tensor)))
        n += len(batches[-1][1])
        if limit is not None and n >= limit:
            break
    return batches


def from_learner(learn: Any, info: Any, img_size: int, limit: int = 512) -> dict[str, dict[str, Any]]:
    """``verdicts`` of a trained fastai Learner's attention maps on (up to ``limit``) validation images, with the
    boxes of ``info.root/boxes.csv`` when there is one: what ``fit`` records under ``maps`` in ``attnzoo.json``."""
    from fastai.torch_core import get_model

    from .boxes import has_boxes, load_boxes

    model = get_model(learn.model)
    batches = valid_batches(learn, limit)
    n = sum(len(y) for _, y in batches)
    if not batches or not model.sites:
        return {}
    maps: dict[str, list[torch.Tensor]] = {}
    shares = decision_shares(model, batches, maps)  # one pass gives the maps too
    boxes = None
    if has_boxes(info.root):
        boxes = load_boxes(info.root, list(learn.dls.valid.items)[:n], img_size)
    return {s: strict_json(v) for s, v in verdicts(shares, {k: torch.cat(v) for k, v in maps.items()}, boxes,
                                               img_size).items()}
