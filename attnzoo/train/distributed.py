"""Several processes, one run: ``fit`` under ``torchrun`` or ``accelerate launch``.

A launcher starts one process per GPU (or several on CPU) and tells each who it is through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Neither launcher creates the process
group, so :func:`setup` does: nccl on CUDA with one GPU per local rank, gloo on CPU. Training goes through fastai's
``DistributedTrainer`` (DistributedDataParallel through accelerate; each process gets its shard of every
loader), with fixes where fastai's version falls short:

- the broadcast of the shuffled order also works on gloo (fastai puts the indices on CUDA);
- a shard's ``len`` is the number of batches it yields (fastai rounds the whole loader's count, which with
  ``drop_last`` can promise a batch that never comes, so the one-cycle schedule never reaches its end);
- validation loss and metrics are computed once over every rank's predictions, padding dropped (fastai
  averages per-batch values, and the items that pad the last shard count twice);
- ``sync_bn`` swaps batch norm for ``SyncBatchNorm`` during a fit only.

fastai's ``lr_find`` cannot run distributed (it saves its snapshot on rank 0 only, then waits at a barrier
only rank 0 reaches): each process runs it :func:`alone` and :func:`broadcast` hands rank 0's pick to all.

Only rank 0 prints and writes the run folder; the others return it once rank 0 is done. Without a launcher (or
with one process) nothing here changes a run.

Use: :func:`setup` first (it pins the GPU, before any data lands on one), then ``with Training(learn):`` around
each fit; :func:`is_main` guards printing and writing, :func:`alone` lets rank 0 use fastai by itself afterwards.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import AttnzooError

_state = {"owned": False}  # whether setup() created the process group (and teardown() should destroy it)


def rank() -> int:
    """This process's rank among all processes of the launch (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Processes in the launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the process that prints and writes."""
    return rank() == 0


def use_cuda() -> bool:
    """CUDA unless there is none, or ``accelerate launch --cpu`` asked for the CPU."""
    import torch

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def device() -> Any:
    """This process's device: its local rank's GPU, or the CPU."""
    import torch

    return torch.device("cuda", local_rank()) if use_cuda() else torch.device("cpu")


def _active() -> bool:
    import torch.distributed as dist

    return is_distributed() and dist.is_available() and dist.is_initialized()


def setup() -> None:
    """Join the process group the launcher described (once), on this process's GPU. No-op without a launcher."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist

    if use_cuda():
        if local_rank() >= torch.cuda.device_count():
            raise AttnzooError(f"local rank {local_rank()} has no GPU: this machine has {torch.cuda.device_count()}; "
                               "launch at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda() else "gloo")
        _state["owned"] = True
        atexit.register(teardown)  # left open until then: rank 0 still broadcasts and waits after training


def teardown() -> None:
    """Leave the process group, if :func:`setup` created it."""
    import torch.distributed as dist

    if _state["owned"] and dist.is_initialized():
        dist.destroy_process_group()
    _state["owned"] = False


def backend() -> str | None:
    """The process group's backend (``nccl``, ``gloo``), None in a single process."""
    import torch.distributed as dist

    return str(dist.get_backend()) if _active() else None


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj``, in every process."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_int(value: int, op: str = "max") -> int:
    """``value`` combined over every process (``max`` or ``min``); the value itself in a single process.
    Every process must call it at the same point of the loop."""
    if not _active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64, device=device() if backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    """Wait for every process of the launch."""
    if _active():
        import torch.distributed as dist

        dist.barrier(device_ids=[local_rank()] if backend() == "nccl" else None)


@contextmanager
def alone() -> Iterator[None]:
    """Use fastai in this process by itself, as in a single process: fastai gathers across processes whenever
    ``WORLD_SIZE`` > 1 and saves only where ``RANK`` is 0, so both are hidden meanwhile (:func:`is_main` too
    is true inside)."""
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def quiet_console() -> Any:
    """A rich console that prints nothing: what the processes other than rank 0 report to."""
    from rich.console import Console

    return Console(quiet=True)


class Training:
    """Fits inside ``with training:`` run in every process of the launch, each on its shard of the data, as one
    DistributedDataParallel model; without a launcher (or with one process) they are plain fits. Enter the same
    object around every fit of one training (not ``lr_find``: see :func:`alone`); every process must enter and
    leave together.

    ``sync_bn``: batch norm statistics over all processes (CUDA only: torch's SyncBatchNorm has no CPU kernel);
    nothing to sync in a single process.
    """

    def __init__(self, learn: Any, sync_bn: bool = False) -> None:
        import torch

        if sync_bn and is_distributed() and not use_cuda():
            raise AttnzooError("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU")
        setup()
        from . import ddp  # fastai, only once a fit is set up: importing this module stays free of it

        self.learn, self.world_size, self.backend = learn, world_size(), backend()
        self.sync_bn, self.bs = bool(sync_bn and is_distributed()), int(learn.dls.train.bs)
        self._tally = ddp.Tally()
        self._cbs = [self._tally]
        if is_distributed():
            if rank():  # each rank its own augmentation and dropout draws; rank 0 keeps a single process's
                torch.manual_seed(torch.initial_seed() + rank())
            learn.dls.to(device())
            self._cbs.append(ddp.Trainer(sync_bn=self.sync_bn, cpu=not use_cuda()))

    def __enter__(self) -> Training:
        self.learn.add_cbs(self._cbs)
        return self

    def __exit__(self, *_: Any) -> None:
        self.learn.remove_cbs(self._cbs)

    def summary(self) -> dict[str, Any]:
        """How the training was spread over processes, for the run folder's ``attnzoo.json``."""
        return dict(world_size=self.world_size, backend=self.backend, sync_bn=self.sync_bn,
                    effective_bs=self.bs * self.world_size, train_batches=self._tally.gathered)
