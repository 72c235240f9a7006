"""``fit``: what ``attnzoo fit`` does, a training run from its settings to a finished run folder.

The orchestration only: the settings are checked by ``FitConfig`` (``settings``), the folder is claimed and
written by ``RunFolder`` (``runs.folder``), the data comes from ``data``, the Learner from ``learner``, and the
run's lifecycle (status, checkpoints, NaN guard, signals, history, progress, decision shares, plots) is the
callbacks of ``callbacks``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import AttnzooError, Interrupted, TrainingFailed
from ..runs.folder import CONFIG, LAST, SKIPPED, WEIGHTS, RunFolder, is_run_folder, path_label
from . import callbacks as cb
from . import distributed
from .settings import FitConfig

log = logging.getLogger("attnzoo")


def fit(
    backbone: str | None = None,
    attn: str | None = None,
    data: str | None = None,
    *,
    config: FitConfig | None = None,
    console: Any = None,
    on_data: Any = None,
    on_epoch_table: Any = None,
    callbacks: Sequence[Any] = (),
    **settings: Any,
) -> Path:
    """Train and write a run folder; what ``attnzoo fit`` does. Returns the run folder.

    ``settings`` are ``FitConfig``'s (see its docstring, or ``attnzoo fit --help``), checked before anything
    starts; None means the default; ``attn=None`` trains the baseline. Or pass a ready ``config``.
    ``on_data(info, run_dir)`` is called with the dataset summary before training; ``on_epoch_table(rows)`` with
    the per-epoch rows after it. ``callbacks``: more fastai callbacks for the run's fits (a sweep's pruning).

    The run folder is claimed before training starts (``attnzoo.json`` with ``status: training``);
    ``checkpoints`` keeps ``checkpoints/last`` and ``checkpoints/best`` up to date after every epoch.
    ``resume=RUN`` continues an interrupted run from its last checkpoint with the run's own settings and
    reaches the result the uninterrupted run would have. SIGINT/SIGTERM stop after the current batch, save, and
    raise ``Interrupted``; a NaN/inf loss stops training and raises ``TrainingFailed`` naming the epoch and batch.

    Under ``torchrun`` / ``accelerate launch`` every process trains on its shard of the data (``bs`` is per
    process) and rank 0 alone reports and writes the run folder; ``sync_bn`` syncs batch norm (CUDA only).
    """
    if config is None:
        given = dict(backbone=backbone, attn=attn, data=data, **settings)
        if given.get("resume") is None and attn is None:
            given["attn"] = "none"  # Python's baseline is attn=None; the command line names it
        config = FitConfig.of(**given)
    elif backbone is not None or attn is not None or data is not None or settings:
        raise TypeError("fit takes either a config or settings, not both")
    distributed.setup()  # first: pins this process's GPU before anything lands on one
    if config.resume is not None:
        folder, config = _resumed(config)
    else:
        folder = _claim(config)
    try:
        return _train(config, folder, console=console, on_data=on_data, on_epoch_table=on_epoch_table,
                      callbacks=callbacks)
    finally:
        folder.release()  # unlocked; a run that stopped before writing its attnzoo.json leaves no folder behind


def _resumed(config: FitConfig) -> tuple[RunFolder, FitConfig]:
    """The run folder to continue, locked by rank 0, and the run's own settings (with the ones resume may set)."""
    if not is_run_folder(config.resume):
        raise AttnzooError(f"--resume needs a run folder (with {CONFIG}): {config.resume}")
    folder = RunFolder.open(config.resume)
    saved = folder.record
    if saved.get("status") == "done":
        raise AttnzooError(f"{folder.path} already finished training; nothing to resume")
    if "request" not in saved:
        raise AttnzooError(f"{folder.path} was written by an attnzoo without resume support")
    changed = {f: getattr(config, f) for f in ("num_workers", "threads") if getattr(config, f) is not None}
    if distributed.is_main():
        folder.lock()  # not while another process trains in it: it would remove that one's temporaries
        folder.clean_temporaries()  # what a killed run left half-written
    return folder, FitConfig.from_request(saved["request"], out=str(folder.path), **changed)


def _claim(config: FitConfig) -> RunFolder:
    """The new run's folder, claimed by rank 0 (``out``, or a fresh ``runs_dir/<backbone>-<attn>-<time>[-N]``);
    the other processes of a launch get its name, or its error."""
    if not distributed.is_main():
        claimed = distributed.broadcast(None)
        if isinstance(claimed, str):
            raise AttnzooError(claimed)
        return RunFolder(claimed)
    try:
        if config.out is not None:
            folder = RunFolder.claim(config.out)
        else:
            label = path_label(config.attn)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = RunFolder.claim_new(Path(config.runs_dir) / f"{config.backbone}-{label}-{stamp}")
    except AttnzooError as e:
        distributed.broadcast(str(e))
        raise
    distributed.broadcast(folder.path)
    return folder


@dataclass
class _Prepared:
    """What a run trains: its settings (every default resolved), the data and the Learner."""

    settings: FitConfig
    info: Any
    learn: Any
    training: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threads: int | None


def _train(settings: FitConfig, folder: RunFolder, *, console: Any, on_data: Any, on_epoch_table: Any,
           callbacks: Sequence[Any] = ()) -> Path:
    from .checkpoints import load_model_tensors, read_checkpoint
    from .learner import phases

    resumed = folder.record if folder.record else None
    if not distributed.is_main():  # the other processes of a launch train quietly
        console, on_data, on_epoch_table = distributed.quiet_console(), None, None
    checkpoint = read_checkpoint(folder.file(LAST)) if resumed else None
    p = _prepare(settings, folder, resumed, console, on_data)
    s, learn = p.settings, p.learn
    state = cb.RunState(folder, phases(learn.attnzoo["pretrained"], s.epochs, s.freeze_epochs, s.lr),
                        checkpoints=s.checkpoints, resumed=checkpoint)
    if checkpoint is not None:
        tensors, meta = checkpoint
        load_model_tensors(learn.model, tensors)
        state.history[:] = [dict(r) for r in meta.get("history", [])]
        state.best = dict(meta.get("best") or {})
    done = len(state.history)
    run_cbs = _lifecycle(state, p, None if resumed else _record(p, learn), console, done, callbacks)
    try:
        with learn.added_cbs(run_cbs), p.training:
            for phase, (frozen, n, lr) in enumerate(state.phases):
                state.phase = phase
                if done < state.offset + n or state.last_phase:  # (a finished last phase skips all its epochs)
                    learn.freeze() if frozen else learn.unfreeze()  # fastai clears the optimiser state here
                    learn.fit_one_cycle(n, lr, start_epoch=max(0, done - state.offset))
                if state.stopped:
                    break
                state.offset += n
    except BaseException as e:
        if distributed.is_main():
            end = folder.interrupted if isinstance(e, KeyboardInterrupt) else folder.failed
            end(f"{type(e).__name__}: {e}", state.history)
        raise
    if on_epoch_table is not None:
        on_epoch_table(state.history)
    _outcome(state)
    distributed.barrier()  # every process returns once the run folder is complete
    return folder.path


def _lifecycle(state: cb.RunState, p: _Prepared, start: dict[str, Any] | None, console: Any, done: int,
               extra: Sequence[Any]) -> list[Any]:
    """The run's callbacks (``train.callbacks``), in the order they act; ``start``: a new run's record."""
    s = p.settings
    run_cbs = [
        cb.RunStatus(state, start, p.info.skipped), cb.StopOnSignal(state), cb.NanGuard(state), cb.Resume(state),
        cb.History(state.history), cb.Checkpoints(state),
        cb.RichProgress(console, total_epochs=sum(n for _, n, _ in state.phases), done=done),
        cb.Divergence(state, len(p.info.classes)), cb.DecisionShares(state, p.info, s.img_size),
        cb.FinishRun(state, p.training.summary), *extra,
    ]
    if s.plots:
        run_cbs.append(cb.RunPlots(state, s.img_size, p.mean, p.std, list(p.info.classes)))
    run_cbs.append(cb.HubFace(state))
    if s.threads == "auto":
        run_cbs.append(cb.FollowIdleCores(state))
    return run_cbs


def _prepare(settings: FitConfig, folder: RunFolder, resumed: dict[str, Any] | None, console: Any,
             on_data: Any) -> _Prepared:
    """The settings resolved against timm (backbone, image size, module options, sites: before any data is
    touched), the data, and the Learner with its learning rate."""
    import timm
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import set_seed

    from ..model.registry import get_attention, parse_options
    from ..model.sites import check_backbone, default_img_size, introspect, resolve_sites
    from .data import find_dataset, image_dataloaders, normalisation, resolve_data
    from .learner import attention_learner, check_batch, suggest_lr
    from .threads import use_threads

    s = settings
    check_backbone(s.backbone)
    if s.img_size is None:  # the backbone's size, bounds checked again
        s = replace(s, img_size=64 if s.data == "demo" else default_img_size(s.backbone))
    options = parse_options(s.attn, s.attn_options) if s.attn else {}
    sites = (resolve_sites(introspect(s.backbone, s.img_size, s.timm_kwargs()), s.at, get_attention(s.attn).kind)
             if s.attn else [])  # as create_model will see the backbone: one introspection, cached
    threads = use_threads(s.threads, s.num_workers or 0)
    set_seed(s.seed, reproducible=True)
    notes: list[str] = []
    with cb.task_progress(console, "making the demo data set (once)") as progress:
        root = resolve_data(s.data, s.seed, progress=progress, notes=notes)
    info = find_dataset(root, valid_pct=s.valid_pct, seed=s.seed)
    info.warnings[:0] = notes
    if resumed is not None:
        _same_data(info, resumed["data"], folder.path)
    bs = _batch_size(s.bs, len(info.train), info.warnings)
    if on_data is not None:
        on_data(info, folder.path)
    if info.skipped and resumed is None and distributed.is_main():
        log.warning("skipped %d files that cannot be used; the list is in %s", len(info.skipped),
                    folder.file(SKIPPED))
    mean, std = normalisation(timm.models.get_pretrained_cfg(s.backbone), s.in_chans or 3)
    dls = image_dataloaders(info, img_size=s.img_size, bs=bs, mean=mean, std=std, seed=s.seed,
                            num_workers=s.num_workers)
    learn = attention_learner(dls, s.backbone, s.attn, sites or None, pretrained=s.pretrained and s.weights is None
                              and resumed is None, pretrained_file=None if resumed else s.weights,
                              compile=s.compile, attn_kwargs=options, **s.timm_kwargs())
    learn.attnzoo["pretrained"] = bool(s.pretrained or s.weights)
    check_batch(learn.model, bs, s.img_size, len(mean))
    learn.path = folder.path  # fastai's own scratch files (lr_find) go to the run folder, never the data folder
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *_: None
    training = distributed.Training(learn, sync_bn=s.sync_bn)  # fits inside it run in every process of a launch
    lr = s.lr
    if lr == "auto":
        with distributed.alone():  # lr_find in each process by itself (it cannot run distributed) ...
            lr = suggest_lr(learn)
        lr = distributed.broadcast(lr)  # ... and rank 0's pick for all
    s = replace(s, at=sites or None, attn_options=options, lr=float(lr), bs=bs)
    return _Prepared(s, info, learn, training, mean, std, threads)


def _same_data(info: Any, recorded: dict[str, Any], run_dir: Path) -> None:
    """A resumed run trains on the data it started with."""
    if info.counts() != recorded["counts"]:
        raise AttnzooError(f"the data in {info.root} changed since {run_dir} started "
                           f"({recorded['counts']} then, {info.counts()} now); cannot resume it exactly")
    if recorded.get("fingerprint") not in (None, info.fingerprint()):  # older runs: counts only
        raise AttnzooError(f"the data in {info.root} changed since {run_dir} started (files were added, removed "
                           f"or moved between classes, with the same counts); cannot resume it exactly")


def _batch_size(bs: int, n_train: int, warnings: list[str]) -> int:
    """fastai drops the last partial batch: a batch larger than a process's shard would train on nothing."""
    per_process = -(-n_train // distributed.world_size())  # a shard, padded as distributed.py does
    if bs <= per_process:
        return bs
    where = " per process" if distributed.world_size() > 1 else ""
    warnings.append(f"--bs {bs} is larger than the {per_process} training images{where}: using --bs {per_process}")
    return per_process


def _record(p: _Prepared, learn: Any) -> dict[str, Any]:
    """A new run's ``attnzoo.json``, as it starts."""
    s, info = p.settings, p.info
    return dict(
        backbone=s.backbone, attn=s.attn or "none", attn_options=s.attn_options, sites=learn.model.sites,
        classes=list(info.classes), img_size=s.img_size, mean=list(p.mean), std=list(p.std), seed=s.seed,
        pretrained=learn.attnzoo["pretrained"], weights=s.weights, threads=p.threads, data=info.to_dict(),
        timm_kwargs=s.timm_kwargs(),
        skipped=[dict(path=path, reason=r) for path, r in info.skipped], warnings=info.warnings,
        request=s.request(),
    )


def _outcome(state: cb.RunState) -> None:
    """How a run that did not finish ended, raised: ``TrainingFailed`` or ``Interrupted``."""
    run_dir, epochs = state.folder.path, len(state.history)
    if state.unsaved is not None:
        resume = f"resume with: attnzoo fit --resume {run_dir}" if state.checkpoints else "start the run again"
        raise TrainingFailed(f"training finished, but the model cannot be saved in {run_dir}: {state.unsaved}; "
                             f"fix that, then {resume}")
    if state.failure is not None:
        kept = (f"; the last good checkpoint (epoch {epochs}) is {run_dir / LAST}"
                if epochs and state.checkpoints else "")
        hint = ("" if state.stopped_early else
                " The module is at fault, not only the learning rate: check its options, or tell its author."
                if state.blamed else " Try a lower --lr.")
        raise TrainingFailed(f"{state.failure}: training stopped{kept}.{hint}")
    if state.signum is not None:
        name = signal.Signals(state.signum).name
        if epochs and state.checkpoints:
            how = (f"resume with: attnzoo fit --resume {run_dir} (continues after epoch {epochs}; "
                   f"{WEIGHTS} holds the weights at the interruption)")
        else:
            how = "no epoch had finished, so there is nothing to resume: start the run again"
        raise Interrupted(f"{name}: training stopped and saved in {run_dir}; {how}", state.signum, run_dir)
