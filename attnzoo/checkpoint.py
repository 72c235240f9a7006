"""Checkpoints, interruption and numerical faults during ``fit``: everything needed to lose nothing.

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
import math
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import get_model

from . import distributed
from .errors import AttnzooError
from .run import _atomic_write

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"
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
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)}))


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


# --- callbacks -------------------------------------------------------------------------------------------------

class Checkpoints(Callback):
    """After every completed epoch: ``last`` (model, optimiser, history, random states) and ``best``."""

    order = 65  # after the Recorder (50) and History (60)

    def __init__(self, run_dir: Path, history: Any, epoch_offset: int = 0, best: dict[str, Any] | None = None,
                 monitor: str = "valid_loss") -> None:
        self.run_dir, self.history, self.offset, self.monitor = Path(run_dir), history, epoch_offset, monitor
        self.best = best or {}
        self.enabled = True

    def before_epoch(self) -> None:
        self._skipped = False

    def after_cancel_epoch(self) -> None:
        self._skipped = True  # fastai's SkipToEpoch on resume: nothing was trained

    def after_epoch(self) -> None:
        if self._skipped or not self.enabled or not self.history.rows:
            return
        row = self.history.rows[-1]
        epoch = self.offset + self.epoch + 1
        model = get_model(self.learn.model)  # the module itself, not a DistributedDataParallel wrapper
        score = row.get(self.monitor)
        if score is not None and math.isfinite(score) and score < self.best.get("score", math.inf):
            self.best = {"epoch": epoch, "monitor": self.monitor, "score": score}
            save_checkpoint(self.run_dir / BEST, None, model, {"epoch": epoch, "best": self.best})
        smooth = self.learn.recorder.smooth_loss
        meta = {"epoch": epoch, "history": self.history.rows, "best": self.best, "rng": rng_state(self.learn),
                "smooth_loss": [int(smooth.count), float(smooth.val)]}
        save_checkpoint(self.run_dir / LAST, self.learn, model, meta)


class RestoreSmoothLoss(Callback):
    """On resume, carry fastai's smoothed training loss across the break, as an uninterrupted run would."""

    order = 51  # right after the Recorder resets it in before_fit

    def __init__(self, count: int, val: float) -> None:
        self.count, self.val = count, val

    def before_fit(self) -> None:
        self.learn.recorder.smooth_loss.count = self.count
        self.learn.recorder.smooth_loss.val = torch.tensor(self.val)


class StopOnSignal(Callback):
    """SIGINT/SIGTERM end the current batch, then training stops (``fit`` saves and says how to resume).
    A second signal is not caught: it stops at once. Under a launcher the processes agree every ``every``
    batches (one small all-reduce), so all of them stop at the same batch."""

    order = 0

    def __init__(self, every: int = 8) -> None:
        self.signum: int | None = None  # the signal, once this process (or, launched, any process) stops
        self._received: int | None = None
        self._old: dict[int, Any] = {}
        self.every = every

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._received = signum
        self.uninstall()  # the next one acts at once

    def _decide(self) -> None:
        received = self._received
        if distributed.is_distributed():
            received = distributed.all_reduce_int(received or 0, "max") or None
        if received is not None:
            self.signum = received
            raise CancelFitException

    def after_batch(self) -> None:
        if not distributed.is_distributed() or (self.iter + 1) % self.every == 0:
            self._decide()

    def before_epoch(self) -> None:
        self._decide()


class NanGuard(Callback):
    """Stops training when a number goes bad: a NaN/inf training loss (checked on the device and read back every
    ``every`` batches and at the end of each epoch, so no host-device sync per batch), or a NaN/inf validation
    loss or metric at the end of an epoch (before that epoch is checkpointed, so ``best`` and ``last`` stay
    finite). Each attention module's output is watched too (on the device): when one turned finite features
    into NaN/inf, ``failure`` names it."""

    order = 1

    def __init__(self, epoch_offset: int = 0, every: int = 16) -> None:
        self.offset, self.every = epoch_offset, every
        self.failure: str | None = None  # what went bad, where (epochs and batches 1-based)
        self.blamed: list[str] = []  # attention modules whose output went bad on finite input
        self._watch: list[_FiniteWatch] = []

    def before_fit(self) -> None:
        model = get_model(self.learn.model)
        named = getattr(model, "named_attention_modules", lambda: [])()
        self._watch = [_FiniteWatch(label, module) for label, module in named]

    def after_fit(self) -> None:
        for w in self._watch:
            w.remove()

    def before_epoch(self) -> None:
        self._first_bad: torch.Tensor | None = None

    def after_loss(self) -> None:
        if not self.training:
            return
        loss = self.learn.loss.detach()
        bad = ~torch.isfinite(loss).all()
        first = self._first_bad if self._first_bad is not None else torch.full((), -1, device=loss.device)
        self._first_bad = torch.where(bad & (first < 0), self.iter, first)
        if (self.iter + 1) % self.every == 0:
            self._check()

    def _fail(self, what: str) -> None:
        self.blamed = [w.label for w in self._watch if w.fired()]
        if self.blamed:
            what += f"; {' and '.join(self.blamed)} turned finite features into NaN/inf"
        self.failure = what
        raise CancelFitException

    def _check(self) -> None:
        index = -1 if self._first_bad is None else int(self._first_bad)
        if distributed.is_distributed():  # every process checks at the same batches; the earliest bad one counts
            index = distributed.all_reduce_int(index if index >= 0 else 2**62, "min")
            index = -1 if index == 2**62 else index
        if index >= 0:
            self._fail(f"the training loss became NaN/inf at epoch {self.offset + self.epoch + 1}, batch {index + 1}")

    def after_train(self) -> None:
        self._check()

    def after_epoch(self) -> None:
        # the Recorder (a later order) has not filed this epoch yet; its log holds the validation numbers
        log = list(getattr(self.recorder, "log", [])[1:])
        names = list(self.recorder.metric_names[1:-1])
        bad = [f"{n} {v}" for n, v in zip(names, log) if isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad:  # validation numbers are gathered over every process, so all of them stop here together
            self._fail(f"{', '.join(bad)} at epoch {self.offset + self.epoch + 1}")


class _FiniteWatch:
    """A forward hook flagging, on the device, a module whose output is NaN/inf while its input is finite."""

    def __init__(self, label: str, module: torch.nn.Module) -> None:
        self.label, self.flag = label, None
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module: Any, inputs: Any, output: Any) -> None:
        flat_in = [t for t in _tensors(inputs) if t.is_floating_point()]
        flat_out = [t for t in _tensors(output) if t.is_floating_point()]
        if not flat_out:
            return
        with torch.no_grad():
            ok_in = torch.stack([torch.isfinite(t).all() for t in flat_in]).all() if flat_in else True
            bad = torch.stack([~torch.isfinite(t).all() for t in flat_out]).any() & ok_in
            self.flag = bad if self.flag is None else self.flag | bad

    def fired(self) -> bool:
        return self.flag is not None and bool(self.flag)

    def remove(self) -> None:
        self.handle.remove()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
