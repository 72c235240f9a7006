"""Post-hoc explanations of a model's decision: class activation maps and perturbation curves.

Everything here needs the model; the scores computed from the maps live in ``attnzoo.metrics``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import viz
from .model import AttentionModel, layers, to_map
from .run import Run

Progress = Callable[[str, int, int], None]  # (task, done, total)


def _model(run_or_model: Run | nn.Module) -> nn.Module:
    return run_or_model.model if isinstance(run_or_model, Run) else run_or_model


def gradcam_site(model: nn.Module, img_size: int | None = None) -> str:
    """Where Grad-CAM looks: the deepest site of the model (the last of ``model.sites``); for a baseline
    without sites, the feature level before the final one (the default site of a gate, see ``layers``).
    """
    if not isinstance(model, AttentionModel):
        raise TypeError("gradcam_site needs an attnzoo model; for another module pass gradcam(..., site=NAME)")
    if model.sites:
        return model.sites[-1]
    return next(s.name for s in layers(model.backbone_name, img_size) if s.default_gate)


def gradcam_label(model: nn.Module, img_size: int | None = None) -> str:
    return f"Grad-CAM at {gradcam_site(model, img_size)}"


def _site_to_map(model: nn.Module, site: str, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The site's output as ``[B, C, h, w]``, reshaping ViT tokens to their grid as the model's hooks do."""
    if not isinstance(model, AttentionModel):
        return lambda t: t
    info = model.site_info.get(site) or next(s for s in layers(model.backbone_name, img_size) if s.name == site)
    return functools.partial(to_map, info)


def gradcam(run_or_model: Run | nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
            site: str | None = None, bs: int = 32) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) at ``site``: ``[B, h, w]``, float32.

    ``ReLU(sum_c w_c A_c)`` with ``A`` the site's output and ``w_c`` the spatial mean of the gradient of the
    ``target`` class logit (default: the predicted class) with respect to ``A_c``. ``site`` defaults to
    ``gradcam_site(model)``; for a module that is not an attnzoo model, name it (a ``named_modules`` name).
    Parameters' ``.grad`` are left untouched; the model is put back in its training mode.
    """
    model = _model(run_or_model)
    img_size = int(x.shape[-1])
    site = site or gradcam_site(model, img_size)
    body = model.backbone if isinstance(model, AttentionModel) else model
    module = body.get_submodule(site)
    to_map = _site_to_map(model, site, img_size)
    device = next(model.parameters()).device
    targets = None if target is None else torch.as_tensor(target).long().reshape(-1).expand(len(x))
    kept: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        kept["act"] = out
        out.register_hook(lambda g: kept.__setitem__("grad", g))

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(keep)
    cams = []
    try:
        for start in range(0, len(x), bs):
            chunk = x[start : start + bs].detach().to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(chunk)
                t = logits.argmax(-1) if targets is None else targets[start : start + bs].to(device)
                logits.gather(1, t[:, None]).sum().backward(inputs=[kept["act"]])
            act, grad = to_map(kept["act"].detach()).float(), to_map(kept["grad"]).float()
            weights = grad.mean((2, 3), keepdim=True)
            cams.append(torch.relu((weights * act).sum(1)).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(cams)


# --------------------------------------------------------------------------- faithfulness


def deletion_curves(run_or_model: Run | nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor,
                    maps: Mapping[str, torch.Tensor | np.ndarray], steps: int = 10, fill: float = 0.0,
                    seed: int = 0, bs: int = 64, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Deletion curves (Petsiuk et al., 2018, RISE, https://arxiv.org/abs/1806.07421): the mean probability
    of the ``target`` class as the pixels a map ranks highest are deleted first, ``1/steps`` of them at a time.

    ``maps[name]`` is ``[N, h, w]`` aligned with ``x``; each is upsampled bilinearly to the image. Deleted
    pixels become ``fill`` in normalised space (0: the normalisation mean colour). Ties are broken by the
    same seeded noise for every map. Returns ``{name: [steps + 1]}`` from 0% to 100% deleted; the area under
    a curve (``deletion_auc``) is lower when the map finds what the prediction rests on.
    """
    model = _model(run_or_model)
    device = next(model.parameters()).device
    n, _, h, w = x.shape
    target = torch.as_tensor(target).long().reshape(-1)
    inner = torch.tensor([round(k / steps * h * w) for k in range(1, steps)])  # 0% and 100% are the same for all
    jitter = torch.rand(n, h * w, generator=torch.Generator().manual_seed(seed)) * 1e-6
    ranks = torch.stack([
        (torch.stack([torch.from_numpy(viz.upsample_map(m, (h, w))) for m in ms]).flatten(1) + jitter)
        .argsort(1, descending=True).argsort(1).view(n, 1, h, w).int() for ms in maps.values()])
    fill_t = torch.tensor(fill, dtype=x.dtype)

    def p_target(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return model(images.to(device)).float().softmax(-1).cpu().gather(1, which[:, None])[:, 0]

    was_training = model.training
    model.eval()
    probs = torch.zeros(len(maps), n, steps + 1)
    total = len(maps) * n * len(inner)  # one job per (map, image, inner step), run in batches of bs
    try:
        with torch.no_grad():
            probs[:, :, 0] = torch.cat([p_target(x[i : i + bs], target[i : i + bs]) for i in range(0, n, bs)])
            blank = model(torch.full_like(x[:1], fill).to(device)).float().softmax(-1).cpu()[0]
            probs[:, :, -1] = blank[target]
            for start in range(0, total, bs):
                if progress is not None:
                    progress("deletion curves", start, total)
                job = torch.arange(start, min(start + bs, total))
                m, i, k = job // (n * len(inner)), job // len(inner) % n, job % len(inner)
                xm = torch.where(ranks[m, i] < inner[k].view(-1, 1, 1, 1), fill_t, x[i])
                probs[m, i, k + 1] = p_target(xm, target[i])
    finally:
        model.train(was_training)
    if progress is not None:
        progress("deletion curves", total, total)
    return {name: probs[j].mean(0).numpy() for j, name in enumerate(maps)}
