"""Wall time of attnzoo commands, each a fresh subprocess, median of ``--repeats`` runs after one untimed run.

A tiny run folder is trained first (``attnzoo fit --backbone test_resnet --attn lpa-pc`` on a generated folder
of 2 x 8 demo pictures at 32 px, one epoch; its time is reported once), then ``attnzoo --help``, ``attnzoo list``
and ``attnzoo show-attention IMAGE --run RUN`` are timed, with ``python -c pass`` and ``python -c 'import
torch'`` as the floor any command that needs torch stands on. One more run of each attnzoo command under
``python -X importtime`` names the packages whose imports take the most time.

    python benchmarks/cli_latency.py
    python benchmarks/cli_latency.py --quick       # 3 repeats
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def attnzoo_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("attnzoo")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "attnzoo"]


def tiny_folder(root: Path) -> Path:
    from attnzoo.train.demo import DEMO_CLASSES, render_sample, sample_rng

    for ci, cls in enumerate(DEMO_CLASSES[:2]):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            img, _ = render_sample(sample_rng(0, "train", ci, i), cls, 32)
            img.save(root / cls / f"{cls}_{i}.png")
    return root


def wall(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return dt


def imports(args: list[str], cwd: Path, top: int = 4) -> dict[str, float]:
    """Seconds of import time per top-level package (``python -X importtime``), the largest ``top``."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "attnzoo", *args], cwd=cwd, capture_output=True,
                         text=True)
    seconds: dict[str, float] = {}
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2][1:]  # the column's space; then two more per nesting level
        if name.startswith("  ") and not name.startswith("   "):
            root = name.strip().split(".")[0]
            seconds[root] = seconds.get(root, 0.0) + int(parts[1]) / 1e6
    return dict(sorted(seconds.items(), key=lambda kv: -kv[1])[:top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per command (default 7; quick 3)")
    args = ap.parse_args()
    common.setup(args)
    args.repeats = args.repeats or (3 if args.quick else 7)
    az = attnzoo_cmd()
    tmp = Path(tempfile.mkdtemp(prefix="attnzoo-cli-bench-"))
    try:
        data = tiny_folder(tmp / "data")
        run = tmp / "run"
        fit_s = wall(az + ["fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--data", str(data),
                           "--no-pretrained", "--epochs", "1", "--img-size", "32", "--bs", "8", "--out", str(run)], tmp)
        common.log(f"tiny fit: {fit_s:.1f} s")
        image = next((data / "circle").iterdir())
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "attnzoo --help": az + ["--help"],
            "attnzoo list": az + ["list"],
            "attnzoo show-attention IMG --run RUN": az + ["show-attention", str(image), "--run", str(run),
                                                          "--out", str(tmp / "attention.png")],
        }
        rows = []
        for label, cmd in commands.items():
            wall(cmd, tmp)  # untimed: the page cache, Python's bytecode cache
            times = [wall(cmd, tmp) for _ in range(args.repeats)]
            rows.append(dict(command=label, median_s=common.median(times), min_s=min(times), runs_s=times,
                             imports_s=imports(cmd[len(az):], tmp) if label.startswith("attnzoo") else {}))
            common.log(f"{label}: {rows[-1]['median_s']:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.print_table(f"attnzoo command wall time (median of {args.repeats}; tiny fit, once: {fit_s:.1f} s)",
                       ["command", "median s", "min s", "largest imports, s (python -X importtime)"],
                       [[r["command"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}",
                         ", ".join(f"{k} {v:.2f}" for k, v in r["imports_s"].items())] for r in rows])
    common.write_json("cli_latency", args, dict(rows=rows, tiny_fit_s=fit_s), args.json)


if __name__ == "__main__":
    main()
