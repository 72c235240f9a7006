"""Peak CPU memory of one training step of a big backbone at 224 px, and what attnzoo adds to it.

Each measurement runs in a fresh process: build the model, one training step (forward, cross-entropy,
backward, Adam step) on random images, then the process's peak resident memory (``ru_maxrss``). The
variants are the plain timm model (``timm.create_model``), attnzoo's baseline (``create_model(attn=None)``,
the same network) and attnzoo with each attention module at its default sites; the batch sizes give the
memory per image (the slope between the two largest) and the fixed part (weights, Adam's state, the
allocator). Memory does not depend on the load of the machine; the seconds shown do.

    python benchmarks/memory.py                          # vgg16_bn and resnet50, batches 2 and 4
    python benchmarks/memory.py --backbones vgg16_bn --batches 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common

STEP = r"""
import json, resource, sys, time, torch
backbone, attn, bs, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.set_flush_denormal(True)
if attn == "timm":
    import timm
    model = timm.create_model(backbone, num_classes=10)
else:
    import attnzoo
    model = attnzoo.create_model(backbone, None if attn == "none" else attn, num_classes=10, img_size=size)
opt = torch.optim.Adam(model.parameters(), 1e-4)
x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
start = time.perf_counter()
loss = torch.nn.functional.cross_entropy(model(x), y)
loss.backward()
opt.step()
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def measure(backbone: str, attn: str, bs: int, size: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STEP, backbone, attn, str(bs), str(size)], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["vgg16_bn", "resnet50"])
    ap.add_argument("--attns", nargs="+", default=["timm", "none", "lpa-pc", "softmask-sigmoid", "sagan"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    rows, raw = [], {}
    lo, hi = sorted(args.batches)[-2:] if len(args.batches) > 1 else (None, args.batches[0])
    for backbone in args.backbones:
        for attn in args.attns:
            peaks = {}
            for bs in args.batches:
                r = measure(backbone, attn, bs, args.size)
                peaks[bs] = r
                raw[f"{backbone}/{attn}/{bs}"] = r
                print(f"{backbone} {attn} bs {bs}: {r['peak_mb']:.0f} MB, {r['seconds']:.1f} s", file=sys.stderr)
            per_image = (peaks[hi]["peak_mb"] - peaks[lo]["peak_mb"]) / (hi - lo) if lo else float("nan")
            fixed = peaks[hi]["peak_mb"] - per_image * hi
            label = {"timm": "timm.create_model", "none": "attnzoo, no attention"}.get(attn, f"attnzoo + {attn}")
            rows.append([backbone, label, f"{peaks[hi]['params_m']:.1f}", f"{per_image:.0f}", f"{fixed:.0f}",
                         f"{peaks[hi]['peak_mb']:.0f}"])
    common.print_table(f"peak memory of one training step on the CPU, {args.size} px, Adam (batches {args.batches})",
                       ["backbone", "model", "params (M)", "MB per image", "fixed MB", f"peak MB at batch {hi}"],
                       rows)
    out = common.RESULTS / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "raw": raw, "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
