"""What a person sees: output that fits the terminal and pipes, help without placeholders, one epoch table,
a next step to paste, and torch threads that do not fight over busy cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.cli import main
from attnzoo.errors import AttnzooError
from attnzoo.train.threads import idle_cores, use_threads


def attnzoo(*args: str, columns: int = 80, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    return subprocess.run([sys.executable, "-m", "attnzoo", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_list_through_a_pipe_shows_every_name_whole_on_its_own_line():
    out = attnzoo("list").stdout
    first_fields = [line.split("\t")[0] for line in out.splitlines() if not line.startswith("#")]
    names = [m["name"] for m in json.loads(attnzoo("list", "--json").stdout)]  # (this process has test modules)
    assert "softmask-sigmoid" in names
    for name in names:
        assert name in first_fields, f"{name} not whole in: {out}"
    assert "\x1b[" not in out  # no styling into a pipe


def test_help_shows_no_placeholders_on_flags():
    for command in ([], ["fit"], ["show-attention"], ["list"]):
        out = attnzoo(*command, "--help").stdout
        assert "<bool>" not in out and "{images}" not in out, out


def test_fit_prints_one_epoch_table_and_a_next_step_that_runs(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--data", str(tiny_folder), "--no-pretrained",
              "--epochs", "2", "--bs", "8", "--img-size", "32", "--no-plots", "--out", str(tmp_path / "run")])
    assert e.value.code == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("train_loss") == 1  # one table header, not a table at the end as well
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"]
    assert "batches" not in text
    hint = next(line for line in captured.out.splitlines() if "attnzoo show-attention" in line)
    command = hint.split(": ", 1)[1].split()
    assert Path(command[2]).is_file()  # a real validation image
    assert any("attnzoo interpret" in line for line in captured.out.splitlines())
    with pytest.raises(SystemExit) as e:
        main(command[1:] + ["--out", str(tmp_path / "fig.png")])
    assert e.value.code == 0 and (tmp_path / "fig.png").is_file()


def test_auto_threads_take_the_idle_cores(monkeypatch):
    import torch

    from attnzoo.train import threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "_busy_cores", lambda: 64.0)
        assert idle_cores() == 1 and use_threads("auto") == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "_busy_cores", lambda: 0.0)
        assert idle_cores() == len(os.sched_getaffinity(0))
        assert use_threads("auto", workers=1) == max(1, idle_cores() - 1)  # a DataLoader worker has a core
        assert use_threads(None) is None and torch.get_num_threads() == max(1, idle_cores() - 1)
        monkeypatch.setattr(threads, "_busy_cores", lambda: None)  # no /proc/stat: the load average
        monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        assert idle_cores() == 1
    finally:
        torch.set_num_threads(before)


def test_other_processes_busy_cores_are_the_kernels_count_less_our_own(monkeypatch):
    from attnzoo.train import threads

    # /proc/stat counts every CPU (2 here): 200 jiffies of which 0 idle in 1 s is 2 busy cores; this process used
    # 1 s of CPU in that second, so others kept 1 core busy
    readings = iter([(1000, 500, 10.0, 100.0), (1200, 500, 11.0, 101.0)])
    monkeypatch.setattr(threads.CpuMeter, "_read", staticmethod(lambda: next(readings)))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.CpuMeter().others() == pytest.approx(1.0)
    assert threads.free_cores(1.0, cpus=2) == 1 and threads.free_cores(0.1, cpus=2) == 2
    assert threads.free_cores(0.35, cpus=2) == 1  # a third of a core taken already stalls an OpenMP barrier


def test_the_cpu_meter_reads_this_machines_counters():
    from attnzoo.train.threads import CpuMeter

    others = CpuMeter().others()
    assert others is None or 0.0 <= others <= os.cpu_count()


@pytest.mark.parametrize("value", ["0", "-1", "many", "100000"])
def test_a_thread_count_out_of_range_is_refused(value):
    with pytest.raises(AttnzooError, match="--threads"):
        use_threads(value)
