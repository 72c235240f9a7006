"""SAGAN self-attention: attnzoo's two backends vs the naive N x N layer, memory and time.

Each (implementation, map size) runs in a fresh subprocess; peak memory is the growth of the process's
peak resident set (CPU) or torch.cuda.max_memory_allocated (GPU) over one forward + backward. The growth table
divides each size's memory and time by the previous size's: with S doubling, N = S*S grows 4x, so a layer
linear in N shows about 4x and one quadratic in N about 16x.

    python benchmarks/sagan_memory.py                 # (1, 64, S, S), S = 32, 64, 128 on CPU
    python benchmarks/sagan_memory.py --device cuda   # S = 32, 64, 128, 256 (--amp bf16: the flash kernels)
    python benchmarks/sagan_memory.py --quick         # S = 32, 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

CHILD = r"""
import json, resource, sys, time, torch
from attnzoo.attention.sagan import SelfAttention, naive_self_attention
import contextlib
impl, device, amp = sys.argv[1], sys.argv[5], sys.argv[7]
b, c, s, steps = (int(v) for v in (sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6]))
cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
torch.manual_seed(0)
m = SelfAttention(c, backend=impl if impl in ("sdpa", "chunked") else "auto").to(device)
with torch.no_grad():
    m.gamma.fill_(0.5)
x = torch.randn(b, c, s, s, device=device, requires_grad=True)
fwd = (lambda: naive_self_attention(m, x)[0]) if impl == "naive" else (lambda: m(x))
def step():
    with cast:
        y = fwd()
    y.float().square().mean().backward()
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


def measure(impl: str, b: int, c: int, s: int, device: str, steps: int, amp: str = "none") -> dict:
    """One subprocess; peak memory of the warm-up counts for CPU since ru_maxrss never decreases."""
    if device == "cpu":  # measure the warm-up too: the first step's peak is the one that matters on CPU
        code = CHILD.replace("step()  # warm-up\n", "")
    else:
        code = CHILD
    out = subprocess.run([sys.executable, "-c", code, impl, str(b), str(c), str(s), device, str(steps), amp],
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": "out of memory" if out.returncode in (-9, 137) or "memory" in tail.lower() else tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(r: dict, prev: dict | None, key: str, unit: str, digits: int) -> tuple[str, str]:
    """The value and its growth over the previous size ('-' where either is missing)."""
    if "error" in r:
        return r["error"], "-"
    growth = f"x{r[key] / prev[key]:.1f}" if prev and "error" not in prev and prev[key] > 0 else "-"
    return f"{r[key]:.{digits}f}", growth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="map sides S (default 32 64 128; GPU +256)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast (GPU: flash kernels)")
    ap.add_argument("--naive-limit-gb", type=float, default=None,
                    help="skip the naive layer where its N x N matrices alone would pass this "
                         "(default 12 on CPU, 80%% of the GPU's memory on GPU)")
    ap.add_argument("--impls", nargs="+", default=["chunked", "sdpa", "naive"],
                    help="attnzoo's backends (chunked: the CPU default, sdpa: the GPU default) and the naive layer")
    args = ap.parse_args()
    common.setup(args)
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.sizes = [32, 64]
    args.sizes = args.sizes or ([32, 64, 128, 256] if gpu else [32, 64, 128])
    if args.naive_limit_gb is None:
        import torch

        args.naive_limit_gb = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 12.0
    rows = []
    for s in args.sizes:
        n = s * s
        bytes_per = 2 if args.amp == "bf16" else 4
        nn_gb = 3 * args.batch * n * n * bytes_per / 2**30  # energy, softmax, and its gradient
        for impl in args.impls:
            if impl == "naive" and nn_gb > args.naive_limit_gb:
                res = {"error": f"skipped: needs ~{nn_gb:.0f} GB for N x N"}
            else:
                res = measure(impl, args.batch, args.channels, s, args.device, args.steps, args.amp)
            rows.append({"impl": impl, "size": s, "N": n, **res})
            common.log(json.dumps(rows[-1]))
    what = "torch.cuda.max_memory_allocated" if gpu else "peak resident memory"
    headers, table = ["S", "N"], []
    for impl in args.impls:
        headers += [f"{impl} peak MB", "x prev", f"{impl} s/step", "x prev"]
    prev: dict[str, dict] = {}
    for s in args.sizes:
        cells = [str(s), str(s * s)]
        for impl in args.impls:
            r = next(r for r in rows if r["size"] == s and r["impl"] == impl)
            cells += [*cell(r, prev.get(impl), "peak_mb", "MB", 0), *cell(r, prev.get(impl), "step_s", "s", 3)]
            prev[impl] = r
        table.append(cells)
    common.print_table(f"SAGAN forward+backward, ({args.batch}, {args.channels}, S, S), {args.device}, "
                       f"{'bf16 autocast' if args.amp == 'bf16' else 'fp32'}; peak = growth of {what}; "
                       "x prev = over the previous size (N x4: linear ~x4, quadratic ~x16)", headers, table)
    common.write_json("sagan_memory", args, rows, args.json)


if __name__ == "__main__":
    main()
