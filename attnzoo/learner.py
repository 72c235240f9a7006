"""``attention_learner``: a plain fastai ``Learner`` around ``create_model``, shaped like ``vision_learner``.

Parameter groups: the backbone's body, then the inserted attention modules with the classifier. So
``learn.freeze()`` (fastai freezes all groups but the last) trains the attention and the head while a
pretrained body stays fixed; fastai's default splitter would freeze the attention too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam

from .errors import AttnzooError
from .model import AttentionModel, create_model


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
    **attn_kwargs: Any,
) -> Learner:
    """A fastai ``Learner`` training ``backbone`` with ``attn`` at ``at``; every fastai habit still works.

    ``mixed_precision``: ``"auto"`` (bf16 on a GPU that supports it, else fp16 on GPU, none on CPU),
    ``"bf16"``, ``"fp16"`` or ``None``. ``channels_last``: default on for GPUs.
    With pretrained weights the body starts frozen (``learn.unfreeze()`` when you want it trained).
    """
    model = create_model(backbone, attn, at, num_classes=dls.c, pretrained=pretrained,
                         pretrained_file=pretrained_file, img_size=_img_size(dls), **attn_kwargs)
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=opt_func, lr=lr,
                    splitter=attention_splitter, cbs=cbs, metrics=metrics, wd=wd)
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
    lr = lr or learn.lr
    if getattr(learn, "attnzoo", {}).get("pretrained") and freeze_epochs > 0:
        learn.freeze()
        learn.fit_one_cycle(freeze_epochs, lr)
        learn.unfreeze()
        learn.fit_one_cycle(epochs, slice(lr / 100, lr / 2))
    else:
        learn.unfreeze()
        learn.fit_one_cycle(epochs, lr)


def suggest_lr(learn: Learner, num_it: int = 100) -> float:
    """fastai's ``lr_find`` valley, without its plot."""
    with learn.no_bar(), learn.removed_cbs([c for c in learn.cbs if isinstance(c, (RichProgress, History))]):
        return float(learn.lr_find(num_it=num_it, show_plot=False).valley)


class History(Callback):
    """Per-epoch train loss, valid loss, metrics and seconds, across every fit of the Learner."""

    order = 60  # after the Recorder

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def before_epoch(self) -> None:
        self._start = time.perf_counter()

    def after_epoch(self) -> None:
        names = [n for n in self.recorder.metric_names[1:-1]]
        values = self.recorder.values[-1] if self.recorder.values else []
        row = {"epoch": len(self.rows) + 1}
        for n, v in zip(names, values):
            row[n] = float(v)
        row["time"] = time.perf_counter() - self._start
        self.rows.append(row)


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
                                 transient=True)
        total = self.total_epochs or self.n_epoch
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=total, completed=self.done, info="")
        self.batch_task = self.progress.add_task("batches", total=0, info="")

    def before_train(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="train", info="")

    def before_validate(self) -> None:
        self.progress.reset(self.batch_task, total=len(self.dl), description="valid", info="")

    def after_batch(self) -> None:
        info = f"loss {self.smooth_loss.item():.3f}" if self.training else ""
        self.progress.update(self.batch_task, advance=1, info=info)

    def after_epoch(self) -> None:
        self.done += 1
        self.progress.update(self.epoch_task, completed=self.done)
        hist = next((c for c in self.learn.cbs if isinstance(c, History)), None)
        if hist is not None and hist.rows:
            row = hist.rows[-1]
            cells = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "time"))
            self.progress.console.print(f"epoch {row['epoch']:>3}  {cells}  {row['time']:.1f}s")

    def after_fit(self) -> None:
        self.progress.stop()


def fit(
    backbone: str,
    attn: str | None = None,
    data: str = "demo",
    *,
    at: Any = None,
    attn_options: dict[str, Any] | None = None,
    epochs: int = 5,
    lr: float | str | None = None,
    bs: int = 32,
    img_size: int | None = None,
    pretrained: bool = True,
    weights: str | None = None,
    valid_pct: float = 0.2,
    seed: int = 0,
    freeze_epochs: int = 1,
    out: str | None = None,
    runs_dir: str = "runs",
    num_workers: int | None = None,
    console: Any = None,
    on_data: Any = None,
    on_epoch_table: Any = None,
) -> Path:
    """Train and write a run folder; what ``attnzoo fit`` does. Returns the run folder.

    ``lr="auto"`` runs fastai's ``lr_find``. ``on_data(info)`` is called with the dataset summary
    before training; ``on_epoch_table(rows)`` with the per-epoch rows after it.
    """
    import timm
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import set_seed

    from . import interpret
    from .data import find_dataset, image_dataloaders, resolve_data
    from .model import _introspect, check_backbone, default_img_size, resolve_sites
    from .registry import get_attention, parse_options
    from .run import Run, save_run

    # everything a user can get wrong is checked before any data is touched
    check_backbone(backbone)
    attn = None if attn in (None, "none") else attn
    options = parse_options(attn, attn_options or {}) if attn else {}
    if not attn and (attn_options or at):
        raise AttnzooError("--at and --attn-arg need an attention module (got --attn none)")
    if data == "demo" and img_size is None:
        img_size = 64
    img_size = img_size or default_img_size(backbone)
    sites = resolve_sites(_introspect(backbone, img_size), at, get_attention(attn).kind) if attn else []
    for name, value, low in (("epochs", epochs, 1), ("bs", bs, 1), ("img_size", img_size, 16)):
        if value < low:
            raise AttnzooError(f"{name} must be at least {low}, got {value}")
    if not 0 < valid_pct < 1:
        raise AttnzooError(f"valid_pct must be between 0 and 1, got {valid_pct}")
    if isinstance(lr, (int, float)) and not lr > 0:
        raise AttnzooError(f"lr must be positive, got {lr}")
    if weights is not None and not Path(weights).is_file():
        raise AttnzooError(f"weights file not found: {weights}")

    set_seed(seed, reproducible=True)
    info = find_dataset(resolve_data(data, seed), valid_pct=valid_pct, seed=seed)
    if on_data is not None:
        on_data(info)
    cfg = timm.models.get_pretrained_cfg(backbone)
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    dls = image_dataloaders(info, img_size=img_size, bs=bs, mean=mean, std=std, seed=seed, num_workers=num_workers)
    history = History()
    learn = attention_learner(dls, backbone, attn, sites or None, pretrained=pretrained and weights is None,
                              pretrained_file=weights, cbs=[history], **options)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *_: None
    if lr == "auto":
        lr = suggest_lr(learn)
    total = epochs + (freeze_epochs if learn.attnzoo["pretrained"] else 0)
    progress = RichProgress(console, total_epochs=total)
    with learn.added_cbs(progress):
        train(learn, epochs, float(lr) if lr else 1e-3, freeze_epochs)
    if on_epoch_table is not None:
        on_epoch_table(history.rows)

    label = (attn or "none").replace(":", "_")  # a qualified plugin name (dist:name) must not put ':' in a path
    name = out or str(Path(runs_dir) / f"{backbone}-{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = dict(
        backbone=backbone, attn=attn or "none", attn_options=options, sites=learn.model.sites,
        classes=list(info.classes), img_size=img_size, mean=list(mean), std=list(std), seed=seed,
        pretrained=learn.attnzoo["pretrained"], weights=str(weights) if weights else None,
        data=info.to_dict(), train=dict(epochs=epochs, freeze_epochs=freeze_epochs, lr=float(lr or 1e-3), bs=bs),
        skipped=[],
    )
    run_dir = save_run(name, learn.model, config, history.rows)
    run = Run(learn.model, list(info.classes), img_size, mean, std, config, run_dir)
    interpret.fit_plots(learn, run, run_dir, history.rows)
    return run_dir
