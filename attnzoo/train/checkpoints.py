"""Checkpoint files: everything needed to lose nothing of a run that stops (the callbacks that write them and
that stop a run are in ``callbacks``).

    <run>/checkpoints/last.safetensors   after every epoch: model + optimiser state (tensors) and, in the
                                         safetensors metadata, the epoch, the history, the best score and
                                         every random-number state (python, numpy, torch, the DataLoaders)
    <run>/checkpoints/best.safetensors   the model at the epoch with the lowest validation loss

Both are one file each, written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint; nothing is ever pickled. ``fit(resume=RUN)`` rebuilds the Learner from the run's settings, loads
``last`` and continues the same one-cycle schedule from the next epoch (fastai's ``start_epoch``): with the
random states restored, the result is the one an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttnzooError
from ..runs.outputs import replace

META_KEY = "attnzoo_checkpoint"


# --- random states ---------------------------------------------------------------------------------------------

def rng_state(learn: Any) -> dict[str, Any]:
    """Every random state the next epoch draws from, as JSON."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "loaders": [],
    }
    for dl in learn.dls.loaders:
        v, m, g = dl.rng.getstate()
        state["loaders"].append([v, list(m), g])
    return state


def set_rng_state(learn: Any, state: dict[str, Any]) -> None:
    v, mt, g = state["python"]
    random.setstate((v, tuple(mt), g))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    for dl, (v, m, g) in zip(learn.dls.loaders, state["loaders"]):
        dl.rng.setstate((v, tuple(m), g))


# --- optimiser state without pickle ----------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def optimizer_tensors(opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fastai optimiser state -> (tensors, JSON): per-parameter tensors by index, everything else as JSON."""
    sd = opt.state_dict()
    tensors, plain = {}, []
    for i, st in enumerate(sd["state"]):
        rest = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{i}.{k}"] = v.detach().contiguous()
            else:
                rest[k] = _plain(v)
        plain.append(rest)
    return tensors, {"state": plain, "hypers": [{k: _plain(v) for k, v in h.items()} for h in sd["hypers"]]}


def load_optimizer(opt: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: Any) -> None:
    state = [dict(s) for s in meta["state"]]
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            state[int(i)][name] = value.to(device)
    opt.load_state_dict({"state": state, "hypers": [dict(h) for h in meta["hypers"]]})


# --- writing and reading checkpoints ---------------------------------------------------------------------------

def save_checkpoint(path: Path, learn: Any | None, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """One safetensors file: ``model.*`` tensors, ``optimizer.*`` tensors when ``learn`` is given, ``meta``
    (JSON) in the header. Written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if learn is not None and learn.opt is not None:
        opt_tensors, meta["optimizer"] = optimizer_tensors(learn.opt)
        tensors.update(opt_tensors)
    # tied weights and views share storage, which safetensors refuses: the second one on a storage is copied
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    replace(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)}))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise AttnzooError(f"no checkpoint to resume from: {path} (the run stopped before its first epoch ended)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
        return load_file(str(path)), meta
    except Exception as e:
        raise AttnzooError(f"{path} is not an attnzoo checkpoint: {type(e).__name__}: {e}") from None


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AttnzooError(f"checkpoint does not fit the model: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected tensors")
