"""The README's quick start under a machine that changes while it runs: does ``--threads auto`` follow?

Each case runs the quick-start ``attnzoo fit`` (resnet10t + lpa-pc, the demo set, 12 epochs, batch 32, from
scratch) in a fresh process and times it, wall clock, beside a competing CPU-bound job (a tight numpy loop, one
thread, like ``benchmarks/threads.py``'s "busy"):

- ``quiet``: no competing job;
- ``job starts``: the job starts ``--after`` seconds into the fit and runs to its end;
- ``job stops``: the job runs from before the fit starts and stops ``--after`` seconds into it.

Each case runs with ``--threads auto`` (threads follow the machine) and, where the machine changes, with the
thread count auto would have fixed when the fit started (2 on a quiet machine, 1 beside a busy job: attnzoo 0.1's
behaviour), so the table shows what following is worth. Run it on an otherwise quiet machine: it takes about 5 x
the quick start.

    python benchmarks/threads_follow.py               # every case
    python benchmarks/threads_follow.py --after 30 --cases quiet,starts
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

FIT = ["fit", "--backbone", "resnet10t", "--attn", "lpa-pc", "--data", "demo", "--no-pretrained", "--epochs", "12",
       "--bs", "32"]


def run_fit(threads: str, job: str, after: float, epochs: int) -> dict[str, float | list[int]]:
    """Seconds the quick-start fit takes with ``--threads threads`` while the competing job ``job`` (none, starts,
    stops) does what it does, and the threads each epoch ran with."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env.pop("OMP_NUM_THREADS", None)  # attnzoo decides
    stop = mp.Event()
    spinner = mp.Process(target=common.spin, args=(stop,), daemon=True)
    out = Path(tempfile.mkdtemp(prefix="attnzoo-follow-")) / "run"
    command = [sys.executable, "-m", "attnzoo", *FIT[:-4], "--epochs", str(epochs), *FIT[-2:], "--threads", threads,
               "--out", str(out)]
    if job == "stops":
        spinner.start()
        time.sleep(2.0)  # a job already running when the fit starts
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if job in ("starts", "stops"):
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            if job == "starts":
                spinner.start()
            else:
                stop.set()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    if spinner.is_alive():
        spinner.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"fit failed ({proc.returncode}): {err[-2000:]}")
    record = json.loads((out / "attnzoo.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"seconds": seconds, "threads_start": record.get("threads"),
            "threads_per_epoch": record.get("threads_per_epoch", []),
            "accuracy": record["metrics"]["final"].get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--after", type=float, default=20.0, help="seconds into the fit when the job starts/stops")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cases", default="quiet,starts,stops")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    fixed = {"quiet": None, "starts": "2", "stops": "1"}  # what auto fixed at the start in attnzoo 0.1 (quiet: same)
    rows = []
    for case in args.cases.split(","):
        for threads in ("auto", fixed[case]) if fixed[case] else ("auto",):
            job = {"quiet": "none"}.get(case, case)
            result = run_fit(threads, job, args.after, args.epochs)
            rows.append({"case": case, "threads": threads, **result})
            print(f"{case:>8}  --threads {threads:<4}  {result['seconds']:7.1f} s  accuracy {result['accuracy']:.3f}  "
                  f"threads per epoch {result['threads_per_epoch']}", flush=True)
    quiet = next((r["seconds"] for r in rows if r["case"] == "quiet" and r["threads"] == "auto"), None)
    common.print_table("the quick start, the machine changing under it", ["case", "--threads", "seconds", "x quiet",
                                                                          "threads per epoch"],
                       [[r["case"], r["threads"], f"{r['seconds']:.1f}",
                         f"{r['seconds'] / quiet:.2f}" if quiet else "-", " ".join(map(str, r["threads_per_epoch"]))]
                        for r in rows])
    common.write_json("threads_follow", args, rows)


if __name__ == "__main__":
    main()
