"""Training step time of each attention module vs the plain backbone, as ratios measured within one run.

A step is forward + loss + backward + AdamW step on one batch of random images (no data loading).
``create_model(backbone, attn=X)`` at X's default sites is compared with ``create_model(backbone)`` (the
same backbone, batch and image size, the same head). The plain model and one variant at a time alternate,
``--steps`` steps each, for ``--repeats`` rounds; a round's time is the fastest of its steps on the CPU (other
jobs only add time) and their mean on a GPU; a round's ratio is the variant's time over the plain model's in
that round, and the table shows the median ratio, so the load of other jobs cancels out.
``--compile`` adds ``torch.compile`` of both models (same weights) to the rotation: compiled vs eager,
compiled variant vs compiled plain, and the compile time (the first compiled step) on its own, from an empty
inductor cache (the variants reuse kernels the plain model compiled before them).

    python benchmarks/train_step.py                   # CPU: resnet18, vgg11_bn at 96 px, batch 16
    python benchmarks/train_step.py --compile --backbones resnet18
    python benchmarks/train_step.py --device cuda     # GPU: resnet50, vgg16_bn at 224 px, batch 64, bf16
    python benchmarks/train_step.py --quick           # resnet18 at 64 px, batch 8
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import common

ATTNS = ["lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"]
#: the issue's goals: step time at most this multiple of the plain backbone's
GOALS = {"lpa-pc": 1.10, "lpa-dp": 1.10, "sagan": 1.25, "softmask-sigmoid": 1.10, "softmask-softmax": 1.10}


@dataclass
class Candidate:
    """One model in the rotation: eager, or compiled (same module and optimizer, so the same weights)."""

    label: str
    step: Any
    times: list[float] = field(default_factory=list)
    first_s: float | None = None  # the first step: compilation, for a compiled candidate


def build(backbone: str, attn: str | None, args: argparse.Namespace, prec: common.Precision) -> tuple[Any, Any]:
    import torch

    from attnzoo import create_model

    torch.manual_seed(0)
    model = create_model(backbone, attn, num_classes=args.classes, img_size=args.img_size)
    model = prec.prepare(model).train()
    return model, common.adam(model.parameters(), lr=1e-4)


def candidates(model: Any, opt: Any, label: str, args: argparse.Namespace, prec: common.Precision,
               batch: tuple[Any, Any]) -> list[Candidate]:
    """The eager candidate, plus the compiled one with ``--compile``; each warmed up."""
    import torch

    out = [Candidate(label, common.train_step(model, opt, prec))]
    if args.compile:
        out.append(Candidate(f"{label} compiled", common.train_step(torch.compile(model), opt, prec)))
    for c in out:
        c.first_s = common.timed(lambda c=c: c.step(*batch), args.device)
        for _ in range(args.warmup):
            c.step(*batch)
    return out


def ratios(a: Candidate, b: Candidate) -> float:
    """Median over rounds of a's time over b's time in the same round."""
    return common.median([x / y for x, y in zip(a.times, b.times)])


def measure(backbone: str, args: argparse.Namespace, prec: common.Precision) -> list[dict[str, Any]]:
    import torch

    x = prec.input(torch.randn(args.batch, 3, args.img_size, args.img_size))
    y = torch.randint(0, args.classes, (args.batch,), device=args.device)
    model, opt = build(backbone, None, args, prec)
    plain = candidates(model, opt, "none", args, prec, (x, y))
    common.log(f"{backbone}: plain eager step {plain[0].first_s:.3f} s (first)")
    rows = []
    for attn in args.attns:
        t = time.perf_counter()
        vmodel, vopt = build(backbone, attn, args, prec)
        variant = candidates(vmodel, vopt, attn, args, prec, (x, y))
        common.log(f"{backbone} + {attn}: built and warmed up in {time.perf_counter() - t:.1f} s")
        for c in plain + variant:
            c.times.clear()
        for order in common.rotations(plain + variant, args.repeats):
            for c in order:
                c.times.append(common.timed(lambda c=c: c.step(x, y), args.device, args.steps))
        row = dict(backbone=backbone, attn=attn, sites=vmodel.sites, img_size=args.img_size, batch=args.batch,
                   plain_ms=1e3 * common.median(plain[0].times), attn_ms=1e3 * common.median(variant[0].times),
                   ratio=ratios(variant[0], plain[0]), ratio_of_min=min(variant[0].times) / min(plain[0].times),
                   goal=GOALS.get(attn),
                   round_ratios=[v / p for v, p in zip(variant[0].times, plain[0].times)])
        row["met"] = row["goal"] is None or row["ratio"] <= row["goal"]
        if args.compile:
            row.update(plain_compiled_ms=1e3 * common.median(plain[1].times),
                       attn_compiled_ms=1e3 * common.median(variant[1].times),
                       compiled_ratio=ratios(variant[1], plain[1]),
                       plain_compiled_vs_eager=ratios(plain[1], plain[0]),
                       attn_compiled_vs_eager=ratios(variant[1], variant[0]),
                       plain_compile_s=plain[1].first_s, attn_compile_s=variant[1].first_s)
        rows.append(row)
        common.log(f"  {attn}: x{row['ratio']:.3f} of plain (rounds: "
                   f"{', '.join(f'{r:.2f}' for r in row['round_ratios'])})")
        del vmodel, vopt, variant
        gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    common.add_precision_args(ap)
    ap.add_argument("--backbones", nargs="+", default=None,
                    help="timm names (default: resnet18 vgg11_bn on CPU, resnet50 vgg16_bn on GPU)")
    ap.add_argument("--attns", nargs="+", default=ATTNS)
    ap.add_argument("--img-size", type=int, default=None, help="default 96 on CPU, 224 on GPU")
    ap.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None, help="rounds of the rotation (default 5 CPU, 7 GPU; quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="steps per model per round (default 2 CPU, 10 GPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    ap.add_argument("--compile", action="store_true", help="also torch.compile each model (compile time apart)")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True) first (CPU: denormal floats in Adam's state are slow)")
    args = ap.parse_args()
    common.setup(args)

    import torch

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.compile:  # one code object (AttentionModel.forward) is compiled once per model: allow them all
        # compile times from an empty inductor cache, not from whatever earlier runs left on this machine
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="attnzoo-inductor-"))
        torch._dynamo.config.cache_size_limit = 64
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        args.backbones = args.backbones or ["resnet18"]
        args.img_size, args.batch = args.img_size or 64, args.batch or 8
        args.repeats, args.steps, args.warmup = args.repeats or 3, args.steps or 1, 1
    args.backbones = args.backbones or (["resnet50", "vgg16_bn"] if gpu else ["resnet18", "vgg11_bn"])
    args.img_size = args.img_size or (224 if gpu else 96)
    args.batch = args.batch or (64 if gpu else 16)
    args.repeats = args.repeats or (7 if gpu else 5)
    args.steps = args.steps or (10 if gpu else 2)
    prec = common.Precision.for_device(args.device, args.amp, args.channels_last)

    rows = []
    for backbone in args.backbones:
        rows += measure(backbone, args, prec)

    title = (f"Training step vs the plain backbone ({prec.describe()}; batch {args.batch}, {args.img_size} px; "
             f"median of {args.repeats} interleaved rounds of {args.steps} steps)")
    headers = ["backbone", "attention", "sites", "plain ms/step", "attn ms/step", "x plain", "goal", "met"]
    if args.compile:
        headers += ["compiled x plain compiled", "plain compiled x eager", "attn compiled x eager",
                    "compile s (plain / attn)"]
    table = []
    for r in rows:
        cells = [r["backbone"], r["attn"], ", ".join(r["sites"]), f"{r['plain_ms']:.1f}", f"{r['attn_ms']:.1f}",
                 f"{r['ratio']:.3f}", f"<= {r['goal']:.2f}", "yes" if r["met"] else "no"]
        if args.compile:
            cells += [f"{r['compiled_ratio']:.3f}", f"{r['plain_compiled_vs_eager']:.3f}",
                      f"{r['attn_compiled_vs_eager']:.3f}", f"{r['plain_compile_s']:.0f} / {r['attn_compile_s']:.0f}"]
        table.append(cells)
    common.print_table(title, headers, table)
    common.write_json("train_step", args, rows, args.json)


if __name__ == "__main__":
    main()
