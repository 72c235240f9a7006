"""A timm backbone with its weights: timm's pretrained ones (from the Hugging Face Hub or its cache), or a
local file, never unpickled.

Knowing in a few seconds that the hub cannot be reached: without network the hub client retries every
download for about a minute before it gives up; one short connection attempt tells the same. Weights already
in the local cache still load: the download then runs in the hub's offline mode, which reads the cache and
fails at once when the file is not there.

torch and timm are imported by the functions that use them: ``attnzoo push`` asks ``unreachable()`` before any
heavy import, so that an offline push fails in a second.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import AttnzooError, PretrainedUnavailable, UnknownNameError

if TYPE_CHECKING:
    import torch
    from torch import nn

PROBE_TIMEOUT_S = 3.0


def unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it may be (then the hub client finds out itself)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy can say
    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or type(e).__name__}"
    return None


@contextmanager
def offline(on: bool = True) -> Iterator[None]:
    """The hub's offline mode while inside: cached files load, anything else fails at once."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def build_backbone(backbone: str, num_classes: int, pretrained: bool, pretrained_file: str | None,
                    **timm_kwargs: Any) -> nn.Module:
    from .sites import timm_model

    kwargs: dict[str, Any] = dict(num_classes=num_classes, **timm_kwargs)
    if pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}),
                                            "state_dict": load_weights_file(Path(pretrained_file))}
        pretrained = True
    why_offline = unreachable() if pretrained and pretrained_file is None else None  # seconds, not a minute
    try:
        with offline(why_offline is not None):
            return timm_model(backbone, pretrained=pretrained, **kwargs)
    except UnknownNameError:
        raise
    except RuntimeError as e:
        if pretrained_file is not None and ("size mismatch" in str(e) or "Missing key" in str(e)):
            first = str(e).strip().splitlines()[0:2]
            raise AttnzooError(f"weights file {pretrained_file} does not fit '{backbone}': {' '.join(first)}") from e
        if pretrained_file is None and pretrained:
            raise PretrainedUnavailable(_offline_message(backbone, e, why_offline)) from e
        raise
    except Exception as e:
        if pretrained_file is None and pretrained:
            raise PretrainedUnavailable(_offline_message(backbone, e, why_offline)) from e
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

    import torch

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
