"""Torch threads on a small CPU: training step time with 1 thread and with every core, on a quiet machine and
with a competing CPU-bound job, to choose ``--threads``' default from data.

Each setting runs in its own process (torch's thread pool is fixed at its first parallel op), ``--steps``
training steps of the quick-start model (resnet18 + lpa-pc, 64 px, batch 64, Adam) on random images after two
warm-up steps; a round alternates the settings, and the table shows each setting's median step time over the
rounds with the load average seen. "busy" starts one competing process per ``--busy`` (a tight numpy loop,
one thread each) for the duration of the round.

    python benchmarks/threads.py                   # quiet and busy, 1 vs all cores
    python benchmarks/threads.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import common

STEP = r"""
import os, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
torch.set_flush_denormal(True)
import attnzoo
model = attnzoo.create_model("resnet18", "lpa-pc", num_classes=6, img_size=64)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 6, (64,))
times = []
for i in range(int(sys.argv[2]) + 2):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
print(sorted(times[2:])[len(times[2:]) // 2])
"""


def step_time(threads: int, steps: int, busy: int) -> tuple[float, float]:
    stop = mp.Event()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": "1"}
    spinners = [mp.Process(target=common.spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    try:
        out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(steps)], capture_output=True, text=True,
                             env=env, check=True).stdout
        load = os.getloadavg()[0]
    finally:
        stop.set()
        for p in spinners:
            p.join()
    return float(out.strip().splitlines()[-1]), load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--busy", type=int, default=1, help="competing processes in the busy condition")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    settings = [(cond, busy, t) for cond, busy in (("quiet", 0), ("busy", args.busy)) for t in sorted({1, cores})]
    results: dict[tuple[str, int], list[float]] = {(c, t): [] for c, _, t in settings}
    loads: dict[tuple[str, int], list[float]] = {(c, t): [] for c, _, t in settings}
    for r in range(args.rounds):
        for cond, busy, t in settings:
            s, load = step_time(t, args.steps, busy)
            results[cond, t].append(s)
            loads[cond, t].append(load)
            print(f"round {r + 1}: {cond}, {t} thread(s): {s:.3f} s/step (load {load:.1f})", file=sys.stderr)
    rows = []
    for cond, _, t in settings:
        med = statistics.median(results[cond, t])
        base = statistics.median(results[cond, 1])
        rows.append([cond, t, f"{med:.3f}", f"{med / base:.2f}", f"{statistics.mean(loads[cond, t]):.1f}"])
    common.print_table(f"torch threads on {cores} cores, resnet18 + lpa-pc training step, 64 px, batch 64",
                       ["machine", "threads", "s/step (median)", "vs 1 thread", "load avg"], rows)
    out = common.RESULTS / "threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": cores, "rows": rows, "raw": {f"{c}/{t}": v for (c, t), v in results.items()},
                               "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
