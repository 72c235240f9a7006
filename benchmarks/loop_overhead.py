"""attnzoo's fastai training loop vs a minimal hand-written PyTorch loop, per epoch, and where the time goes.

Both loops train the same model (``create_model``) on the same fastai DataLoaders from attnzoo's
``image_dataloaders`` (the PyTorch loop iterates them directly, so data costs the same) with Adam, a one-cycle
schedule, and a validation pass with loss and accuracy each epoch:

- ``attnzoo``: ``attention_learner`` + ``fit_one_cycle`` with the callbacks ``attnzoo.train.fit`` installs
  (History, RichProgress drawing to a terminal, fastai's ProgressCallback removed) and fastai's Adam;
- ``attnzoo, no RichProgress``, ``attnzoo, torch AdamW`` (fastai's ``OptimWrapper``) and ``attnzoo, grads set to
  None`` (a callback frees the gradients after each step instead of fastai zeroing them): what each costs;
- ``pytorch``: a for loop with ``torch.optim.AdamW`` (fastai's Adam defaults) and ``OneCycleLR``;
- ``data only``: the same DataLoaders iterated with no model, the floor of both.

The loops alternate (``--repeats`` rounds, a different order each round); each round's time is divided by the
PyTorch loop's in that round, and the median ratio is reported, for wall time and for the process's CPU time
(which other jobs on the machine disturb less; DataLoader workers are other processes and do not count).
Instrumented epochs of each loop (alternating, the fastest time of each phase kept) then split the time into
phases: data, forward, backward, optimizer step, zero_grad, and fastai's callbacks one by one (fastai's
``Learner._call_one`` and ``Callback.__call__`` are wrapped in this process only).

On the CPU denormal floats are flushed to zero in both loops from the start (``--keep-denormals`` to keep
them): with lpa-pc the Adam state of the layers after the last tap fills with denormals, which slows a step by
up to a third (``denormal.py``), by an amount that depends on each model's state and would blur the loops'
difference.

    python benchmarks/loop_overhead.py                  # demo set, resnet18 + lpa-pc, 64 px, batch 32
    python benchmarks/loop_overhead.py --device cuda    # bf16 + channels_last on both sides, as attnzoo does
    python benchmarks/loop_overhead.py --quick
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import common

GOAL = 1.05  # the goal: attnzoo's loop at most 5% slower than the hand-written one


def dataset(args: argparse.Namespace) -> Any:
    from attnzoo.train.data import find_dataset, resolve_data
    from attnzoo.train.demo import demo_root, make_demo

    if args.data:
        return find_dataset(args.data)
    if args.quick:  # a small demo set of its own, next to the standard one
        root = demo_root().parent / "benchmark-demo-192"
        return find_dataset(make_demo(root, n_train=192, n_valid=64, size=64))
    return find_dataset(resolve_data("demo"))


def plain(t: Any) -> Any:
    """fastai's tensor subclasses as plain tensors (fastai's CastToTensor does the same for its loop)."""
    import torch

    return t.as_subclass(torch.Tensor)


class TorchLoop:
    """The minimal hand-written loop: AdamW, OneCycleLR, a validation pass with loss and accuracy."""

    label = "pytorch"

    def __init__(self, dls: Any, args: argparse.Namespace, prec: common.Precision):
        import torch

        from attnzoo import create_model

        torch.manual_seed(0)
        self.model = prec.prepare(create_model(args.backbone, args.attn, num_classes=dls.c, img_size=args.img_size))
        self.opt = common.adam(self.model.parameters(), args.lr)
        self.dls, self.prec, self.lr = dls, prec, args.lr
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def fit(self, epochs: int, mark: Callable[[str], None] | None = None) -> dict[str, float]:
        import torch

        mark = mark or (lambda _: None)
        # fastai's one-cycle defaults: 25% warm-up, div 25, final div 1e5
        sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=self.lr, total_steps=epochs * len(self.dls.train),
                                                    pct_start=0.25, div_factor=25.0, final_div_factor=1e5)
        step = common.train_step(self.model, self.opt, self.prec, self.loss_fn, mark=mark)
        for _ in range(epochs):
            self.model.train()
            train_loss = torch.zeros((), device=self.prec.device)
            mark("other")
            for xb, yb in self.dls.train:
                mark("data")
                train_loss += step(self.prec.input(plain(xb)), plain(yb)).detach()
                sched.step()
                mark("scheduler")
            self.model.eval()
            valid_loss = torch.zeros((), device=self.prec.device)
            correct = torch.zeros((), device=self.prec.device)
            with torch.no_grad():
                for xb, yb in self.dls.valid:
                    mark("data")
                    yb = plain(yb)
                    with self.prec.autocast():
                        out = self.model(self.prec.input(plain(xb)))
                        valid_loss += self.loss_fn(out, yb) * len(yb)
                    correct += (out.argmax(1) == yb).sum()
                    mark("forward")
            n = len(self.dls.valid.dataset)
            result = dict(train_loss=train_loss.item() / len(self.dls.train), valid_loss=valid_loss.item() / n,
                          accuracy=correct.item() / n)
            mark("other")
        return result


class FastaiLoop:
    """``attention_learner`` + ``fit_one_cycle`` with attnzoo's callbacks, as ``attnzoo.train.fit`` sets them."""

    def __init__(self, dls: Any, args: argparse.Namespace, rich: bool = True, torch_opt: bool = False,
                 grads_to_none: bool = False):
        import torch
        from fastai.callback.progress import ProgressCallback
        from fastai.optimizer import OptimWrapper
        from rich.console import Console

        from attnzoo.train.learner import History, attention_learner

        kw: dict[str, Any] = {}
        if torch_opt:
            kw["opt_func"] = partial(OptimWrapper, opt=partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5))
        torch.manual_seed(0)
        self.learn = attention_learner(dls, args.backbone, args.attn, pretrained=False, cbs=[History()], **kw)
        self.learn.remove_cb(ProgressCallback)
        if grads_to_none:
            self.learn.add_cb(GradsToNone())
        self.learn.logger = lambda *_: None
        self.rich, self.lr = rich, args.lr
        # a terminal, so rich draws its live display as it does for a user (into /dev/null)
        self.console = Console(file=open(os.devnull, "w"), force_terminal=True, width=120)  # noqa: SIM115
        self.label = "attnzoo" + ("" if rich else ", no RichProgress") + (", torch AdamW" if torch_opt else "") + (
            ", grads set to None" if grads_to_none else "")

    def fit(self, epochs: int) -> dict[str, float]:
        import contextlib

        from attnzoo.train.learner import RichProgress

        cbs = self.learn.added_cbs(RichProgress(self.console, total_epochs=epochs)) if self.rich else \
            contextlib.nullcontext()
        with cbs:
            self.learn.fit_one_cycle(epochs, self.lr)
        vals = self.learn.recorder.values[-1]
        return dict(train_loss=float(vals[0]), valid_loss=float(vals[1]), accuracy=float(vals[2]))


def GradsToNone() -> Any:  # noqa: N802 (a Callback class, made on demand so fastai loads lazily)
    """Frees the gradients after the optimizer step, as torch's ``zero_grad(set_to_none=True)`` does.

    fastai's optimizer zeroes them in place instead, so every backward adds into the old gradient tensors
    rather than writing fresh ones: the "attnzoo, grads set to None" row measures what that costs.
    """
    from fastai.callback.core import Callback

    class _GradsToNone(Callback):
        order = 100

        def after_step(self) -> None:
            for p in self.learn.model.parameters():
                p.grad = None

    return _GradsToNone()


class DataOnly:
    label = "data only"

    def __init__(self, dls: Any):
        self.dls = dls

    def fit(self, epochs: int) -> dict[str, float]:
        for _ in range(epochs):
            for dl in (self.dls.train, self.dls.valid):
                for xb, yb in dl:
                    plain(xb), plain(yb)
        return {}


class Phases:
    """Seconds per phase, by marks: each mark closes the phase that ran since the previous one."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        common.sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.t
        self.t = now


#: the work between two fastai events (the callbacks run at the events themselves)
_BETWEEN = {("before_batch", "after_pred"): "forward", ("after_pred", "after_loss"): "loss",
            ("before_backward", "after_backward"): "backward", ("before_step", "after_step"): "step",
            ("after_step", "after_batch"): "zero_grad", ("after_batch", "before_batch"): "data",
            ("before_train", "before_batch"): "data", ("before_validate", "before_batch"): "data",
            ("after_batch", "after_train"): "data", ("after_batch", "after_validate"): "data",
            ("after_loss", "after_batch"): "forward"}  # validation: no backward, loss counted as forward


def profile_fastai(loop: FastaiLoop, device: str) -> dict[str, float]:
    """One epoch, split into the phases between fastai's events and the time of each callback."""
    from fastai.callback.core import Callback
    from fastai.learner import Learner

    phases = Phases(device)
    last = ["before_fit"]
    per_cb: dict[str, float] = defaultdict(float)
    orig_call_one, orig_cb_call = Learner._call_one, Callback.__call__

    def call_one(self: Any, event_name: str) -> None:
        phases.mark(_BETWEEN.get((last[0], event_name), "other"))
        orig_call_one(self, event_name)
        phases.mark("callbacks (fastai event dispatch)")
        last[0] = event_name

    def cb_call(self: Any, event_name: str) -> Any:
        common.sync(device)
        t = time.perf_counter()
        try:
            return orig_cb_call(self, event_name)
        finally:
            common.sync(device)
            per_cb[type(self).__name__] += time.perf_counter() - t

    Learner._call_one, Callback.__call__ = call_one, cb_call
    try:
        loop.fit(1)
    finally:
        Learner._call_one, Callback.__call__ = orig_call_one, orig_cb_call
    out = dict(phases.seconds)
    dispatch = out.pop("callbacks (fastai event dispatch)", 0.0)
    for name, s in sorted(per_cb.items(), key=lambda kv: -kv[1]):
        out[f"callback {name}"] = s
    out["callbacks (fastai event dispatch)"] = dispatch - sum(per_cb.values())
    return out


def profile_torch(loop: TorchLoop, device: str) -> dict[str, float]:
    phases = Phases(device)
    loop.fit(1, mark=phases.mark)
    return dict(phases.seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--attn", default="lpa-pc")
    ap.add_argument("--data", default=None, help="image folder (default: the demo set; --quick: a 192-image one)")
    ap.add_argument("--img-size", type=int, default=None, help="default 64 (as attnzoo fit on the demo set)")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: attnzoo's default)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per loop per round")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
    ap.add_argument("--profile-epochs", type=int, default=2, help="instrumented epochs per loop (fastest kept)")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="do not flush denormal floats to zero on the CPU (see denormal.py: with lpa-pc they make "
                         "the first epochs many times slower, by an amount that depends on each model's state)")
    args = ap.parse_args()
    common.setup(args)
    args.repeats = args.repeats or 3
    args.img_size = args.img_size or 64

    import timm
    import torch

    from attnzoo.train.data import image_dataloaders

    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True

    def flush() -> None:
        """Again before every loop: attnzoo's FlushDenormals callback turns flushing off after each fit."""
        if not (gpu or args.keep_denormals):
            torch.set_flush_denormal(True)

    flush()  # now, before torch's first parallel op, so that OpenMP's threads start with it
    cfg = timm.models.get_pretrained_cfg(args.backbone)
    info = dataset(args)
    dls = image_dataloaders(info, img_size=args.img_size, bs=args.bs, mean=tuple(cfg.mean), std=tuple(cfg.std),
                            num_workers=args.workers, device=args.device)
    prec = common.Precision.for_device(args.device)
    common.log(f"data: {info.root}: {len(info.train)} train, {len(info.valid)} valid images; "
               f"{len(dls.train)} + {len(dls.valid)} batches per epoch; {dls.train.fake_l.num_workers} workers")
    torch_loop = TorchLoop(dls, args, prec)
    loops: list[Any] = [torch_loop, FastaiLoop(dls, args), FastaiLoop(dls, args, rich=False),
                        FastaiLoop(dls, args, torch_opt=True), FastaiLoop(dls, args, grads_to_none=True),
                        DataOnly(dls)]
    for loop in loops:  # warm-up: first allocations, the loader's first pass
        loop.fit(1)
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    metrics: dict[str, dict[str, float]] = {}
    for r, order in enumerate(common.rotations(loops, args.repeats)):
        for loop in order:
            flush()
            common.sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            metrics[loop.label] = loop.fit(args.epochs)
            common.sync(args.device)
            times[loop.label].append((time.perf_counter() - t) / args.epochs)
            cpu[loop.label].append((time.process_time() - c) / args.epochs)
        common.log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    rows = []
    for loop in loops:
        t, c = times[loop.label], cpu[loop.label]
        rows.append(dict(loop=loop.label, epoch_s=common.median(t), ratio=common.median(
            [a / b for a, b in zip(t, times["pytorch"])]), cpu_s=common.median(c), cpu_ratio=common.median(
            [a / b for a, b in zip(c, cpu["pytorch"])]), round_s=t, round_cpu_s=c, metrics=metrics.get(loop.label, {})))

    common.log(f"profiling {args.profile_epochs} epochs of each loop")
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for _ in range(args.profile_epochs):
        flush()
        runs["pytorch"].append(profile_torch(torch_loop, args.device))
        runs["attnzoo"].append(profile_fastai(loops[1], args.device))
    prof = {k: {p: min(r.get(p, 0.0) for r in v) for p in dict.fromkeys(p for r in v for p in r)}
            for k, v in runs.items()}

    title = (f"Epoch time, {args.backbone} + {args.attn}, {prec.describe()}, {args.img_size} px, batch {args.bs}, "
             f"{len(dls.train)} + {len(dls.valid)} batches, {dls.train.fake_l.num_workers} workers"
             f"{'' if gpu or args.keep_denormals else ', denormals flushed'} "
             f"(median of {args.repeats} interleaved rounds)")
    table = [[r["loop"], f"{r['epoch_s']:.2f}", f"{r['ratio']:.3f}", f"{r['cpu_s']:.2f}", f"{r['cpu_ratio']:.3f}",
              "goal <= 1.05: " + ("met" if r["ratio"] <= GOAL else "not met") if r["loop"] == "attnzoo" else ""]
             for r in rows]
    common.print_table(title, ["loop", "wall s/epoch", "x pytorch", "process CPU s/epoch", "x pytorch", ""], table)
    names = list(dict.fromkeys(list(prof["pytorch"]) + list(prof["attnzoo"])))
    order = ["data", "forward", "loss", "backward", "step", "zero_grad", "scheduler"]
    names = [n for n in order if n in names] + [n for n in names if n not in order]
    ptotal, ftotal = sum(prof["pytorch"].values()), sum(prof["attnzoo"].values())
    prows = [[n, f"{prof['pytorch'].get(n, 0.0):.3f}", f"{prof['attnzoo'].get(n, 0.0):.3f}",
              f"{prof['attnzoo'].get(n, 0.0) - prof['pytorch'].get(n, 0.0):+.3f}"] for n in names]
    prows.append(["total", f"{ptotal:.3f}", f"{ftotal:.3f}", f"{ftotal - ptotal:+.3f}"])
    common.print_table(f"Where an epoch's time goes (seconds per phase, the fastest of {args.profile_epochs} "
                       "instrumented epochs; the device synchronised at every phase boundary)",
                       ["phase", "pytorch", "attnzoo", "difference"], prows)
    common.write_json("loop_overhead", args, dict(loops=rows, phases=prof, goal=GOAL), args.json)


if __name__ == "__main__":
    main()
