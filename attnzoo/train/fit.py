"""``fit``: what ``attnzoo fit`` does, a training run from settings to a finished run folder."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import AttnzooError, Interrupted, TrainingFailed
from ..runs.folder import RunFolder
from . import callbacks, distributed
from .callbacks import History, RichProgress, _task_progress
from .learner import _phases, attention_learner, suggest_lr
from .settings import RESUME_MAY_SET, FitConfig

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
    from ..runs.folder import CONFIG

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


def _fit(settings: FitConfig, *, folder: RunFolder, resumed: dict[str, Any] | None, console: Any, on_data: Any,
         on_epoch_table: Any) -> Path:
    """``resumed``: the run's ``attnzoo.json`` when continuing a run, else None."""
    import timm
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import get_model, set_seed

    from ..explain import interpret
    from ..model.registry import get_attention, parse_options
    from ..model.sites import check_backbone, default_img_size, introspect, resolve_sites
    from ..runs.folder import SKIPPED, WEIGHTS
    from ..runs.predict import Run
    from . import checkpoints as ck
    from .data import find_dataset, image_dataloaders, resolve_data
    from .threads import use_threads

    resume = resumed is not None
    run_dir = folder.path
    # settings checked every value; what needs timm is checked here, before any data is touched
    check_backbone(settings.backbone)
    if settings.img_size is None:  # the backbone's size, bounds checked again
        settings = replace(settings, img_size=64 if settings.data == "demo" else default_img_size(settings.backbone))
    s = settings
    options = parse_options(s.attn, s.attn_options) if s.attn else {}
    sites = resolve_sites(introspect(s.backbone, s.img_size), s.at, get_attention(s.attn).kind) if s.attn else []
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
    stop = callbacks.StopOnSignal().install()
    offset = 0
    failure: str | None = None
    blamed: list[str] = []
    try:
        for frozen, n, phase_lr in phases:
            if done >= offset + n:
                offset += n
                continue
            learn.freeze() if frozen else learn.unfreeze()  # fastai clears the optimiser state here
            guard = callbacks.NanGuard(epoch_offset=offset)
            saver = callbacks.Checkpoints(run_dir, history, epoch_offset=offset, best=best)
            saver.enabled = checkpoints and distributed.is_main()
            cbs = [progress, stop, guard, saver]
            start = max(0, done - offset)
            if resume and state:
                if start > 0:  # mid-phase: the optimiser state and fastai's smoothed loss carry on
                    ck.load_optimizer(learn.opt, tensors, state["optimizer"], next(learn.model.parameters()).device)
                    cbs.append(callbacks.RestoreSmoothLoss(*state["smooth_loss"]))
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
                from ..explain import trust

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
