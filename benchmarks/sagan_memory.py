"""SAGAN self-attention: attnzoo's two backends vs the naive N x N layer, memory and time.

Each (implementation, map size) runs in a fresh subprocess; peak memory is the growth of the process's
peak resident set (CPU) or torch.cuda.max_memory_allocated (GPU) over one forward + backward.

    python benchmarks/sagan_memory.py                 # (1, 64, S, S), S = 32, 64, 128 on CPU
    python benchmarks/sagan_memory.py --sizes 64 128 256 --device cuda
    python benchmarks/sagan_memory.py --quick         # S = 32, 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from attnzoo.attention.sagan import SelfAttention, naive_self_attention
impl, device = sys.argv[1], sys.argv[5]
b, c, s, steps = (int(v) for v in (sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6]))
torch.manual_seed(0)
m = SelfAttention(c, backend=impl if impl in ("sdpa", "chunked") else "auto").to(device)
with torch.no_grad():
    m.gamma.fill_(0.5)
x = torch.randn(b, c, s, s, device=device, requires_grad=True)
fwd = (lambda: naive_self_attention(m, x)[0]) if impl == "naive" else (lambda: m(x))
def step():
    fwd().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
step()  # warm-up
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t) / steps
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"peak_mb": peak / 2**20, "step_s": dt}))
"""


def measure(impl: str, b: int, c: int, s: int, device: str, steps: int) -> dict:
    """One subprocess; peak memory of the warm-up counts for CPU since ru_maxrss never decreases."""
    if device == "cpu":  # measure the warm-up too: the first step's peak is the one that matters on CPU
        code = CHILD.replace("step()  # warm-up\n", "")
    else:
        code = CHILD
    out = subprocess.run([sys.executable, "-c", code, impl, str(b), str(c), str(s), device, str(steps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": "out of memory" if out.returncode in (-9, 137) or "memory" in tail.lower() else tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--naive-limit-gb", type=float, default=12.0,
                    help="skip the naive layer where its N x N matrices alone would pass this")
    ap.add_argument("--quick", action="store_true", help="sizes 32 and 64 only")
    ap.add_argument("--impls", nargs="+", default=["chunked", "sdpa", "naive"],
                    help="attnzoo's backends (chunked: the CPU default, sdpa: the GPU default) and the naive layer")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    sizes = [32, 64] if args.quick else args.sizes
    rows = []
    for s in sizes:
        n = s * s
        nn_gb = 3 * args.batch * n * n * 4 / 2**30  # energy, softmax, and its gradient, fp32
        for impl in args.impls:
            if impl == "naive" and nn_gb > args.naive_limit_gb:
                res = {"error": f"skipped: needs ~{nn_gb:.0f} GB for N x N"}
            else:
                res = measure(impl, args.batch, args.channels, s, args.device, args.steps)
            rows.append({"impl": impl, "size": s, "N": n, **res})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nSAGAN forward+backward, ({args.batch}, {args.channels}, S, S), device {args.device}\n")
    print("| S | N | " + " | ".join(f"{i} peak MB | {i} s/step" for i in args.impls) + " |")
    print("|---|---|" + "---|---|" * len(args.impls))
    for s in sizes:
        cells = []
        for impl in args.impls:
            r = next(r for r in rows if r["size"] == s and r["impl"] == impl)
            cells.append(f"{r['error']} | -" if "error" in r else f"{r['peak_mb']:.0f} | {r['step_s']:.3f}")
        print(f"| {s} | {s * s} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
