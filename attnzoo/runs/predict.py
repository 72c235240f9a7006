"""A trained run, ready to predict: ``load_run`` builds its model from the run folder, with its classes and
preprocessing. JSON and safetensors only, never a pickle.

Loading needs neither fastai nor torchvision: preprocessing is PIL + torch, as in training (squash resize,
then the backbone's normalisation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import AttnzooError
from ..model.create import AttentionModel, create_model
from .folder import CONFIG, WEIGHTS, RunFolder, weights_header


@dataclass
class Run:
    """A trained model with what it needs to predict: classes and preprocessing."""

    model: AttentionModel
    classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def load_image(self, image: str | os.PathLike | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            from ..train.data import to_rgb

            return to_rgb(image)
        path = Path(image)
        if not path.is_file():
            raise AttnzooError(f"image not found: {path}")
        from ..train.data import open_rgb

        try:
            return open_rgb(path, self.img_size)  # refuses decompression bombs before decoding
        except Exception as e:
            raise AttnzooError(f"cannot read image {path}: {e}") from None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised [3, S, S] tensor, as in training (squash resize)."""
        im = image.convert("RGB").resize((self.img_size, self.img_size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def predict(self, images: Sequence[Any], bs: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class probabilities [N, C] and attention maps {site: [N, h, w]} for images (paths, PIL or tensors)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        probs, maps = [], {}
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            x = torch.stack([im if isinstance(im, torch.Tensor) else self.preprocess(self.load_image(im))
                             for im in chunk]).to(device)
            out = self.model(x).float()
            bad = (~torch.isfinite(out).all(1)).nonzero().flatten().tolist()
            if bad:  # a NaN probability is no prediction: broken weights or preprocessing, never "blue nan%"
                what = chunk[bad[0]] if not isinstance(chunk[bad[0]], torch.Tensor) else f"input {start + bad[0]}"
                raise AttnzooError(f"the model of {self.path or 'this run'} gives NaN/inf for {what}: its weights "
                                   f"or its preprocessing (mean/std in {CONFIG}) are broken")
            probs.append(out.softmax(-1).cpu())
            for site, m in self.model.attention_maps().items():
                maps.setdefault(site, []).append(m.cpu())
        return torch.cat(probs), {k: torch.cat(v) for k, v in maps.items()}

    def top(self, probs: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.classes))
        values, idx = probs.topk(k, dim=-1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, idx.tolist())]


def _check_shapes(model: torch.nn.Module, weights: Path, n_classes: int) -> None:
    """Every tensor in ``weights`` has the shape the model built from ``attnzoo.json`` expects."""
    found = {k: tuple(v["shape"]) for k, v in weights_header(weights).items()}
    for name, tensor in model.state_dict().items():
        want, got = tuple(tensor.shape), found.get(name)
        if got is None or got == want:
            continue
        if want[:1] == (n_classes,) and got[:1] != want[:1]:  # the classifier: its outputs are the classes
            raise AttnzooError(f"{weights.parent / CONFIG}: classes: {n_classes} names, but the weights in "
                               f"{weights.name} have {got[0]} classes")
        raise AttnzooError(f"{weights} does not fit the model in {CONFIG}: {name} is {list(got)} there, "
                           f"{list(want)} in the model")


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """A ready model from a run folder, with its classes and preprocessing. Never unpickles anything."""
    from safetensors.torch import load_model

    folder = RunFolder(path)
    config = folder.read_config()
    cfg_path = folder.path / CONFIG
    try:
        model = create_model(config["backbone"], config.get("attn"), at=config.get("sites") or None,
                             num_classes=len(config["classes"]), img_size=config["img_size"],
                             **config.get("attn_options", {}))
    except AttnzooError as e:
        raise AttnzooError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise AttnzooError(f"{cfg_path}: cannot build the model it describes: {type(e).__name__}: {e}") from None
    weights = folder.path / WEIGHTS
    if not weights.is_file():
        status = config.get("status")
        why = f" (status: {status})" if status and status != "done" else ""
        raise AttnzooError(f"run folder has no weights ({WEIGHTS}){why}: {folder.path}")
    _check_shapes(model, weights, len(config["classes"]))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # a damaged file whose header still reads
        raise AttnzooError(f"{weights} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    if missing or unexpected:
        raise AttnzooError(f"{weights} does not fit the model in {CONFIG}: "
                           f"{len(missing)} missing, {len(unexpected)} unexpected tensors")
    model.eval()
    model.set_preprocessing(config["img_size"], config["mean"], config["std"], config["classes"])  # timm's data config
    return Run(model.to(device), list(config["classes"]), config["img_size"], tuple(config["mean"]),
               tuple(config["std"]), config, folder.path)
