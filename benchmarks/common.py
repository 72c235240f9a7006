"""What the benchmark scripts share: device and precision, one training step, timing, tables, JSON.

Precision follows ``attention_learner``: on a GPU, bf16 autocast where supported (else fp16 with a grad
scaler) and channels_last; on the CPU, fp32 and the default memory format.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats: seconds to a minute on CPU")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default results/NAME.json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). 1 on a machine shared with other jobs: there an "
                         "OpenMP barrier waits for a descheduled thread and times swing tenfold")


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` to this process and, through the environment, to the processes it starts."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)


@dataclass(frozen=True)
class Precision:
    """How tensors run on ``device``: autocast dtype (None: fp32) and memory format."""

    device: str
    amp: str | None  # "bf16", "fp16" or None
    channels_last: bool

    @classmethod
    def for_device(cls, device: str, amp: str = "auto", channels_last: bool | None = None) -> Precision:
        import torch

        on_gpu = torch.device(device).type == "cuda"
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "none"
        return cls(device, None if amp == "none" else amp, on_gpu if channels_last is None else channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    def prepare(self, model: Any) -> Any:
        import torch

        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: Any) -> Any:
        import torch

        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        return f"{self.device}, {self.amp or 'fp32'}{', channels_last' if self.channels_last else ''}"


def add_precision_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                    help="autocast dtype (auto: bf16 on a GPU that supports it, else fp16; none on CPU)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last memory format (default: on for GPU)")


def train_step(model: Any, opt: Any, prec: Precision, loss_fn: Any = None,
               mark: Callable[[str], None] | None = None) -> Callable[[Any, Any], Any]:
    """``step(x, y) -> loss``: forward, loss, backward and optimizer step, as a plain PyTorch loop does it.

    ``mark(phase)``, if given, is called as each phase ends (forward, backward, step, zero_grad).
    """
    import torch

    loss_fn = loss_fn or torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(torch.device(prec.device).type) if prec.amp == "fp16" else None
    mark = mark or (lambda _: None)

    def step(x: Any, y: Any) -> Any:
        with prec.autocast():
            loss = loss_fn(model(x), y)
        mark("forward")
        if scaler is None:
            loss.backward()
            mark("backward")
            opt.step()
        else:
            scaler.scale(loss).backward()
            mark("backward")
            scaler.step(opt)
            scaler.update()
        mark("step")
        opt.zero_grad(set_to_none=True)
        mark("zero_grad")
        return loss

    return step


def adam(params: Any, lr: float = 1e-3) -> Any:
    """torch's AdamW with fastai's Adam defaults (betas 0.9/0.99, eps 1e-5, decoupled wd 0.01)."""
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)


def sync(device: str) -> None:
    import torch

    if torch_device_type(device) == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, n: int = 1) -> float:
    """Seconds per call of ``fn``, the device synchronised before and after.

    On a GPU the mean of ``n`` calls in a row (they overlap with the host, as in training). On the CPU,
    the fastest of ``n`` calls: other jobs can only add time, so the minimum is the least disturbed.
    """
    if torch_device_type(device) == "cuda":
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t) / n
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def torch_device_type(device: str) -> str:
    import torch

    return torch.device(device).type


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rotations(items: Sequence[Any], rounds: int) -> Iterator[list[Any]]:
    """The items in a different order each round, so no item always runs first (warm caches) or last."""
    for r in range(rounds):
        k = r % len(items)
        yield list(items[k:]) + list(items[:k])


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n\n{markdown_table(headers, rows)}\n", flush=True)


def machine(device: str) -> dict[str, Any]:
    import fastai
    import timm
    import torch

    info: dict[str, Any] = dict(
        platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
        fastai=fastai.__version__, device=device,
    )
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(name: str, args: argparse.Namespace, results: Any, path: Path | None = None) -> Path:
    """``results/NAME.json``: the machine, the arguments and the rows."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = dict(benchmark=name, argv=sys.argv[1:], machine=machine(args.device), args=cfg, results=results)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def spin(stop: Any) -> None:
    """A competing CPU-bound job of one thread (numpy matrix products) until ``stop`` (a multiprocessing Event)
    is set: the "busy" machine of the thread benchmarks."""
    import numpy as np

    a = np.random.rand(256, 256)
    while not stop.is_set():
        a = np.tanh(a @ a.T / 256.0)
