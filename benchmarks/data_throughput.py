"""Data pipeline throughput vs training throughput, per DataLoader worker count: does the device wait on data?

A folder of JPEGs (demo pictures rendered at ``--source-size``, generated once into attnzoo's cache folder, or
``--data``) goes through attnzoo's ``image_dataloaders`` with 0, 1, 2, ... workers:

- ``decoded``: images per second out of the train DataLoader with its batch transforms switched off (decode,
  squash-resize, collate, to the device);
- ``+ augmented``: with attnzoo's batch transforms (flip, affine, lighting, normalisation) on the device, which
  is what training consumes;
- ``fed training``: the training step (``common.train_step``: forward, backward, AdamW) fed by that loader;
- ``training alone``: the same step on random tensors already on the device, the rate the model could go.

When ``fed training`` falls short of ``training alone``, the device waits on data. The recommendation is the
fewest workers whose fed training rate is within 5% of the best measured. On a CPU the workers and the
training share the same cores, so more workers can slow training down.

    python benchmarks/data_throughput.py                  # CPU: resnet18, 224 px, batch 16, workers 0 1 2
    python benchmarks/data_throughput.py --device cuda    # resnet50, 224 px, batch 64, bf16, workers 0 1 2 4 8 ...
    python benchmarks/data_throughput.py --quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import common


def jpeg_folder(n: int, size: int) -> Path:
    """``n`` demo pictures as JPEGs (quality 90) in class folders; made once, reused after."""
    from attnzoo.train.demo import DEMO_CLASSES, demo_root, render_sample, sample_rng

    root = demo_root().parent / f"benchmark-jpeg-{size}px-{n}"
    if (root / "done").is_file():
        return root
    for i in range(n):
        ci = i % len(DEMO_CLASSES)
        cls = DEMO_CLASSES[ci]
        img, _ = render_sample(sample_rng(0, "train", ci, i), cls, size)
        (root / cls).mkdir(parents=True, exist_ok=True)
        img.save(root / cls / f"{cls}_{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def loader_rate(dl: Any, batches: int, on_batch: Any = None, device: str = "cpu") -> tuple[float, float]:
    """(seconds to the first batch, images per second over the next ``batches`` batches)."""
    common.sync(device)
    t0 = time.perf_counter()
    it = iter(dl)
    xb, yb = next(it)
    if on_batch:
        on_batch(xb, yb)
    common.sync(device)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            xb, yb = next(it)
        except StopIteration:
            break
        if on_batch:
            on_batch(xb, yb)
        n += len(xb)
    common.sync(device)
    t2 = time.perf_counter()
    for _ in it:  # finish the pass so the workers shut down cleanly
        pass
    return t1 - t0, n / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    common.add_precision_args(ap)
    ap.add_argument("--data", default=None, help="an image folder instead of the generated JPEGs")
    ap.add_argument("--backbone", default=None, help="default resnet18 on CPU, resnet50 on GPU")
    ap.add_argument("--attn", default="lpa-pc")
    ap.add_argument("--img-size", type=int, default=None, help="default 224 (quick: 128)")
    ap.add_argument("--source-size", type=int, default=None, help="side of the generated JPEGs (default img-size)")
    ap.add_argument("--bs", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts (default 0 1 2 4 8 ... up to the CPU count)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per measurement (default 6 CPU, 20 GPU)")
    args = ap.parse_args()
    common.setup(args)

    import timm
    import torch

    from attnzoo import create_model
    from attnzoo.train.data import find_dataset, image_dataloaders

    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    args.backbone = args.backbone or ("resnet50" if gpu else "resnet18")
    args.img_size = args.img_size or (128 if args.quick else 224)
    args.source_size = args.source_size or args.img_size
    args.bs = args.bs or (64 if gpu else 16)
    args.batches = args.batches or (3 if args.quick else 20 if gpu else 6)
    cpus = os.cpu_count() or 1
    args.workers = args.workers or [w for w in (0, 1, 2, 4, 8, 16, 32) if w <= cpus]
    # the train split needs a first batch plus the timed ones, with the 10% validation split taken out
    n_images = int(args.bs * (args.batches + 2) / 0.9) + 1
    root = Path(args.data) if args.data else jpeg_folder(n_images, args.source_size)
    info = find_dataset(root, valid_pct=0.1)
    prec = common.Precision.for_device(args.device, args.amp, args.channels_last)
    cfg = timm.models.get_pretrained_cfg(args.backbone)

    torch.manual_seed(0)
    model = prec.prepare(create_model(args.backbone, args.attn, num_classes=len(info.classes),
                                      img_size=args.img_size)).train()
    step = common.train_step(model, common.adam(model.parameters(), 1e-4), prec)
    x = prec.input(torch.randn(args.bs, 3, args.img_size, args.img_size))
    y = torch.randint(0, len(info.classes), (args.bs,), device=args.device)
    for _ in range(2):
        step(x, y)
    alone = args.bs / common.median([common.timed(lambda: step(x, y), args.device) for _ in range(args.batches)])
    common.log(f"training alone: {alone:.1f} img/s ({args.backbone} + {args.attn}, {prec.describe()})")

    def fed(xb: Any, yb: Any) -> None:
        step(prec.input(xb.as_subclass(torch.Tensor)), yb.as_subclass(torch.Tensor))

    rows = []
    for w in args.workers:
        dls = image_dataloaders(info, img_size=args.img_size, bs=args.bs, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                num_workers=w, device=args.device)
        dl = dls.train
        after_batch = dl.after_batch
        dl.after_batch = lambda b: b
        start, decoded = loader_rate(dl, args.batches, device=args.device)
        dl.after_batch = after_batch
        _, augmented = loader_rate(dl, args.batches, device=args.device)
        _, fed_rate = loader_rate(dl, args.batches, on_batch=fed, device=args.device)
        rows.append(dict(workers=w, first_batch_s=start, decoded_img_s=decoded, augmented_img_s=augmented,
                         fed_training_img_s=fed_rate, training_alone_img_s=alone))
        common.log(f"{w} workers: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k != "workers"))

    best = max(r["fed_training_img_s"] for r in rows)
    pick = next(r for r in rows if r["fed_training_img_s"] >= 0.95 * best)
    waits = pick["fed_training_img_s"] < 0.9 * alone
    table = [[r["workers"], f"{r['first_batch_s']:.2f}", f"{r['decoded_img_s']:.0f}", f"{r['augmented_img_s']:.0f}",
              f"{r['fed_training_img_s']:.1f}", f"{r['fed_training_img_s'] / alone:.2f}"] for r in rows]
    common.print_table(
        f"Data vs training throughput, images/s: {root.name} ({len(info.train)} train images, "
        f"{args.source_size} px JPEG -> {args.img_size} px), batch {args.bs}, {args.backbone} + {args.attn}, "
        f"{prec.describe()}; training alone (random tensors on the device): {alone:.1f} img/s",
        ["workers", "first batch s", "decoded img/s", "+ augmented img/s", "fed training img/s",
         "fed / alone"], table)
    advice = (f"recommended workers: {pick['workers']} (fed training {pick['fed_training_img_s']:.1f} img/s, "
              f"{pick['fed_training_img_s'] / alone:.0%} of training alone; "
              + ("the device still waits on data: " if waits else "the device does not wait on data")
              + ("decoding is the bottleneck, more CPU cores would help)" if waits else ")"))
    print(advice)
    common.write_json("data_throughput", args, dict(rows=rows, training_alone_img_s=alone,
                                                    recommended_workers=pick["workers"], device_waits=waits,
                                                    recommendation=advice), args.json)


if __name__ == "__main__":
    main()
