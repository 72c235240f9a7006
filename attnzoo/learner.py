"""``attention_learner``: a plain fastai ``Learner`` around ``create_model``, shaped like ``vision_learner``.

Parameter groups: the backbone's body, then the inserted attention modules with the classifier. So
``learn.freeze()`` (fastai freezes all groups but the last) trains the attention and the head while a
pretrained body stays fixed; fastai's default splitter would freeze the attention too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam

from . import distributed
from .config import RESUME_MAY_SET, FitConfig
from .errors import AttnzooError, Interrupted, TrainingFailed
from .model import AttentionModel, create_model
from .run import RunFolder

log = logging.getLogger("attnzoo")


def attention_splitter(model: AttentionModel) -> list[list[torch.nn.Parameter]]:
    """[body], [attention modules + classifier]."""
    head = [p for m in model.attention_modules() for p in m.parameters()]
    classifier = model.backbone.get_classifier()
    if isinstance(classifier, torch.nn.Module):
        head += list(classifier.parameters())
    ids = {id(p) for p in head}
    body = [p for p in model.backbone.parameters() if id(p) not in ids]
    return [body, head]


def _img_size(dls: Any) -> int:
    size = getattr(dls, "attnzoo_img_size", None)
    if size is None:
        size = dls.one_batch()[0].shape[-1]
    return int(size)


def attention_learner(
    dls: Any,
    backbone: str,
    attn: str | None = None,
    at: Any = None,
    pretrained: bool = True,
    pretrained_file: str | None = None,
    loss_func: Any = None,
    metrics: Any = accuracy,
    opt_func: Any = Adam,
    lr: float = 1e-3,
    cbs: Any = None,
    wd: float | None = None,
    mixed_precision: str | None = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    **attn_kwargs: Any,
) -> Learner:
    """A fastai ``Learner`` training ``backbone`` with ``attn`` at ``at``; every fastai habit still works.

    ``mixed_precision``: ``"auto"`` (bf16 on a GPU that supports it, else fp16 on GPU, none on CPU),
    ``"bf16"``, ``"fp16"`` or ``None``. ``channels_last``: default on for GPUs. ``compile``: ``torch.compile``
    the model in place (``nn.Module.compile``: state-dict keys unchanged).
    With pretrained weights the body starts frozen (``learn.unfreeze()`` when you want it trained).
    """
    model = create_model(backbone, attn, at, num_classes=dls.c, pretrained=pretrained,
                         pretrained_file=pretrained_file, img_size=_img_size(dls), **attn_kwargs)
    if compile:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        # gates are modules in the graph (model.SiteModule), but NanGuard watches attention modules through forward
        # hooks, and dynamo skips guards on hooks by default: keep them guarded, so no graph is reused across hooks
        dynamo.config.skip_nnmodule_hook_guards = False
        model.compile()
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=opt_func, lr=lr,
                    splitter=attention_splitter, cbs=cbs, metrics=metrics, wd=wd)
    learn.add_cb(FlushDenormals())
    learn.attnzoo = dict(backbone=backbone, attn=model.attn, sites=model.sites, pretrained=bool(
        pretrained or pretrained_file), attn_options=attn_kwargs)
    if pretrained or pretrained_file:
        learn.freeze()
    on_gpu = getattr(dls, "device", None) is not None and torch.device(dls.device).type == "cuda"
    if mixed_precision == "auto":
        mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else None
    if mixed_precision == "bf16":
        learn.to_bf16()
    elif mixed_precision == "fp16":
        learn.to_fp16()
    elif mixed_precision is not None:
        raise ValueError(f"mixed_precision must be auto, bf16, fp16 or None, got {mixed_precision!r}")
    if channels_last if channels_last is not None else on_gpu:
        learn.to_channelslast(use_amp=False)  # mixed precision, if any, was added just above
    return learn


def train(learn: Learner, epochs: int, lr: float | None = None, freeze_epochs: int = 1) -> None:
    """``fit_one_cycle``; with pretrained weights, ``freeze_epochs`` with the body frozen first (like ``fine_tune``)."""
    for frozen, n, phase_lr in _phases(getattr(learn, "attnzoo", {}).get("pretrained", False), epochs,
                                       freeze_epochs, lr or learn.lr):
        learn.freeze() if frozen else learn.unfreeze()
        learn.fit_one_cycle(n, phase_lr)


def suggest_lr(learn: Learner, num_it: int = 100) -> float:
    """fastai's ``lr_find`` valley, without its plot. Its scratch copy of the weights (a pickle fastai writes
    under ``learn.path``, by default the data folder) goes to a temporary folder, removed after."""
    import tempfile

    path = learn.path
    with tempfile.TemporaryDirectory(prefix="attnzoo-lr-find-") as scratch:
        learn.path = Path(scratch)
        try:
            with learn.no_bar(), learn.removed_cbs([c for c in learn.cbs if isinstance(c, (RichProgress, History))]):
                return float(learn.lr_find(num_it=num_it, show_plot=False).valley)
        finally:
            learn.path = path


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


def fit(
    backbone: str | None = None,
    attn: str | None = None,
    data: str | None = None,
    *,
    config: FitConfig | None = None,
    console: Any = None,
    on_data: Any = None,
    on_epoch_table: Any = None,
    **settings: Any,
) -> Path:
    """Train and write a run folder; what ``attnzoo fit`` does. Returns the run folder.

    ``settings`` are ``FitConfig``'s (``at``, ``attn_options``, ``epochs``, ``lr``, ``bs``, ``img_size``,
    ``pretrained``, ``weights``, ``valid_pct``, ``seed``, ``freeze_epochs``, ``num_workers``, ``threads``,
    ``checkpoints``, ``sync_bn``, ``compile``, ``out``, ``runs_dir``, ``resume``), checked before anything
    starts; None means the default. Or pass a ready ``config``. ``lr="auto"`` runs fastai's ``lr_find``.
    ``on_data(info, run_dir)`` is called with the dataset summary before training; ``on_epoch_table(rows)`` with
    the per-epoch rows after it.

    The run folder is created before training starts (``attnzoo.json`` with ``status: training``);
    ``checkpoints`` keeps ``checkpoints/last`` and ``checkpoints/best`` up to date after every epoch.
    ``resume=RUN`` continues an interrupted run from its last checkpoint with the run's own settings
    (no other setting but ``num_workers`` and ``threads`` may be given with it) and reaches the result the
    uninterrupted run would have. SIGINT/SIGTERM stop after the current batch, save, and raise ``Interrupted``; a
    NaN/inf loss stops training and raises ``TrainingFailed`` naming the epoch and batch.

    Under ``torchrun`` / ``accelerate launch`` every process trains on its shard of the data (``bs`` is per
    process) and rank 0 alone reports and writes the run folder; ``sync_bn`` syncs batch norm (CUDA only).
    """
    from .run import CONFIG

    if config is None:
        given = dict(backbone=backbone, attn=attn, data=data, **settings)
        config = FitConfig.of(**{k: v for k, v in given.items() if v is not None})
    elif backbone is not None or attn is not None or data is not None or settings:
        raise TypeError("fit takes either a config or settings, not both")
    distributed.setup()  # first: pins this process's GPU before anything lands on one
    if config.resume is not None:
        folder = RunFolder(config.resume)
        run_dir = folder.path
        if not (run_dir / CONFIG).is_file():
            raise AttnzooError(f"--resume needs a run folder (with {CONFIG}): {run_dir}")
        saved = folder.read_config()
        if saved.get("status") == "done":
            raise AttnzooError(f"{run_dir} already finished training; nothing to resume")
        if "request" not in saved:
            raise AttnzooError(f"{run_dir} was written by an attnzoo without resume support")
        changed = {k: getattr(config, k) for k in RESUME_MAY_SET if k != "resume" and getattr(config, k) is not None}
        request = FitConfig.from_request(saved["request"], out=str(run_dir), **changed)
        if distributed.is_main():
            folder.lock()  # not while another process trains in it: it would remove that one's temporaries
            folder.clean_temporaries()  # what a killed run left half-written
        try:
            return _fit(request, folder=folder, resumed=saved, console=console, on_data=on_data,
                        on_epoch_table=on_epoch_table)
        finally:
            folder.unlock()
    folder = _new_run_dir(config.backbone, config.attn, config.out, config.runs_dir)
    try:
        if distributed.is_main():
            folder.lock()
        return _fit(config, folder=folder, resumed=None, console=console, on_data=on_data,
                    on_epoch_table=on_epoch_table)
    except BaseException:
        folder.unlock()
        folder.release()  # a run that stopped before writing its attnzoo.json leaves no folder behind
        raise
    finally:
        folder.unlock()


def _new_run_dir(backbone: str, attn: str | None, out: str | None, runs_dir: str) -> RunFolder:
    """The new run's folder, claimed by rank 0 (``out``, or a fresh ``runs_dir/<backbone>-<attn>-<time>[-N]``);
    the other processes of a launch get its name, or its error."""
    if not distributed.is_main():
        claimed = distributed.broadcast(None)
        if isinstance(claimed, str):
            raise AttnzooError(claimed)
        return RunFolder(claimed)
    try:
        if out is not None:
            folder = RunFolder.claim(out)
        else:
            label = (attn or "none").replace(":", "_")  # a qualified plugin name (dist:name): no ':' in a path
            folder = RunFolder.claim_new(Path(runs_dir) / f"{backbone}-{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    except AttnzooError as e:
        distributed.broadcast(str(e))
        raise
    distributed.broadcast(folder.path)
    return folder


def _phases(pretrained: bool, epochs: int, freeze_epochs: int, lr: float) -> list[tuple[bool, int, Any]]:
    """(frozen, epochs, lr) per ``fit_one_cycle``: like ``fine_tune`` when pretrained."""
    if pretrained and freeze_epochs > 0:
        return [(True, freeze_epochs, lr), (False, epochs, slice(lr / 100, lr / 2))]
    return [(False, epochs, lr)]


def _fit(settings: FitConfig, *, folder: RunFolder, resumed: dict[str, Any] | None, console: Any, on_data: Any,
         on_epoch_table: Any) -> Path:
    """``resumed``: the run's ``attnzoo.json`` when continuing a run, else None."""
    import timm
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import get_model, set_seed

    from . import checkpoint as ck
    from . import interpret
    from .data import find_dataset, image_dataloaders, resolve_data
    from .model import _introspect, check_backbone, default_img_size, resolve_sites
    from .registry import get_attention, parse_options
    from .run import SKIPPED, WEIGHTS, Run
    from .threads import use_threads

    resume = resumed is not None
    run_dir = folder.path
    # settings checked every value; what needs timm is checked here, before any data is touched
    check_backbone(settings.backbone)
    if settings.img_size is None:  # the backbone's size, bounds checked again
        settings = replace(settings, img_size=64 if settings.data == "demo" else default_img_size(settings.backbone))
    s = settings
    options = parse_options(s.attn, s.attn_options) if s.attn else {}
    sites = resolve_sites(_introspect(s.backbone, s.img_size), s.at, get_attention(s.attn).kind) if s.attn else []
    backbone, attn, data, epochs, lr, bs, img_size = s.backbone, s.attn, s.data, s.epochs, s.lr, s.bs, s.img_size
    pretrained, weights, valid_pct, seed, freeze_epochs = s.pretrained, s.weights, s.valid_pct, s.seed, s.freeze_epochs
    checkpoints, num_workers, sync_bn, compile = s.checkpoints, s.num_workers, s.sync_bn, s.compile
    threads = use_threads(s.threads, num_workers or 0)
    if not distributed.is_main():  # the other processes of a launch train quietly
        console, on_data, on_epoch_table = distributed.quiet_console(), None, None
    state: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    if resume:
        tensors, state = ck.read_checkpoint(run_dir / ck.LAST)

    set_seed(seed, reproducible=True)
    with _task_progress(console, "making the demo data set (once)") as progress:
        root = resolve_data(data, seed, progress=progress)
    info = find_dataset(root, valid_pct=valid_pct, seed=seed)
    config: dict[str, Any] = dict(resumed or {})
    if resume and info.counts() != config["data"]["counts"]:
        raise AttnzooError(f"the data in {info.root} changed since {run_dir} started "
                           f"({config['data']['counts']} then, {info.counts()} now); cannot resume it exactly")
    if resume and config["data"].get("fingerprint") not in (None, info.fingerprint()):  # older runs: counts only
        raise AttnzooError(f"the data in {info.root} changed since {run_dir} started (files were added, removed "
                           f"or moved between classes, with the same counts); cannot resume it exactly")
    per_process = -(-len(info.train) // distributed.world_size())  # a shard, padded as distributed.py does
    if bs > per_process:  # fastai drops the last partial batch: a larger batch would train on nothing
        where = " per process" if distributed.world_size() > 1 else ""
        info.warnings.append(f"--bs {bs} is larger than the {per_process} training images{where}: "
                             f"using --bs {per_process}")
        bs = per_process
    if on_data is not None:
        on_data(info, run_dir)
    if info.skipped and not resume and distributed.is_main():
        log.warning("skipped %d files that cannot be used; the list is in %s", len(info.skipped),
                    run_dir / SKIPPED)
    cfg = timm.models.get_pretrained_cfg(backbone)
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    dls = image_dataloaders(info, img_size=img_size, bs=bs, mean=mean, std=std, seed=seed, num_workers=num_workers)
    history = History()
    use_pretrained = (pretrained and weights is None) and not resume
    learn = attention_learner(dls, backbone, attn, sites or None, pretrained=use_pretrained,
                              pretrained_file=None if resume else weights, cbs=[history], compile=compile,
                              **options)
    learn.attnzoo["pretrained"] = bool(pretrained or weights)
    learn.path = run_dir  # fastai's own scratch files (lr_find) go to the run folder, never the data folder
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *_: None
    training = distributed.Training(learn, sync_bn=sync_bn)  # fits inside it run in every process of a launch
    if lr == "auto":
        with distributed.alone():  # lr_find in each process by itself (it cannot run distributed) ...
            lr = suggest_lr(learn)
        lr = distributed.broadcast(lr)  # ... and rank 0's pick for all
    lr = float(lr)

    request = replace(settings, at=sites or None, attn_options=options, lr=lr, bs=bs).request()
    if not resume:
        config = dict(
            status="training", backbone=backbone, attn=attn or "none", attn_options=options,
            sites=learn.model.sites, classes=list(info.classes), img_size=img_size, mean=list(mean), std=list(std),
            seed=seed, pretrained=learn.attnzoo["pretrained"], weights=str(weights) if weights else None,
            data=info.to_dict(), train=dict(epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, bs=bs, threads=threads),
            skipped=[dict(path=p, reason=r) for p, r in info.skipped], warnings=info.warnings, request=request,
        )
    if not resume and distributed.is_main():  # rank 0 writes the run folder
        if info.skipped:
            folder.write_skipped(info.skipped)
        folder.write_config(config)

    phases = _phases(learn.attnzoo["pretrained"], epochs, freeze_epochs, lr)
    done = int(state.get("epoch", 0))
    best = state.get("best") or {}
    if resume:
        ck.load_model_tensors(learn.model, tensors)
        history.rows = [dict(r) for r in state.get("history", [])]
    total = sum(n for _, n, _ in phases)
    progress = RichProgress(console, total_epochs=total)
    progress.done = done
    stop = ck.StopOnSignal().install()
    offset = 0
    failure: str | None = None
    blamed: list[str] = []
    try:
        for frozen, n, phase_lr in phases:
            if done >= offset + n:
                offset += n
                continue
            learn.freeze() if frozen else learn.unfreeze()  # fastai clears the optimiser state here
            guard = ck.NanGuard(epoch_offset=offset)
            saver = ck.Checkpoints(run_dir, history, epoch_offset=offset, best=best)
            saver.enabled = checkpoints and distributed.is_main()
            cbs = [progress, stop, guard, saver]
            start = max(0, done - offset)
            if resume and state:
                if start > 0:  # mid-phase: the optimiser state and fastai's smoothed loss carry on
                    ck.load_optimizer(learn.opt, tensors, state["optimizer"], next(learn.model.parameters()).device)
                    cbs.append(ck.RestoreSmoothLoss(*state["smooth_loss"]))
                ck.set_rng_state(learn, state["rng"])
                state, tensors = {}, {}
            with learn.added_cbs(cbs), training:
                learn.fit_one_cycle(n, phase_lr, start_epoch=start)
            best = saver.best
            if guard.failure or stop.signum is not None:
                failure, blamed = guard.failure, guard.blamed
                break
            offset += n
    except BaseException as e:
        stop.uninstall()
        if distributed.is_main():
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            folder.write_config({**config, "status": status, "metrics": {"per_epoch": history.rows},
                                 "error": f"{type(e).__name__}: {e}"})
        raise
    stop.uninstall()
    if on_epoch_table is not None:
        on_epoch_table(history.rows)

    epochs_done = len(history.rows)
    if failure is not None:
        if distributed.is_main():
            folder.mark_failed({**config, "best": best, "metrics": {"per_epoch": history.rows}}, failure)
        kept = (f"; the last good checkpoint (epoch {epochs_done}) is {run_dir / ck.LAST}"
                if epochs_done and checkpoints else "")
        hint = (" The module is at fault, not only the learning rate: check its options, or tell its author."
                if blamed else " Try a lower --lr.")
        raise TrainingFailed(f"{failure}: training stopped{kept}.{hint}")
    if stop.signum is not None:
        if distributed.is_main():
            folder.save(get_model(learn.model), {**config, "status": "interrupted", "best": best}, history.rows)
        name = signal.Signals(stop.signum).name
        if epochs_done and checkpoints:
            how = (f"resume with: attnzoo fit --resume {run_dir} (continues after epoch {epochs_done}; "
                   f"{WEIGHTS} holds the weights at the interruption)")
        else:
            how = "no epoch had finished, so there is nothing to resume: start the run again"
        raise Interrupted(f"{name}: training stopped and saved in {run_dir}; {how}", stop.signum, run_dir)

    if best.get("epoch") == epochs_done:  # the best epoch is the last: its weights are model.safetensors
        best = {**best, "weights": WEIGHTS}
    elif best:
        best = {**best, "weights": ck.BEST}
    config = {**config, "status": "done", "best": best, "distributed": training.summary()}
    if distributed.is_main():
        with distributed.alone():  # fastai must not gather now: rank 0 finishes the run folder by itself
            if attn:
                from . import trust

                try:
                    config["maps"] = trust.from_learner(learn, info, img_size)  # which map carries the decision
                except Exception as e:  # the trained model matters more: it is saved, and the gap said
                    config["warnings"] = [*config.get("warnings", []),
                                          f"the maps' decision shares were not measured: {type(e).__name__}: {e}"]
            try:
                folder.save(learn.model, config, history.rows)
            except OSError as e:  # disk full, say: the trained model is still in the last checkpoint
                resume = f"attnzoo fit --resume {run_dir}" if checkpoints else None
                reason = f"cannot save the trained model: {e.strerror or e}"
                with contextlib.suppress(OSError):  # the disk may be too full for this too; the message says it
                    folder.mark_failed({**config, "metrics": {"per_epoch": history.rows}}, reason, resume)
                how = f"fix that, then resume with: {resume}" if resume else "fix that, then start the run again"
                raise TrainingFailed(f"training finished, but the model cannot be saved in {run_dir}: "
                                     f"{e.strerror or e}; {how}") from None
            (run_dir / ck.LAST).unlink(missing_ok=True)  # the finished model is model.safetensors
            if best.get("weights") == WEIGHTS:  # never the same weights twice in a run folder
                (run_dir / ck.BEST).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (run_dir / ck.LAST).parent.rmdir()  # checkpoints/, when nothing is left in it
            run = Run(learn.model, list(info.classes), img_size, mean, std, config, run_dir)
            interpret.fit_plots(learn, run, run_dir, history.rows)
    distributed.barrier()  # every process returns once the run folder is complete
    return run_dir
