"""The fastai pieces of a distributed fit: fastai's ``DistributedTrainer`` and its sharded loader with the fixes
that ``distributed`` describes, whole-set validation metrics, a tally of the batches each process ran, and the
batch norm swap for ``sync_bn``.

Kept apart from ``distributed`` so that importing that one stays free of torch and fastai: it imports this
module when a ``Training`` is made.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import AvgMetric, Metric
from timm.layers import convert_sync_batchnorm

from .distributed import device, gather, world_size


def swap_batch_norm(model: Any) -> list[tuple[Any, str, Any]]:
    """Every batch norm replaced by a synced one sharing its tensors; returns what :func:`unswap_batch_norm`
    needs.

    timm's converter, not torch's (which fastai uses): it keeps the activation of timm's BatchNormAct2d.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, torch.nn.SyncBatchNorm):
                setattr(parent, name, convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    return swapped


def unswap_batch_norm(swapped: list[tuple[Any, str, Any]]) -> None:
    """The original batch norms back in place, in the training mode their synced stand-ins were left in."""
    for parent, name, original in swapped:
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)


class ShardedDL(DistributedDL):
    """fastai's shard of a loader: a broadcast that works on any backend, and its true number of batches."""

    def _broadcast(self, t: list[int], src: int) -> list[int]:
        on = device() if dist.get_backend() == "nccl" else "cpu"  # nccl takes CUDA tensors only
        t = torch.tensor(t, dtype=torch.long, device=on)
        dist.broadcast(t, src)
        return t.cpu().tolist()

    @property
    def rng(self) -> Any:  # the wrapped loader's: it draws the shuffled order (checkpoints save it)
        return self.dl.rng

    def __len__(self) -> int:
        if self.dl.n is None:
            return super().__len__()
        per_rank = -(-self.dl.n // self.world_size)
        return per_rank // self.bs if self.drop_last else -(-per_rank // self.bs)


class WholeSet(Metric):
    """``func`` over the predictions of every rank at once, the shards' padding dropped."""

    def __init__(self, func: Any, name: str) -> None:
        self.func, self._name = func, name

    def reset(self) -> None:
        self.preds, self.targs = [], []

    def accumulate(self, learn: Any) -> None:
        self.preds.append(learn.to_detach(learn.pred))  # gathered over ranks, padding cut by the shard
        self.targs.append(learn.to_detach(learn.yb))

    @property
    def value(self) -> Any:
        if not self.preds:
            return None
        return self.func(torch.cat(self.preds).float(), *map(torch.cat, zip(*self.targs)))

    @property
    def name(self) -> str:
        return self._name


class Trainer(DistributedTrainer):
    """fastai's DDP trainer with sharded loaders that work on gloo, whole-set validation metrics and batch
    norm synced for the fit only."""

    def __init__(self, sync_bn: bool, cpu: bool) -> None:
        super().__init__(sync_bn=False, cpu=cpu)  # the swap is done here, so that it can be undone
        self.swap_bn, self.swapped = sync_bn, []

    def _wrap_dl(self, dl: Any) -> Any:
        return dl if isinstance(dl, ShardedDL) else ShardedDL(dl, device=self.learn.model.device)

    def before_fit(self) -> None:
        self.swapped = swap_batch_norm(self.learn.model) if self.swap_bn else []
        super().before_fit()
        self.saved_metrics = self.learn.recorder.loss, self.learn.metrics
        valid_loss = WholeSet(lambda pred, *yb: self.learn.loss_func(pred, *yb), "valid_loss")
        object.__setattr__(self.learn.recorder, "loss", valid_loss)  # a Callback warns when set its usual way
        self.learn.metrics = [WholeSet(m.func, m.name) if type(m) is AvgMetric else m for m in self.learn.metrics]

    def after_fit(self) -> None:
        super().after_fit()
        object.__setattr__(self.learn.recorder, "loss", self.saved_metrics[0])
        self.learn.metrics = self.saved_metrics[1]
        unswap_batch_norm(self.swapped)
        self.swapped = []


class Tally(Callback):
    """Training batches this process ran; ``gathered``: every process's, when a fit ends (every process ends
    its fits together, so the gather meets)."""

    def __init__(self) -> None:
        self.batches = 0
        self.gathered = [0] * world_size()

    def after_batch(self) -> None:
        if self.training:
            self.batches += 1

    def after_fit(self) -> None:
        self.gathered = gather(self.batches)
