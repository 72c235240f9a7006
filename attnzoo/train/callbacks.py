"""A training run's lifecycle as fastai callbacks, each with one job; fastai's loop stays generic.

A run is one or two fits of one Learner (with pretrained weights: the body frozen first, like ``fine_tune``).
What the callbacks of one run share is a ``RunState``: the run folder, the phases, the history, the best
epoch, and why the run stopped early, if it did. In the order fastai calls them:

- ``FlushDenormals``: denormal floats flushed on the CPU while fitting (speed);
- ``StopOnSignal``: SIGINT/SIGTERM stop after the batch; ``NanGuard``: a NaN/inf stops the run, naming the module;
- ``RunStatus``: ``attnzoo.json`` says ``training`` when the run starts, ``failed`` or ``interrupted`` when it
  stops early;
- ``Resume``: a resumed run's optimiser, smoothed loss and random states, put back before its first fit;
- ``History``, ``RichProgress``: one row per epoch, shown as a table under a progress bar;
- ``FollowIdleCores``: torch's threads follow the cores other jobs leave idle, every epoch;
- ``Checkpoints``: the last and the best epoch, after every epoch; ``ReportEpochs`` (when asked): the
  monitored value to someone who may stop the run (a sweep's pruner);
- ``Divergence``, ``DecisionShares``, ``FinishRun``, ``RunPlots``, ``HubFace``: when the last fit ends, rank 0
  warns of a diverged run, measures each map's share of the decision, saves the finished run, draws its plots,
  and writes its Hub face (config.json and the model card, which shows the plots).

Under ``torchrun`` / ``accelerate launch`` every process runs the same callbacks; those that write (the
status, checkpoints, the finished run) do so on rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Recorder
from fastai.torch_core import get_model

from ..runs.folder import BEST, LAST, RunFolder
from . import distributed
from .checkpoints import load_optimizer, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger("attnzoo")


@dataclass
class RunState:
    """What the callbacks of one training run share. ``phases``: ``(frozen, epochs, lr)`` per fit;
    ``phase``: the fit running now; ``offset``: epochs of the phases before it."""

    folder: RunFolder
    phases: list[tuple[bool, int, Any]]
    checkpoints: bool = True
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    phase: int = 0
    offset: int = 0
    failure: str | None = None  # why training failed (a NaN/inf), or why a callback stopped it early
    stopped_early: bool = False  # a callback stopped the run on purpose (a sweep's pruner): not the module's fault
    blamed: list[str] = field(default_factory=list)  # attention modules that turned finite input into NaN/inf
    signum: int | None = None  # the signal that stopped the run
    resumed: tuple[dict[str, Any], dict[str, Any]] | None = None  # a resumed run's checkpoint, until its first fit
    unsaved: str | None = None  # why the finished run could not be saved (a full disk)
    threads: list[int] = field(default_factory=list)  # torch's threads at the end of each epoch, when they follow

    @property
    def last_phase(self) -> bool:
        return self.phase == len(self.phases) - 1

    @property
    def stopped(self) -> bool:
        return self.failure is not None or self.signum is not None

    @property
    def finishing(self) -> bool:
        """The last fit has ended well: the run is to be finished (by rank 0)."""
        return self.last_phase and not self.stopped


class RunCallback(Callback):
    """A callback of a training run: it reads and sets the ``RunState``."""

    def __init__(self, state: RunState) -> None:
        self.state = state


class EpochCallback(Callback):
    """A callback acting once per trained epoch: not on those fastai's ``SkipToEpoch`` passes over when a run
    resumes (fastai still calls ``after_epoch`` for them), nor on a cancelled one."""

    def before_epoch(self) -> None:
        self._skipped = False
        self.epoch_started()

    def after_cancel_epoch(self) -> None:
        self._skipped = True

    def after_epoch(self) -> None:
        if not self._skipped:
            self.epoch_trained()

    def epoch_started(self) -> None:
        pass

    def epoch_trained(self) -> None:
        pass


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


class StopOnSignal(RunCallback):
    """SIGINT/SIGTERM end the current batch, then training stops (``RunStatus`` saves; ``fit`` says how to
    resume). A second signal is not caught: it stops at once. Under a launcher the processes agree every
    ``every`` batches (one small all-reduce), so all of them stop at the same batch."""

    order = 0

    def __init__(self, state: RunState, every: int = 8) -> None:
        super().__init__(state)
        self._received: int | None = None
        self._old: dict[int, Any] = {}
        self.every = every

    def before_fit(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def after_fit(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._received = signum
        self.after_fit()  # the next one acts at once

    def _decide(self) -> None:
        received = self._received
        if distributed.is_distributed():
            received = distributed.all_reduce_int(received or 0, "max") or None
        if received is not None:
            self.state.signum = received
            raise CancelFitException

    def after_batch(self) -> None:
        if not distributed.is_distributed() or (self.iter + 1) % self.every == 0:
            self._decide()

    def before_epoch(self) -> None:
        self._decide()


class NanGuard(RunCallback):
    """Stops training when a number goes bad: a NaN/inf training loss (checked on the device and read back every
    ``every`` batches and at the end of each epoch, so no host-device sync per batch), or a NaN/inf validation
    loss or metric at the end of an epoch (before that epoch is checkpointed, so ``best`` and ``last`` stay
    finite). Each attention module's output is watched too (on the device): when one turned finite features
    into NaN/inf, the failure names it."""

    order = 1

    def __init__(self, state: RunState, every: int = 16) -> None:
        super().__init__(state)
        self.every = every
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
        self.state.blamed = [w.label for w in self._watch if w.fired()]
        if self.state.blamed:
            what += f"; {' and '.join(self.state.blamed)} turned finite features into NaN/inf"
        self.state.failure = what
        raise CancelFitException

    def _check(self) -> None:
        index = -1 if self._first_bad is None else int(self._first_bad)
        if distributed.is_distributed():  # every process checks at the same batches; the earliest bad one counts
            index = distributed.all_reduce_int(index if index >= 0 else 2**62, "min")
            index = -1 if index == 2**62 else index
        if index >= 0:
            self._fail(f"the training loss became NaN/inf at epoch {self.state.offset + self.epoch + 1}, "
                       f"batch {index + 1}")

    def after_train(self) -> None:
        self._check()

    def after_epoch(self) -> None:
        # the Recorder (a later order) has not filed this epoch yet; its log holds the validation numbers
        log = list(getattr(self.recorder, "log", [])[1:])
        names = list(self.recorder.metric_names[1:-1])
        bad = [f"{n} {v}" for n, v in zip(names, log) if isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad:  # validation numbers are gathered over every process, so all of them stop here together
            self._fail(f"{', '.join(bad)} at epoch {self.state.offset + self.epoch + 1}")


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


class RunStatus(RunCallback):
    """The run's status in ``attnzoo.json``: ``training`` when its first fit starts (a resumed run's says so
    already), ``failed`` (with the reason) or ``interrupted`` (with the weights at the interruption) when a fit
    stops early. Rank 0 writes; ``start`` is the record of a new run, None when resuming."""

    order = -20  # first: the folder says training before anything trains

    def __init__(self, state: RunState, start: dict[str, Any] | None, skipped: list[tuple[Any, str]]) -> None:
        super().__init__(state)
        self._start, self._skipped = start, skipped

    def before_fit(self) -> None:
        if self._start is not None and distributed.is_main():
            self.state.folder.start(self._start, self._skipped)
        self._start = None

    def after_fit(self) -> None:
        if not distributed.is_main() or not self.state.stopped:
            return
        if self.state.failure is not None:
            self.state.folder.failed(self.state.failure, self.state.history, best=self.state.best)
        else:
            self.state.folder.interrupted(None, self.state.history, get_model(self.learn.model), best=self.state.best)


class Resume(RunCallback):
    """A resumed run carries on as the uninterrupted run would: before its first fit, the optimiser state (when
    the checkpoint is mid-phase), fastai's smoothed training loss and every random state are put back."""

    order = Recorder.order + 1  # right after the Recorder resets the smoothed loss in before_fit

    def before_fit(self) -> None:
        if self.state.resumed is None:
            return
        tensors, meta = self.state.resumed
        self.state.resumed = None
        if meta["epoch"] > self.state.offset:  # mid-phase: the optimiser state and the smoothed loss carry on
            load_optimizer(self.learn.opt, tensors, meta["optimizer"], next(self.learn.model.parameters()).device)
            count, val = meta["smooth_loss"]
            self.learn.recorder.smooth_loss.count = count
            self.learn.recorder.smooth_loss.val = torch.tensor(val)
        set_rng_state(self.learn, meta["rng"])


class History(EpochCallback):
    """Per-epoch train loss, valid loss, metrics and seconds, across every fit of the Learner: ``rows``."""

    order = Recorder.order + 10

    def __init__(self, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = rows if rows is not None else []

    def epoch_started(self) -> None:
        self._start = time.perf_counter()

    def epoch_trained(self) -> None:
        names = [n for n in self.recorder.metric_names[1:-1]]
        values = self.recorder.values[-1] if self.recorder.values else []
        row = {"epoch": len(self.rows) + 1}
        for n, v in zip(names, values):
            row[n] = float(v)
        row["time"] = time.perf_counter() - self._start
        self.rows.append(row)


@contextlib.contextmanager
def task_progress(console: Any, description: str) -> Iterator[Callable[[int, int], None]]:
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


class RichProgress(EpochCallback):
    """A rich progress display for epochs and batches, and one table row per epoch (replaces fastai's bars)."""

    order = History.order + 1

    def __init__(self, console: Any = None, total_epochs: int | None = None, done: int = 0) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.total_epochs = total_epochs
        self.done = done

    def before_fit(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                 transient=True, disable=not self.console.is_terminal)  # no bars into a log
        total = self.total_epochs or self.n_epoch
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=total, completed=self.done, info="")
        self.batch_task = self.progress.add_task("batches", total=None, info="", visible=False)  # until a loader
        self._columns: list[str] | None = getattr(self, "_columns", None)

    def before_train(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="train", info="", visible=True)

    def before_validate(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="valid", info="", visible=True)

    def after_batch(self) -> None:
        info = f"loss {self.smooth_loss.item():.3f}" if self.training else ""
        self.progress.update(self.batch_task, advance=1, info=info)

    def epoch_trained(self) -> None:
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


class FollowIdleCores(RunCallback):
    """With ``--threads auto``, torch's CPU threads follow the machine while the run trains: every ``every``
    seconds (read between batches) and before every epoch, the cores other processes kept busy since the last
    look are measured (``threads.CpuMeter``: no sleep) and the thread count lowered or raised to the free ones.
    A job that starts beside a long run then costs it the core that job takes, not the 3-6x an OpenMP barrier
    waiting on a busy core does; one that ends gives its core back. ``state.threads``: the count each epoch
    ended with."""

    order = FlushDenormals.order + 1

    def __init__(self, state: RunState, every: float = 5.0) -> None:
        super().__init__(state)
        self.every = every

    def before_fit(self) -> None:
        from .threads import CpuMeter

        self.meter, self._next = CpuMeter(), time.monotonic() + self.every

    def _follow(self) -> None:
        from .threads import free_cores

        others = self.meter.others()
        self._next = time.monotonic() + self.every
        if others is not None and free_cores(others) != torch.get_num_threads():
            torch.set_num_threads(free_cores(others))

    def after_batch(self) -> None:
        if time.monotonic() >= self._next:
            self._follow()

    def before_epoch(self) -> None:
        self._follow()

    def after_epoch(self) -> None:
        self.state.threads.append(torch.get_num_threads())


class Checkpoints(TrackerCallback, EpochCallback, RunCallback):
    """After every trained epoch (rank 0, when the run keeps checkpoints): ``last`` (model, optimiser, history,
    random states) and, when the monitored score is the best so far, ``best``. fastai's ``TrackerCallback``
    keeps the best score; it is carried over from the phases before, and from before an interruption."""

    order = History.order + 5  # after the History has this epoch's row

    def __init__(self, state: RunState, monitor: str = "valid_loss") -> None:
        TrackerCallback.__init__(self, monitor=monitor, reset_on_fit=False)
        RunCallback.__init__(self, state)
        self.best = state.best.get("score", np.inf)

    def epoch_trained(self) -> None:
        TrackerCallback.after_epoch(self)
        if not self.state.checkpoints or not distributed.is_main():
            return
        epoch = self.state.offset + self.epoch + 1
        model = get_model(self.learn.model)  # the module itself, not a DistributedDataParallel wrapper
        if self.new_best and math.isfinite(self.best):
            self.state.best = {"epoch": epoch, "monitor": self.monitor, "score": float(self.best)}
            save_checkpoint(self.state.folder.file(BEST), None, model, {"epoch": epoch, "best": self.state.best})
        smooth = self.learn.recorder.smooth_loss
        meta = {"epoch": epoch, "history": self.state.history, "best": self.state.best,
                "rng": rng_state(self.learn), "smooth_loss": [int(smooth.count), float(smooth.val)]}
        save_checkpoint(self.state.folder.file(LAST), self.learn, model, meta)

    def after_epoch(self) -> None:
        EpochCallback.after_epoch(self)


class ReportEpochs(TrackerCallback, EpochCallback):
    """After every trained epoch (once its checkpoint is saved), ``report(epoch, value)`` with the monitored value,
    ``epoch`` counting over the run's fits and across a resume. ``report`` returns why the run should stop now (a
    sweep's pruner), or None; a stopped run ends as failed with that reason (``stopped``), like a NaN, so that
    ``attnzoo.json`` never calls a cut-short run done."""

    order = Checkpoints.order + 1

    def __init__(self, report: Callable[[int, float], str | None], monitor: str = "accuracy") -> None:
        TrackerCallback.__init__(self, monitor=monitor, reset_on_fit=False)
        self.report = report
        self.stopped: str | None = None

    def epoch_trained(self) -> None:
        TrackerCallback.after_epoch(self)
        state = next(c.state for c in self.learn.cbs if isinstance(c, RunCallback))  # the run's, shared
        why = self.report(len(state.history), float(self.recorder.values[-1][self.idx]))
        if why:
            self.stopped = state.failure = why
            state.stopped_early = True
            raise CancelFitException

    def after_epoch(self) -> None:
        EpochCallback.after_epoch(self)


class RankZeroFinish(RunCallback):
    """A step of finishing the run: when the last fit ends well, rank 0 does ``finish()`` by itself (fastai must
    not gather across processes meanwhile), after every process's DDP wrapper is gone."""

    order = 80

    def after_fit(self) -> None:
        if self.state.finishing and self.state.unsaved is None and distributed.is_main():
            with distributed.alone():
                self.finish()

    def finish(self) -> None:
        raise NotImplementedError


class Divergence(RankZeroFinish):
    """A run whose loss blew up is not "done" without a word: a warning in the record (and on screen) when the
    final validation loss is more than ``factor`` times that of guessing, ln(classes) (a uniform prediction's
    cross-entropy: no trained model needs to be that bad), or more than ``factor`` times the first epoch's."""

    order = RankZeroFinish.order - 1

    def __init__(self, state: RunState, n_classes: int, factor: float = 10.0) -> None:
        super().__init__(state)
        self.n_classes, self.factor = n_classes, factor

    def finish(self) -> None:
        losses = [row["valid_loss"] for row in self.state.history if "valid_loss" in row]
        if not losses:
            return
        guess = math.log(max(self.n_classes, 2))
        why = []
        if losses[-1] > self.factor * guess:
            why.append(f"more than {self.factor:g} times that of guessing (ln {self.n_classes} = {guess:.2f})")
        if len(losses) > 1 and losses[-1] > self.factor * losses[0]:
            why.append(f"more than {self.factor:g} times the first epoch's ({losses[0]:.3g})")
        if why:
            record = self.state.folder.record
            record["warnings"] = [*record.get("warnings", []), f"the run diverged: its final validation loss "
                                  f"{losses[-1]:.3g} is {' and '.join(why)}; try a lower --lr"]


class DecisionShares(RankZeroFinish):
    """Which map carries the decision (``explain.trust``), into the record's ``maps``. A failure here is a
    warning in the record: the trained model matters more."""

    order = RankZeroFinish.order

    def __init__(self, state: RunState, data: Any, img_size: int) -> None:
        super().__init__(state)
        self.data, self.img_size = data, img_size

    def finish(self) -> None:
        from ..explain import trust

        record = self.state.folder.record
        try:
            record["maps"] = trust.from_learner(self.learn, self.data, self.img_size)
        except Exception as e:
            record["warnings"] = [*record.get("warnings", []),
                                  f"the maps' decision shares were not measured: {type(e).__name__}: {e}"]


class FinishRun(RankZeroFinish):
    """The finished run into its folder: weights, history and ``status: done``. A save that cannot be written
    (a full disk) fails the run, with the command that resumes it from its last checkpoint."""

    order = DecisionShares.order + 1

    def __init__(self, state: RunState, summary: Callable[[], dict[str, Any]]) -> None:
        super().__init__(state)
        self.summary = summary

    def finish(self) -> None:
        folder = self.state.folder
        try:
            extra = {"threads_per_epoch": self.state.threads} if self.state.threads else {}
            folder.finished(get_model(self.learn.model), self.state.history, best=self.state.best,
                            distributed=self.summary(), **extra)
        except OSError as e:  # the trained model is still in the last checkpoint
            resume = f"attnzoo fit --resume {folder.path}" if self.state.checkpoints else None
            self.state.unsaved = str(e.strerror or e)
            with contextlib.suppress(OSError):  # the disk may be too full for this too; the message says it
                folder.failed(f"cannot save the trained model: {self.state.unsaved}", self.state.history, resume)


class RunPlots(RankZeroFinish):
    """The run folder's plots of a finished run: learning curves, confusion matrix, top losses, attention."""

    order = FinishRun.order + 1

    def __init__(self, state: RunState, img_size: int, mean: Any, std: Any, classes: list[str]) -> None:
        super().__init__(state)
        self.img_size, self.mean, self.std, self.classes = img_size, mean, std, classes

    def finish(self) -> None:
        from ..explain.interpret import fit_plots
        from ..runs.predict import Run

        folder = self.state.folder
        run = Run(get_model(self.learn.model), self.classes, self.img_size, self.mean, self.std, folder.record,
                  folder.path)
        fit_plots(self.learn, run, folder.path, self.state.history)


class HubFace(RankZeroFinish):
    """The finished run's Hub face (``runs.hub``): ``config.json`` and the model card, after the plots the card
    shows. A failure here is a warning: the trained model matters more, and ``attnzoo export --format hub``
    writes the face later."""

    order = RunPlots.order + 1

    def finish(self) -> None:
        from ..runs.hub import write_face

        try:
            write_face(self.state.folder)
        except Exception as e:
            log.warning("the run's Hub face (config.json, README.md) was not written: %s: %s; write it with "
                        "`attnzoo export %s --format hub`", type(e).__name__, e, self.state.folder.path)
