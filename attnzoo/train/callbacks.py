"""The callbacks of a training run, each with one job: fastai's loop stays generic.

Progress and history (``RichProgress``, ``History``), numerics (``FlushDenormals``, ``NanGuard``), stopping
(``StopOnSignal``) and saving (``Checkpoints``, ``RestoreSmoothLoss``).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import get_model

from . import distributed
from .checkpoints import BEST, LAST, rng_state, save_checkpoint


class FlushDenormals(Callback):
    """Flush denormal floats to zero on the CPU while fitting, then back.

    Weights whose gradients are of rounding size (the layers after lpa-pc's last tap: its softmax cancels the
    global feature's share of every score) drive Adam's second moment below 1.2e-38, and x86 arithmetic on
    such denormal floats is many times slower (``benchmarks/denormal.py``). GPUs are unaffected.

    OpenMP's worker threads copy the mode when they start: if torch has already run a parallel op in this
    process (a notebook that ran a forward pass), call ``torch.set_flush_denormal(True)`` before that instead.
    After the fit the mode is what it was before."""

    order = -10

    def before_fit(self) -> None:
        self._was = bool(torch.tensor([1e-39]).mul(1.0) == 0)  # flushing already? (torch has no getter)
        self._set = torch.set_flush_denormal(True)

    def after_fit(self) -> None:
        if getattr(self, "_set", False):
            torch.set_flush_denormal(self._was)
            self._set = False


class History(Callback):
    """Per-epoch train loss, valid loss, metrics and seconds, across every fit of the Learner."""

    order = 60  # after the Recorder

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def before_epoch(self) -> None:
        self._start = time.perf_counter()
        self._skipped = False

    def after_cancel_epoch(self) -> None:
        self._skipped = True  # an epoch fastai's SkipToEpoch passes over on resume, or a cancelled one

    def after_epoch(self) -> None:
        if self._skipped:
            return
        names = [n for n in self.recorder.metric_names[1:-1]]
        values = self.recorder.values[-1] if self.recorder.values else []
        row = {"epoch": len(self.rows) + 1}
        for n, v in zip(names, values):
            row[n] = float(v)
        row["time"] = time.perf_counter() - self._start
        self.rows.append(row)


@contextlib.contextmanager
def _task_progress(console: Any, description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback that shows a rich bar on ``console`` from its first call, if any."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=console is not None and not console.is_terminal)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done)

    try:
        yield update
    finally:
        bar.stop()


class RichProgress(Callback):
    """A rich progress display for epochs and batches, and one table row per epoch (replaces fastai's bars)."""

    order = 61

    def __init__(self, console: Any = None, total_epochs: int | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.total_epochs = total_epochs
        self.done = 0

    def before_fit(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                 transient=True, disable=not self.console.is_terminal)  # no bars into a log
        total = self.total_epochs or self.n_epoch
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=total, completed=self.done, info="")
        self.batch_task = self.progress.add_task("batches", total=None, info="", visible=False)  # until a loader
        self._columns: list[str] | None = None

    def before_train(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="train", info="", visible=True)

    def before_validate(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="valid", info="", visible=True)

    def after_batch(self) -> None:
        info = f"loss {self.smooth_loss.item():.3f}" if self.training else ""
        self.progress.update(self.batch_task, advance=1, info=info)

    def before_epoch(self) -> None:
        self._skipped = False

    def after_cancel_epoch(self) -> None:
        self._skipped = True

    def after_epoch(self) -> None:
        if self._skipped:
            return
        self.done += 1
        self.progress.update(self.epoch_task, completed=self.done)
        hist = next((c for c in self.learn.cbs if isinstance(c, History)), None)
        if hist is not None and hist.rows:  # the epoch table, a row at a time, its header before the first
            row = hist.rows[-1]
            if self._columns is None:
                self._columns = list(row)
                self.progress.console.print("  ".join(f"{k:>10}" for k in self._columns), style="bold",
                                            highlight=False)
            cells = [f"{row.get(k, float('nan')):>10.4f}" for k in self._columns]
            cells[0], cells[-1] = f"{row['epoch']:>10}", f"{row['time']:>9.1f}s"
            self.progress.console.print("  ".join(cells), highlight=False)

    def after_fit(self) -> None:
        self.progress.stop()


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
