"""Post-hoc explanations of a model's decision, and the model-side half of their evaluation.

- **Class activation maps** from pytorch-grad-cam (https://github.com/jacobgil/pytorch-grad-cam): ``cam`` runs
  one of its methods (``CAM_METHODS``) at a layer, one batched pass per chunk of images, and returns the map at
  the layer's own resolution, before any upsampling or rescaling (an all-zero map stays zero). The default layer
  is the final feature level, as pytorch-grad-cam's README recommends (``cam_layer``); ViT tokens are put on their
  grid by the model's ``to_map`` as its ``reshape_transform``.
- **Perturbation curves**: deletion and insertion (Petsiuk et al., 2018, RISE, https://arxiv.org/abs/1806.07421),
  and ROAD (Rong et al., 2022, https://arxiv.org/abs/2202.00449) through pytorch-grad-cam's implementation.
- **Model randomisation** (Adebayo et al., 2018, "Sanity Checks for Saliency Maps",
  https://arxiv.org/abs/1810.03292): ``randomized_model`` re-initialises a copy's weights from the head down.

Everything here needs the model; the scores computed from maps alone live in ``attnzoo.explain.metrics``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import AttnzooError, UnknownNameError
from ..model.create import AttentionModel
from ..model.sites import layers, to_map
from ..runs.predict import Run
from .metrics import upsample_map

Progress = Callable[[str, int, int], None]  # (task, done, total)
Target = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class CamMethod:
    """A pytorch-grad-cam method: its class name there, the name figures and tables use, and its paper."""

    cls: str
    label: str
    paper: str


CAM_METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("GradCAM", "Grad-CAM", "https://arxiv.org/abs/1610.02391"),
    "hirescam": CamMethod("HiResCAM", "HiResCAM", "https://arxiv.org/abs/2011.08891"),
    "gradcam++": CamMethod("GradCAMPlusPlus", "Grad-CAM++", "https://arxiv.org/abs/1710.11063"),
    "xgradcam": CamMethod("XGradCAM", "XGrad-CAM", "https://arxiv.org/abs/2008.02312"),
    "layercam": CamMethod("LayerCAM", "LayerCAM", "https://ieeexplore.ieee.org/document/9462463"),
    "scorecam": CamMethod("ScoreCAM", "Score-CAM", "https://arxiv.org/abs/1910.01279"),
    "eigencam": CamMethod("EigenCAM", "Eigen-CAM", "https://arxiv.org/abs/2008.00299"),
}


def cam_methods(names: str | Sequence[str]) -> list[str]:
    """``"gradcam,scorecam"`` or ``["gradcam", "scorecam"]`` as a list of known method names, in order, once each."""
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for name in (n.strip().lower() for n in item.split(",")):
            if name not in CAM_METHODS:
                raise UnknownNameError("CAM method", name, CAM_METHODS, show_all=True)
            if name not in out:
                out.append(name)
    if not out:
        raise AttnzooError(f"no CAM method given; choose among {', '.join(CAM_METHODS)}")
    return out


def _model(run_or_model: Run | nn.Module) -> nn.Module:
    return run_or_model.model if isinstance(run_or_model, Run) else run_or_model


def cam_layer(model: nn.Module, img_size: int | None = None) -> str:
    """Where a CAM looks by default: for a readout, its deepest tap; else the backbone's final feature level, or
    the last one with at least 2 x 2
    cells when the final one is a single cell at this image size (a 1 x 1 map cannot show where). For tokens
    (ViT), the final block's first norm, as pytorch-grad-cam's README does: a class-token head gives the
    block's own output no gradient at the patch tokens, so every CAM there would be zero."""
    if not isinstance(model, AttentionModel):
        raise TypeError("cam_layer needs an attnzoo model; for another module pass cam(..., layer=NAME)")
    if model.readout is not None:
        # a readout classifies from its taps; with LPA's softmax the global feature adds one constant to every
        # score and cancels, so the final level reaches the logits only through rounding and a CAM there is
        # noise (1e-17 on the quick-start run): the deepest tap is the last layer the decision reads
        return model.sites[-1]
    sites = layers(model.backbone_name, img_size)
    levels = [s for s in sites if s.level is not None]
    last = ([s for s in levels if s.size[0] * s.size[1] > 1] or levels)[-1]
    norm = f"{last.name}.norm1"
    return norm if last.fmt == "NLC" and any(s.name == norm for s in sites) else last.name


def cam_label(method: str, layer: str) -> str:
    """``"Grad-CAM at layer4"``: the name of a CAM in figures, tables and attnzoo.json."""
    return f"{CAM_METHODS[method].label} at {layer}"


def gradcam_site(model: nn.Module, img_size: int | None = None) -> str:
    """Where ``gradcam`` looks by default (``cam_layer``)."""
    return cam_layer(model, img_size)


def gradcam_label(model: nn.Module, img_size: int | None = None) -> str:
    return cam_label("gradcam", cam_layer(model, img_size))


def _reshape_for(model: nn.Module, layer: str, img_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's ``reshape_transform`` for ``layer``: ViT tokens to ``[B, C, h, w]``, as the model's own
    hooks do; None for a feature map that already is one."""
    if not isinstance(model, AttentionModel):
        return None
    info = model.site_info.get(layer) or next(s for s in layers(model.backbone_name, img_size) if s.name == layer)
    return None if info.fmt == "NCHW" else functools.partial(to_map, info)


def _targets(target: Target, n: int) -> torch.Tensor | None:
    return None if target is None else torch.as_tensor(target).long().reshape(-1).expand(n)


def cam(run_or_model: Run | nn.Module, x: torch.Tensor, target: Target = None, method: str = "gradcam",
        layer: str | None = None, bs: int = 32) -> torch.Tensor:
    """The ``method`` CAM (a key of ``CAM_METHODS``) at ``layer`` for the ``target`` class (default: the
    predicted one): ``[B, h, w]`` float32 at the layer's resolution, ReLU applied, not rescaled.

    pytorch-grad-cam's method object computes it from the layer's activations and gradients; upsampling it
    with ``pytorch_grad_cam.utils.image.scale_cam_image`` gives exactly what calling that object gives.
    ``layer`` defaults to ``cam_layer(model)``; for a module that is not an attnzoo model, name it (a
    ``named_modules`` name). Parameters' ``.grad`` are left untouched; the model gets its training mode back.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method = cam_methods(method)[0]
    model = _model(run_or_model)
    img_size = int(x.shape[-1])
    layer = layer or cam_layer(model, img_size)
    body = model.backbone if isinstance(model, AttentionModel) else model
    module = body.get_submodule(layer)
    device = next(model.parameters()).device
    targets = _targets(target, len(x))
    was_training = model.training
    explainer = getattr(pytorch_grad_cam, CAM_METHODS[method].cls)(
        model=model, target_layers=[module], reshape_transform=_reshape_for(model, layer, img_size))
    explainer.batch_size = bs  # Score-CAM's masked forward passes
    hooks = explainer.activations_and_grads
    cams = []
    try:
        for start in range(0, len(x), bs):
            chunk = x[start : start + bs].detach().to(device)
            with torch.enable_grad() if explainer.uses_gradients else torch.no_grad():
                chunk.requires_grad_(explainer.uses_gradients)
                logits = hooks(chunk)
                t = logits.argmax(-1) if targets is None else targets[start : start + bs].to(device)
                if explainer.uses_gradients:  # gradients reach the layer's hook; none are left on parameters
                    torch.autograd.grad(logits.gather(1, t[:, None]).sum(), chunk)
            with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's own progress bar
                m = explainer.get_cam_image(chunk.detach(), module, [ClassifierOutputTarget(int(c)) for c in t],
                                            hooks.activations[0].numpy(),
                                            hooks.gradients[0].numpy() if hooks.gradients else None, False)
            cams.append(torch.from_numpy(np.maximum(m, 0)).float())
    finally:
        hooks.release()
        model.train(was_training)
    return torch.cat(cams)


def gradcam(run_or_model: Run | nn.Module, x: torch.Tensor, target: Target = None, site: str | None = None,
            bs: int = 32) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) at ``site``: ``cam(method="gradcam")``."""
    return cam(run_or_model, x, target, "gradcam", site, bs)


def _ranks(maps: Mapping[str, torch.Tensor | np.ndarray], n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """``[maps, n, 1, h, w]``: each pixel's rank (0 = highest) in its bilinearly upsampled map; ties broken by
    the same seeded noise for every map."""
    jitter = torch.rand(n, h * w, generator=torch.Generator().manual_seed(seed)) * 1e-6
    return torch.stack([
        (torch.stack([torch.from_numpy(upsample_map(m, (h, w))) for m in ms]).float().flatten(1) + jitter)
        .argsort(1, descending=True).argsort(1).view(n, 1, h, w).int() for ms in maps.values()])


def perturbation_curves(run_or_model: Run | nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor,
                        maps: Mapping[str, torch.Tensor | np.ndarray], mode: str = "deletion", steps: int = 10,
                        fill: float = 0.0, seed: int = 0, bs: int = 64,
                        progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Deletion or insertion curves (Petsiuk et al., 2018, RISE, https://arxiv.org/abs/1806.07421): the mean
    probability of the ``target`` class as the pixels a map ranks highest are deleted from the image
    (``mode="deletion"``), or inserted into a blank canvas (``"insertion"``), ``1/steps`` of them at a time.

    ``maps[name]`` is ``[N, h, w]`` aligned with ``x``; each is upsampled bilinearly to the image. Deleted
    pixels, and the canvas, are ``fill`` in normalised space (0: the normalisation mean colour). Returns
    ``{name: [steps + 1]}`` from 0% to 100% perturbed; ``metrics.curve_auc`` of a deletion curve is lower, of an
    insertion curve higher, when the map finds what the prediction rests on.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    model = _model(run_or_model)
    device = next(model.parameters()).device
    n, _, h, w = x.shape
    target = torch.as_tensor(target).long().reshape(-1)
    inner = torch.tensor([round(k / steps * h * w) for k in range(1, steps)])  # 0% and 100% are the same for all
    ranks = _ranks(maps, n, h, w, seed)
    fill_t = torch.tensor(fill, dtype=x.dtype)
    task = f"{mode} curves"

    def p_target(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return model(images.to(device)).float().softmax(-1).cpu().gather(1, which[:, None])[:, 0]

    was_training = model.training
    model.eval()
    probs = torch.zeros(len(maps), n, steps + 1)
    total = len(maps) * n * len(inner)  # one job per (map, image, inner step), run in batches of bs
    try:
        with torch.no_grad():
            full = torch.cat([p_target(x[i : i + bs], target[i : i + bs]) for i in range(0, n, bs)])
            blank = model(torch.full_like(x[:1], fill).to(device)).float().softmax(-1).cpu()[0][target]
            probs[:, :, 0], probs[:, :, -1] = (full, blank) if mode == "deletion" else (blank, full)
            for start in range(0, total, bs):
                if progress is not None:
                    progress(task, start, total)
                job = torch.arange(start, min(start + bs, total))
                m, i, k = job // (n * len(inner)), job // len(inner) % n, job % len(inner)
                chosen = ranks[m, i] < inner[k].view(-1, 1, 1, 1)
                xm = torch.where(chosen, fill_t, x[i]) if mode == "deletion" else torch.where(chosen, x[i], fill_t)
                probs[m, i, k + 1] = p_target(xm, target[i])
    finally:
        model.train(was_training)
    if progress is not None:
        progress(task, total, total)
    return {name: probs[j].mean(0).numpy() for j, name in enumerate(maps)}


def deletion_curves(run_or_model: Run | nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor,
                    maps: Mapping[str, torch.Tensor | np.ndarray], steps: int = 10, fill: float = 0.0,
                    seed: int = 0, bs: int = 64, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """``perturbation_curves(mode="deletion")``."""
    return perturbation_curves(run_or_model, x, target, maps, "deletion", steps, fill, seed, bs, progress)


def road_scores(run_or_model: Run | nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor,
                maps: Mapping[str, torch.Tensor | np.ndarray], percentiles: Sequence[int] = (20, 40, 60, 80),
                seed: int = 0, bs: int = 32, progress: Progress | None = None) -> dict[str, float]:
    """ROAD (Rong et al., 2022, https://arxiv.org/abs/2202.00449) through pytorch-grad-cam's ``ROADCombined``:
    pixels are removed by noisy linear imputation from their neighbours (so that the image stays in
    distribution), least relevant first and most relevant first at each of ``percentiles``, and the score is
    the mean of (drop when removing the least relevant - drop when removing the most relevant) / 2 of the
    ``target`` class's probability. Higher is more faithful; a map that knows nothing scores about 0.
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _model(run_or_model)
    device = next(model.parameters()).device
    n, _, h, w = x.shape
    target = torch.as_tensor(target).long().reshape(-1)
    metric = ROADCombined(percentiles=list(percentiles))
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the imputer's noise
            for j, (name, ms) in enumerate(maps.items()):
                if progress is not None:
                    progress("ROAD", j, len(maps))
                scores = []
                for start in range(0, n, bs):
                    cams = np.stack([upsample_map(m, (h, w)) for m in ms[start : start + bs]]).astype(np.float32)
                    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target[start : start + bs]]
                    scores.append(metric(x[start : start + bs].to(device), cams, targets, model))
                out[name] = float(np.mean(np.concatenate(scores)))
    finally:
        model.train(was_training)
    if progress is not None:
        progress("ROAD", len(maps), len(maps))
    return out


def randomized_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight re-initialised, from the head down: the last step of Adebayo et
    al.'s cascading randomisation. Modules with ``reset_parameters`` use it (and their own initialisation);
    any other parameter is redrawn from a normal distribution with its own mean and standard deviation."""
    rebuilt = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in reversed(list(rebuilt.modules())):
            if hasattr(module, "reset_parameters") and module is not rebuilt:
                module.reset_parameters()
                continue
            for p in module.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(float(p.mean()), std or 0.02)
    if isinstance(rebuilt, AttentionModel):
        rebuilt.capture_maps(True)
    return rebuilt.eval()
