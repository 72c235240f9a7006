"""Denormal floats on the CPU: the first epochs of lpa-pc, with and without flush-to-zero.

With lpa-pc's softmax, the global feature g adds the same number <u, g> to every position's compatibility
score, and the softmax cancels it: the layers after the last tap (layer4 of a ResNet) get gradients of rounding
size only (about 1e-14), the second moment in Adam's state of those weights falls below 1.2e-38 into denormal
floats, and on x86 CPUs arithmetic on denormals is many times slower. ``torch.set_flush_denormal(True)``
(flush-to-zero) removes the slowdown. lpa-dp, whose scores depend on g, is the control.

Each (attention, mode) pair runs in a fresh process: the hand-written loop of ``loop_overhead.py`` from a fresh
model on the small demo set, epoch by epoch, then counts the denormals in Adam's state. A last check times
sqrt on denormals with 2 threads: flush-to-zero reaches OpenMP's worker threads only when it is set before
torch's first parallel op (the threads copy the floating-point mode when they start); set later, it covers
only the main thread's share of each op, and the op waits for the workers' slow share.

    python benchmarks/denormal.py                 # lpa-pc and lpa-dp, 3 epochs each way
    python benchmarks/denormal.py --quick         # 1 epoch each way
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common


def child(attn: str, flush: bool, epochs: int, backbone: str) -> dict:
    import torch

    if flush:
        torch.set_flush_denormal(True)
    from loop_overhead import TorchLoop, dataset

    from attnzoo.train.data import image_dataloaders

    args = argparse.Namespace(data=None, quick=True, backbone=backbone, attn=attn, img_size=64, lr=1e-3)
    dls = image_dataloaders(dataset(args), img_size=64, bs=32, num_workers=0, device="cpu")
    loop = TorchLoop(dls, args, common.Precision.for_device("cpu"))
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        loop.fit(1)
        times.append(time.perf_counter() - t)
    tiny = torch.finfo(torch.float32).tiny
    states = [s["exp_avg_sq"] for s in loop.opt.state.values()]
    denormal = sum(int(((s != 0) & (s.abs() < tiny)).sum()) for s in states)
    return dict(epoch_s=times, denormals=denormal, state_values=sum(s.numel() for s in states),
                batches_per_epoch=len(dls.train))


POOL_CHECK = r"""
import sys, time, torch
torch.set_num_threads(2)
when = sys.argv[1]
if when == "before":
    torch.set_flush_denormal(True)
tiny, normal = torch.full((1 << 23,), 1e-40), torch.full((1 << 23,), 1e-3)
normal.sqrt()  # the first parallel op: OpenMP starts its worker threads here
if when == "after":
    torch.set_flush_denormal(True)
def best(x):
    out = []
    for _ in range(5):
        t = time.perf_counter(); x.sqrt(); out.append(time.perf_counter() - t)
    return min(out)
print(best(tiny) / best(normal))
"""


def pool_check() -> dict[str, float]:
    """sqrt of denormals over sqrt of normal floats, 2 threads, flush-to-zero never / before / after the pool."""
    out = {}
    for when in ("never", "before", "after"):
        res = subprocess.run([sys.executable, "-c", POOL_CHECK, when], capture_output=True, text=True)
        out[when] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--attns", nargs="+", default=["lpa-pc", "lpa-dp"])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--epochs", type=int, default=None, help="default 3; quick 1")
    ap.add_argument("--child", nargs=2, metavar=("ATTN", "FLUSH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    common.setup(args)
    args.epochs = args.epochs or (1 if args.quick else 3)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.epochs, args.backbone)))
        return
    if args.device != "cpu":
        sys.exit("denormal.py measures a CPU effect (GPUs flush denormals in these kernels); use --device cpu")
    rows = []
    for attn in args.attns:
        for flush in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", attn, str(int(flush)),
                   "--epochs", str(args.epochs), "--backbone", args.backbone]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{attn} flush={flush} failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(attn=attn, flush_denormal=flush, **res))
            common.log(json.dumps(rows[-1]))
    table = []
    for r in rows:
        ref = next(x for x in rows if x["attn"] == r["attn"] and x["flush_denormal"])
        table.append([r["attn"], "on" if r["flush_denormal"] else "off (default)",
                      ", ".join(f"{t:.1f}" for t in r["epoch_s"]),
                      f"{sum(r['epoch_s']) / sum(ref['epoch_s']):.2f}",
                      f"{r['denormals']:,} of {r['state_values']:,}"])
    common.print_table(f"First epochs from a fresh model, {args.backbone}, demo set (192 images, 64 px, batch 32), "
                       "hand-written loop, CPU fp32",
                       ["attention", "flush-to-zero", "s per epoch", "x flush-to-zero",
                        "denormals in Adam's exp_avg_sq at the end"], table)
    pool = pool_check()
    common.print_table("sqrt of 8M denormal floats / sqrt of 8M normal ones, 2 torch threads: flush-to-zero set "
                       "never, before or after torch's first parallel op (OpenMP threads copy the mode when they "
                       "start)", ["never", "before the first parallel op", "after it"],
                       [[f"{pool['never']:.1f}x", f"{pool['before']:.1f}x", f"{pool['after']:.1f}x"]])
    common.write_json("denormal", args, dict(epochs=rows, sqrt_denormal_over_normal_2_threads=pool), args.json)


if __name__ == "__main__":
    main()
