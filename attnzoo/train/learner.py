"""``attention_learner``: a plain fastai ``Learner`` around ``create_model``, shaped like ``vision_learner``.

Parameter groups: the backbone's body, then the inserted attention modules with the classifier. So
``learn.freeze()`` (fastai freezes all groups but the last) trains the attention and the head while a
pretrained body stays fixed; fastai's default splitter would freeze the attention too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam

from ..errors import AttnzooError
from ..model.create import AttentionModel, create_model
from .callbacks import FlushDenormals, History, RichProgress

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
    attn_kwargs: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> Learner:
    """A fastai ``Learner`` training ``backbone`` with ``attn`` at ``at``; every fastai habit still works.

    ``attn_kwargs``: the attention's options; every other keyword reaches timm's ``create_model`` (``in_chans``,
    ``drop_rate``, ``drop_path_rate``, ...), as with ``vision_learner``.
    ``mixed_precision``: ``"auto"`` (bf16 on a GPU that supports it, else fp16 on GPU, none on CPU),
    ``"bf16"``, ``"fp16"`` or ``None``. ``channels_last``: default on for GPUs. ``compile``: ``torch.compile``
    the model in place (``nn.Module.compile``: state-dict keys unchanged).
    With pretrained weights the body starts frozen (``learn.unfreeze()`` when you want it trained).
    """
    model = create_model(backbone, attn, at, num_classes=dls.c, pretrained=pretrained,
                         pretrained_file=pretrained_file, img_size=_img_size(dls), attn_kwargs=attn_kwargs,
                         **timm_kwargs)
    if compile:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        # gates are modules in the graph (model.create.SiteModule), but NanGuard watches attention modules through
        # forward hooks, and dynamo skips guards on hooks by default: keep them guarded, so no graph is reused across
        # hooks
        dynamo.config.skip_nnmodule_hook_guards = False
        model.compile()
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=opt_func, lr=lr,
                    splitter=attention_splitter, cbs=cbs, metrics=metrics, wd=wd)
    learn.add_cb(FlushDenormals())
    learn.attnzoo = dict(backbone=backbone, attn=model.attn, sites=model.sites, pretrained=bool(
        pretrained or pretrained_file), attn_options=dict(model.attn_options))
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


def check_batch(model: AttentionModel, bs: int, img_size: int, channels: int = 3) -> None:
    """A training batch of ``bs`` images must train: batch norm needs more than one value per channel, which
    ``--bs 1`` does not give where a map is 1x1. Found with a forward on the meta device (no memory, no time),
    as one line before the run starts rather than a failure at its first batch."""
    from torch.func import functional_call

    named = [*model.named_parameters(), *model.named_buffers()]
    params = {k: torch.empty_like(v, device="meta") for k, v in named}
    was_training = model.training
    model.train()
    try:
        functional_call(model, params, (torch.empty(bs, channels, img_size, img_size, device="meta"),),
                        strict=False, tie_weights=False)
    except ValueError as e:
        if "Expected more than 1 value per channel" in str(e):
            raise AttnzooError(f"--bs {bs} cannot train at {img_size} px: a batch norm layer would see one value "
                               f"per channel; use --bs 2 or more, or a larger --img-size") from None
    except Exception:  # an op without a meta kernel says nothing about the batch
        pass
    finally:
        model.train(was_training)
        model.capture_maps(True)


def train(learn: Learner, epochs: int, lr: float | None = None, freeze_epochs: int = 1) -> None:
    """``fit_one_cycle``; with pretrained weights, ``freeze_epochs`` with the body frozen first (like ``fine_tune``)."""
    for frozen, n, phase_lr in phases(getattr(learn, "attnzoo", {}).get("pretrained", False), epochs,
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


def phases(pretrained: bool, epochs: int, freeze_epochs: int, lr: float) -> list[tuple[bool, int, Any]]:
    """(frozen, epochs, lr) per ``fit_one_cycle``: like ``fine_tune`` when pretrained."""
    if pretrained and freeze_epochs > 0:
        return [(True, freeze_epochs, lr), (False, epochs, slice(lr / 100, lr / 2))]
    return [(False, epochs, lr)]
