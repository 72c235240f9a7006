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
              "--epochs", "2", "--bs", "8", "--img-size", "32", "--out", str(tmp_path / "run")])
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


def test_other_processes_busy_cores_are_measured_from_the_kernels_counters_less_our_own():
    import time

    from attnzoo.train.threads import CpuMeter

    meter = CpuMeter()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # this process keeps a core busy: not another job's
        pass
    others = meter.others()
    assert others is None or 0.0 <= others <= os.cpu_count() - 0.5


@pytest.mark.parametrize("value", ["0", "-1", "many", "100000"])
def test_a_thread_count_out_of_range_is_refused(value):
    with pytest.raises(AttnzooError, match="--threads"):
        use_threads(value)
