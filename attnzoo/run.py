"""The run folder: what ``fit`` writes and ``load_run`` reads. JSON and safetensors only, never a pickle.

    runs/<name>/attnzoo.json       config, classes, preprocessing, versions, metrics, skipped files
    runs/<name>/model.safetensors  the weights
    runs/<name>/history.csv        one row per epoch
    runs/<name>/*.png              plots

Loading needs neither fastai nor torchvision: preprocessing is PIL + torch, as in training (squash
resize, then the backbone's normalisation).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import AttnzooError
from .model import AttentionModel, create_model

CONFIG = "attnzoo.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename: a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("attnzoo", "torch", "timm", "fastai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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
            from .data import to_rgb

            return to_rgb(image)
        path = Path(image)
        if not path.is_file():
            raise AttnzooError(f"image not found: {path}")
        from .data import open_rgb

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
            probs.append(self.model(x).float().softmax(-1).cpu())
            for site, m in self.model.attention_maps().items():
                maps.setdefault(site, []).append(m.cpu())
        return torch.cat(probs), {k: torch.cat(v) for k, v in maps.items()}

    def top(self, probs: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.classes))
        values, idx = probs.topk(k, dim=-1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, idx.tolist())]


def save_run(path: str | os.PathLike, model: AttentionModel, config: dict[str, Any],
             history: Iterable[dict[str, float]] = ()) -> Path:
    """Write the run folder (atomically, file by file)."""
    from safetensors.torch import save_model

    path = Path(path)
    history = list(history)
    config = dict(config)
    config["metrics"] = dict(config.get("metrics") or {})
    config["metrics"]["per_epoch"] = history
    if history:
        config["metrics"]["final"] = {k: v for k, v in history[-1].items() if k not in ("epoch", "time")}
    _atomic_write(path / WEIGHTS, lambda tmp: save_model(model, str(tmp)))
    if history:
        def write_csv(tmp: Path) -> None:
            keys = list(dict.fromkeys(k for row in history for k in row))
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(history)

        _atomic_write(path / "history.csv", write_csv)
    write_config(path, config)
    return path


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """(Re)write ``attnzoo.json`` atomically, with the format version and package versions."""
    config = {"format": FORMAT_VERSION, **config, "versions": versions()}
    _atomic_write(Path(path) / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2, default=str)))


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """A ready model from a run folder, with its classes and preprocessing. Never unpickles anything."""
    from safetensors.torch import load_model

    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise AttnzooError(f"not a run folder (no {CONFIG}): {path}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AttnzooError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        model = create_model(config["backbone"], config.get("attn"), at=config.get("sites") or None,
                             num_classes=len(config["classes"]), img_size=config["img_size"],
                             **config.get("attn_options", {}))
    except KeyError as e:
        raise AttnzooError(f"{cfg_path} lacks {e}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        status = config.get("status")
        why = f" (status: {status})" if status and status != "done" else ""
        raise AttnzooError(f"run folder has no weights ({WEIGHTS}){why}: {path}")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # not a safetensors file (it is never unpickled), or a damaged one
        raise AttnzooError(f"{weights} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    if missing or unexpected:
        raise AttnzooError(f"{weights} does not fit the model in {CONFIG}: "
                           f"{len(missing)} missing, {len(unexpected)} unexpected tensors")
    model.eval()
    return Run(model.to(device), list(config["classes"]), int(config["img_size"]), tuple(config["mean"]),
               tuple(config["std"]), config, path)


def latest_run(root: str | os.PathLike = "runs") -> Path:
    """The newest run folder under ``root``."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{CONFIG}") if (p.parent / WEIGHTS).is_file()] if root.is_dir() else []
    if not runs:
        raise AttnzooError(f"no run folder under {root}/ (train one with `attnzoo fit`, or pass --run DIR)")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)
