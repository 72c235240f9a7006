"""`attnzoo sweep`: what the sweep machinery costs, how to split a small machine's cores, and a sweep on real images.

    python benchmarks/sweep.py digits /tmp/digits           # the OpenCV digits as class folders, with boxes.csv
    python benchmarks/sweep.py overhead --data /tmp/digits  # the sweep's own seconds per trial against fit's
    python benchmarks/sweep.py jobs --data /tmp/digits      # --jobs 2 x 1 thread against --jobs 1 x 2 threads
    python benchmarks/sweep.py real --data /tmp/digits --out /tmp/digits-sweep   # the README's sweep

``digits``: OpenCV's sample sheet of 5000 handwritten digits (``apt-get install opencv-doc`` puts it at
/usr/share/doc/opencv-doc/examples/data/digits.png), 20x20 cells, 500 per digit; OpenCV's own samples train on the
first 50 columns of each digit's rows and test on the last 50: here train/ and valid/, 250 images per class each,
and boxes.csv, the bounding box of each digit's ink, so that the leaderboard scores the maps' pointing game.

``overhead``: a sweep in this process; per trial, the seconds in ``fit`` and the seconds of the sweep's own work
around it (taking the trial from the storage, checking its run folder, reading its result, telling the study),
and once per sweep the set-up (checks, the study, the grid) and the leaderboard.

``jobs``: the same grid twice per round, once with ``--jobs 2 --threads 1`` and once with ``--jobs 1 --threads
2``, each a fresh sweep in its own process (startup included: it is what a user waits for), alternating the order
round by round; trials per minute of wall time. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
TINY = dict(epochs=1, bs=8, img_size=32, pretrained=False)


def make_digits(out: Path, sheet: Path = DIGITS) -> Path:
    """train/ and valid/ class folders of the OpenCV digits (20x20 grey PNGs), and boxes.csv (ink boxes)."""
    import numpy as np
    from PIL import Image

    if not sheet.is_file():
        sys.exit(f"{sheet} not found: apt-get install opencv-doc")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} already holds files: give a new folder")
    cells = np.asarray(Image.open(sheet).convert("L"))  # 1000 x 2000: 50 rows of 100 cells, 5 rows per digit
    rows = []
    for digit in range(10):
        for r in range(5):
            for c in range(100):
                cell = cells[(digit * 5 + r) * 20:(digit * 5 + r + 1) * 20, c * 20:(c + 1) * 20]
                split = "train" if c < 50 else "valid"
                name = f"{split}/{digit}/{digit}-{r * 100 + c:03d}.png"
                (out / split / str(digit)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(cell).save(out / name)
                ys, xs = np.nonzero(cell > 32)
                if len(xs):
                    rows.append([name, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    with open(out / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "x_min", "y_min", "x_max", "y_max"], *rows])
    print(f"{out}: 2500 train and 2500 valid images of 10 digits, {len(rows)} boxes")
    return out


def overhead(args: argparse.Namespace) -> dict:
    import optuna  # noqa: F401  (imported before the clock starts: a command's startup is not the sweep's work)

    import attnzoo
    import attnzoo.explain.compare  # noqa: F401
    import attnzoo.train.fit  # noqa: F401

    events = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        attnzoo.sweep(args.backbone, str(args.data), args.attn, seeds=args.seeds, out=Path(tmp) / "s",
                      threads=args.threads or 1, on_trial=events.append,
                      **({**TINY, "epochs": args.epochs} if args.tiny else dict(epochs=args.epochs, bs=args.bs,
                                                                                img_size=args.img_size,
                                                                                pretrained=False)))
        wall = time.perf_counter() - start
    fit = [e.fit_seconds for e in events]
    own = [e.sweep_seconds for e in events]
    once = wall - sum(fit) - sum(own)
    print(f"{'trial':>5}  {'config':<32} {'seed':>4}  {'fit s':>8}  {'sweep s':>8}  {'sweep/fit':>9}")
    for e in events:
        print(f"{e.number:>5}  {e.config:<32} {e.seed:>4}  {e.fit_seconds:>8.2f}  {e.sweep_seconds:>8.3f}  "
              f"{e.sweep_seconds / e.fit_seconds:>9.2%}")
    print(f"per trial: median sweep/fit {statistics.median(o / f for o, f in zip(own, fit)):.2%} "
          f"(sweep {statistics.median(own):.3f} s, fit {statistics.median(fit):.2f} s); once per sweep (checks, "
          f"study, grid, leaderboard): {once:.2f} s = {once / sum(fit):.2%} of the {sum(fit):.1f} s of training")
    return dict(trials=[dict(config=e.config, seed=e.seed, fit=e.fit_seconds, sweep=e.sweep_seconds) for e in events],
                wall=wall, once=once)


def jobs(args: argparse.Namespace) -> dict:
    settings = ["--epochs", str(args.epochs), "--bs", str(args.bs), "--img-size", str(args.img_size),
                "--no-pretrained", "--no-plots"]
    if args.tiny:
        settings = ["--epochs", "1", "--bs", "8", "--img-size", "32", "--no-pretrained", "--no-plots"]
    setups = {"2 jobs x 1 thread": ["--jobs", "2", "--threads", "1"],
              "1 job x 2 threads": ["--jobs", "1", "--threads", "2"]}
    times: dict[str, list[float]] = {k: [] for k in setups}
    n = None
    for r, order in enumerate(common.rotations(list(setups), args.rounds)):
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                command = [sys.executable, "-m", "attnzoo", "sweep", "--backbone", args.backbone, "--data",
                           str(args.data), "--attn", args.attn, "--seeds", str(args.seeds), "--out",
                           str(Path(tmp) / "s"), *settings, *setups[name], "--json"]
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                times[name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    sys.exit(done.stderr[-2000:])
                import json

                n = json.loads(done.stdout)["counts"]["complete"]
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s for {n} trials", flush=True)
    common.print_table(f"{n} trials ({args.backbone}, {args.attn} and none x {args.seeds} seeds), {args.rounds} rounds",
                       ["setup", "median wall s", "trials/min"],
                       [[name, common.median(ts), 60 * (n or 0) / common.median(ts)] for name, ts in times.items()])
    a, b = (statistics.median(times[k]) for k in setups)
    print(f"2 jobs x 1 thread finish in {a / b:.2f}x the time of 1 job x 2 threads")
    return dict(times=times, trials=n)


def real(args: argparse.Namespace) -> None:
    from attnzoo.cli import main

    main(["sweep", "--backbone", args.backbone, "--data", str(args.data), "--attn", args.attn, "--seeds",
          str(args.seeds), "--epochs", str(args.epochs), "--bs", str(args.bs), "--img-size", str(args.img_size),
          "--no-pretrained", "--jobs", str(args.jobs), "--out", str(args.out)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    digits = sub.add_parser("digits", help="the OpenCV digits as an image folder")
    digits.add_argument("out", type=Path)
    for name in ("overhead", "jobs", "real"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--backbone", default="resnet18")
        p.add_argument("--attn", default="lpa-pc,sagan,softmask-sigmoid")
        p.add_argument("--seeds", type=int, default=3 if name == "real" else 2)
        p.add_argument("--epochs", type=int, default=3 if name == "real" else 1)
        p.add_argument("--bs", type=int, default=64)
        p.add_argument("--img-size", type=int, default=32)
        p.add_argument("--tiny", action="store_true", help="test_resnet-sized settings: a smoke test in seconds")
        if name == "jobs":
            p.add_argument("--rounds", type=int, default=2)
        if name == "real":
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--jobs", type=int, default=1)
        if name == "overhead":
            p.add_argument("--threads", type=int, default=None)
        if name != "real":
            p.add_argument("--json", type=Path, default=None, help="default: results/sweep_NAME.json")
        p.set_defaults(device="cpu")
    args = ap.parse_args()
    if args.what == "digits":
        make_digits(args.out)
    elif args.what == "real":
        real(args)
    else:
        result = (overhead if args.what == "overhead" else jobs)(args)
        common.write_json(f"sweep_{args.what}", args, result, args.json)


if __name__ == "__main__":
    main()
