"""Run every benchmark, one subprocess each, and write all their JSON to benchmarks/results/.

    python benchmarks/run_all.py --quick                  # CPU, small sizes, a few minutes
    python benchmarks/run_all.py --threads 1              # the full sizes (tens of minutes on 2 CPU cores)
    python benchmarks/run_all.py --device cuda            # on a GPU (denormal.py is CPU-only and is skipped)
    python benchmarks/run_all.py --quick --only train_step loop_overhead
    python benchmarks/run_all.py --quick --out /tmp/bench    # JSON there instead of benchmarks/results/
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_step", "loop_overhead", "denormal", "data_throughput", "cli_latency", "sagan_memory"]
CPU_ONLY = {"denormal"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="passed on (see common.py)")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON files (default benchmarks/results)")
    args = ap.parse_args()
    failed = []
    timings = []
    for name in args.only or SCRIPTS:
        if name in CPU_ONLY and args.device != "cpu":
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--json", str(args.out / f"{name}.json")] if args.out else []
        print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        timings.append((name, time.perf_counter() - t, rc))
        if rc != 0:
            failed.append(name)
    print("\n| benchmark | wall s | status |\n|---|---|---|")
    for name, s, rc in timings:
        print(f"| {name} | {s:.0f} | {'ok' if rc == 0 else f'failed ({rc})'} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
