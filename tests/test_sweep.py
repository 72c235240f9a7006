"""`attnzoo sweep`: an Optuna study of modules x sites x seeds, each trial an ordinary run folder, and a leaderboard
whose statistics are checked against numbers computed here from the run folders' own attnzoo.json."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from test_cli import one_line, run_cli
from test_interpret import make_boxed_folder
from torch import nn

import attnzoo
from attnzoo import register_attention
from attnzoo.errors import AttnzooError, Interrupted
from attnzoo.explain.stats import leaderboard, mean_std, paired_difference, pareto_front, verdict
from attnzoo.runs.folder import RunFolder, is_run_folder

optuna = pytest.importorskip("optuna")

TINY = ["--backbone", "test_resnet", "--no-pretrained", "--epochs", "1", "--bs", "8", "--img-size", "32",
        "--no-plots", "--threads", "1", "--jobs", "1"]


def epochs(args: list[str], n: int) -> list[str]:
    """``args`` with ``--epochs n``."""
    i = args.index("--epochs")
    return [*args[:i + 1], str(n), *args[i + 2:]]


TINY_API = dict(epochs=1, bs=8, img_size=32, pretrained=False, plots=False, threads=1)


@register_attention("test-sweep-wrong-shape", kind="gate", summary="test only: cannot sit anywhere")
class WrongShape(nn.Module):
    """Returns twice the channels: the model cannot be built, so its trials fail before training."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1)


@register_attention("test-sweep-ctrl-c", kind="gate", summary="test only: presses Ctrl-C once, mid-training")
class CtrlC(nn.Module):
    """Sends this process SIGINT at its fifth training forward (the second epoch), once per process."""

    calls = 0

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            CtrlC.calls += 1
            if CtrlC.calls == 5:
                os.kill(os.getpid(), signal.SIGINT)
        return x * self.scale


def records(folder: Path) -> dict[tuple[str, int], dict]:
    """Every trial's attnzoo.json, by (module label, seed), read here without attnzoo's own readers."""
    out = {}
    for run in sorted((folder / "trials").iterdir()):
        record = json.loads((run / "attnzoo.json").read_text())
        label = "none" if record["attn"] == "none" else f"{record['attn']}@{'+'.join(record['sites'])}"
        out[(label, record["seed"])] = record
    return out


def study_trials(folder: Path, name: str | None = None) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(study_name=name or folder.name, storage=storage).get_trials()


# --- the statistics -------------------------------------------------------------------------------------------

def test_mean_and_sample_std_are_statistics_mean_and_stdev():
    values = [0.81, 0.84, 0.79, 0.9]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert math.isnan(mean_std([0.5])[1]) and math.isnan(mean_std([])[0])


def test_the_paired_interval_is_the_t_interval_of_the_differences_by_seed():
    module = {0: 0.88, 1: 0.88, 2: 0.90, 3: 0.87}
    base = {0: 0.85, 1: 0.86, 2: 0.86, 3: 0.84, 9: 0.99}  # seed 9 has no pair: left out
    d = np.array([0.03, 0.02, 0.04, 0.03])
    half = scipy_stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    got = paired_difference(module, base)
    assert got.n == 4 and got.mean == pytest.approx(d.mean())
    assert (got.low, got.high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert got.verdict == "better"  # the whole interval is above 0
    assert paired_difference({0: 0.5}, {0: 0.4}).verdict == "no evidence"  # one pair: no interval


def test_the_verdict_is_read_off_the_interval():
    assert [verdict(0.01, 0.02), verdict(-0.01, 0.02), verdict(-0.02, -0.01)] == ["better", "no evidence", "worse"]


def test_the_pareto_front_keeps_what_nothing_beats_on_both_accuracy_and_cost():
    assert pareto_front([0.9, 0.8, 0.95, 0.85, float("nan")], [10, 5, 20, 30, 1]) == [True, True, True, False, False]


def test_the_leaderboard_counts_seeds_and_failures():
    results = [dict(config="none", seed=s, state="complete", accuracy=a, valid_loss=0.5) for s, a in
               enumerate([0.8, 0.7])]
    results += [dict(config="m@l3", seed=0, state="complete", accuracy=0.9, valid_loss=0.4),
                dict(config="m@l3", seed=1, state="failed", error="NaN")]
    rows = {r.config: r for r in leaderboard(results)}
    assert (rows["m@l3"].seeds, rows["m@l3"].failed, rows["m@l3"].errors) == (1, 1, ("NaN",))
    assert rows["m@l3"].pairs == 1 and rows["m@l3"].verdict == "no evidence"
    assert rows["none"].accuracy == pytest.approx(0.75) and rows["none"].verdict == "baseline"


# --- a small sweep --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(tiny_folder, tmp_path_factory):
    """2 modules + none x 2 seeds, one epoch each, from the command line."""
    folder = tmp_path_factory.mktemp("sweeps") / "small"
    with pytest.raises(SystemExit) as e:
        from attnzoo.cli import main

        main(["sweep", *TINY, "--data", str(tiny_folder), "--attn", "sagan,softmask-sigmoid", "--seeds", "2",
              "--out", str(folder)])
    assert e.value.code == 0
    return folder


def test_a_sweep_trains_every_configuration_once_per_seed_into_ordinary_run_folders(swept):
    runs = records(swept)
    assert sorted(runs) == [(c, s) for c in ("none", "sagan@layer3", "softmask-sigmoid@layer3") for s in (0, 1)]
    assert all(r["status"] == "done" and len(r["metrics"]["per_epoch"]) == 1 for r in runs.values())
    for (_, seed), r in runs.items():  # the same settings and split as the baseline of its seed
        base = runs[("none", seed)]
        assert r["data"]["counts"] == base["data"]["counts"] and r["request"]["lr"] == base["request"]["lr"]
    run = attnzoo.load_run(swept / "trials" / "sagan@layer3-seed1")  # show-attention, interpret, export read it
    assert run.classes == ["blue", "green", "red"]
    trials = study_trials(swept)
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)


def test_the_leaderboard_agrees_with_the_run_folders_numbers(swept):
    runs = records(swept)
    board = json.loads((swept / "leaderboard.json").read_text())
    rows = {r["config"]: r for r in board["rows"]}
    base = {s: runs[("none", s)]["metrics"]["final"]["accuracy"] for s in (0, 1)}
    for config, row in rows.items():
        acc = np.array([runs[(config, s)]["metrics"]["final"]["accuracy"] for s in (0, 1)])
        loss = np.array([runs[(config, s)]["metrics"]["final"]["valid_loss"] for s in (0, 1)])
        assert row["seeds"] == 2 and row["failed"] == 0
        assert row["accuracy"] == pytest.approx(acc.mean()) and row["accuracy_std"] == pytest.approx(acc.std(ddof=1))
        assert row["valid_loss"] == pytest.approx(loss.mean())
        assert row["valid_loss_std"] == pytest.approx(loss.std(ddof=1))
        if config == "none":
            assert row["verdict"] == "baseline"
            continue
        d = acc - np.array([base[0], base[1]])
        assert row["pairs"] == 2 and row["difference"] == pytest.approx(d.mean())
        if d.std(ddof=1) > 0:
            half = scipy_stats.t.ppf(0.975, 1) * d.std(ddof=1) / math.sqrt(2)
            assert row["low"] == pytest.approx(d.mean() - half) and row["high"] == pytest.approx(d.mean() + half)
        expected = "better" if row["low"] > 0 else "worse" if row["high"] < 0 else "no evidence"
        assert row["verdict"] == expected
        shares = [runs[(config, s)]["maps"]["layer3"]["share"] for s in (0, 1)]
        assert row["map"] == "layer3" and row["share"] == pytest.approx(np.mean(shares))
        times = [runs[(config, s)]["metrics"]["per_epoch"][0]["time"] for s in (0, 1)]
        assert row["time_per_epoch"] == pytest.approx(np.mean(times))
    assert rows["sagan@layer3"]["params"] > rows["none"]["params"]
    assert rows["none"]["pareto"]  # the fewest parameters: nothing is cheaper
    csv_lines = (swept / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("config,seeds,")
    assert (swept / "leaderboard.png").stat().st_size > 1000
    assert "is the difference real" not in (swept / "leaderboard.html").read_text()  # the chart is an image
    assert "<table>" in (swept / "leaderboard.html").read_text()


def test_the_same_command_again_trains_nothing_and_another_command_is_refused(swept, tiny_folder, capsys):
    weights = {p: p.stat().st_mtime_ns for p in swept.glob("trials/*/model.safetensors")}
    code, _, _ = run_cli(capsys, "sweep", *TINY, "--data", str(tiny_folder), "--attn", "sagan,softmask-sigmoid",
                         "--seeds", "2", "--out", str(swept))
    assert code == 0 and len(study_trials(swept)) == 6
    assert {p: p.stat().st_mtime_ns for p in swept.glob("trials/*/model.safetensors")} == weights
    code, _, err = run_cli(capsys, "sweep", *epochs(TINY, 2), "--data", str(tiny_folder), "--attn",
                           "sagan,softmask-sigmoid", "--seeds", "2", "--out", str(swept))
    assert one_line(code, err) and "epochs=1" in err and "--join" in err
    code, out, _ = run_cli(capsys, "sweep", "--join", str(swept), "--json")
    assert code == 0 and json.loads(out)["counts"]["complete"] == 6


def test_the_leaderboard_in_a_narrow_terminal_is_records_not_numbers_folded_apart(swept, capsys, monkeypatch):
    """At 80 columns rich folded every number of the table into 2-character slivers: a row per block there."""
    board = json.loads((swept / "leaderboard.json").read_text())
    cells = {}
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal, though the output is captured
    for columns in (80, 240):
        monkeypatch.setenv("COLUMNS", str(columns))
        code, out, err = run_cli(capsys, "sweep", "--join", str(swept), "--jobs", "1")
        assert code == 0, err
        cells[columns] = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert all(len(line.rstrip()) <= columns for line in cells[columns].splitlines())
    for row in board["rows"]:
        accuracy = f"{row['accuracy']:.4f} ± {row['accuracy_std']:.4f}"
        assert accuracy in cells[80] and accuracy in cells[240]  # whole numbers at either width
        assert f"\n  accuracy          {accuracy}\n" in cells[80]  # a record: the column's name, then the cell
    assert "config " in cells[240] and "\n  accuracy  " not in cells[240]  # wide enough: the table


def test_compare_gives_the_same_statistics_for_runs_that_differ_only_in_their_seed(swept, capsys):
    from attnzoo.explain.compare import compare_runs, with_seeds

    runs = sorted((swept / "trials").iterdir())
    board = {r["config"]: r for r in json.loads((swept / "leaderboard.json").read_text())["rows"]}
    rows = compare_runs(runs)
    with_seeds(rows, runs)
    for row in rows:
        stats = row["over_seeds"]
        same = board[stats["config"]]
        assert stats["accuracy"] == pytest.approx(same["accuracy"]) and stats["verdict"] == same["verdict"]
    code, out, _ = run_cli(capsys, "compare", *map(str, runs), "--out", str(swept.parent / "compare.png"))
    assert code == 0 and "over seeds" in out


# --- faults ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--attn", "sagan,sagn"], "unknown attention module 'sagn'; did you mean 'sagan'"),
    (["--attn", "sagan", "--seeds", "0"], "--seeds must be at least 1"),
    (["--attn", "sagan", "--storage", "sqlite:////no/such/folder/x.db"], "cannot open the storage"),
    (["--attn", "sagan", "--lr", "0.1..0.01"], "--lr range"),
    (["--attn", "sagan", "--prune"], "--prune needs --lr LOW..HIGH"),
])
def test_usage_mistakes_are_one_line_before_any_training(tiny_folder, tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "sweep", *TINY, "--data", str(tiny_folder), *args, "--out", str(tmp_path / "s"))
    assert one_line(code, err) and message in err and not out
    assert not (tmp_path / "s").exists()


def test_a_trial_that_fails_is_recorded_with_its_reason_and_the_sweep_goes_on(tiny_folder, tmp_path):
    board = attnzoo.sweep("test_resnet", str(tiny_folder), "test-sweep-wrong-shape", seeds=1, out=tmp_path / "s",
                          **TINY_API)
    rows = {r.config: r for r in board.rows}
    bad = rows["test-sweep-wrong-shape@layer3"]
    assert (bad.seeds, bad.failed) == (0, 1) and "test-sweep-wrong-shape" in bad.errors[0]
    assert rows["none"].seeds == 1
    assert {t.state.name for t in study_trials(tmp_path / "s")} == {"COMPLETE", "FAIL"}


def test_ctrl_c_mid_trial_is_continued_by_the_same_command_from_its_checkpoint(tiny_folder, tmp_path):
    folder, calls = tmp_path / "s", dict(attn="test-sweep-ctrl-c", seeds=1, out=tmp_path / "s",
                                         **{**TINY_API, "epochs": 2})
    with pytest.raises(Interrupted, match="run the same command"):
        attnzoo.sweep("test_resnet", str(tiny_folder), **calls)
    stopped = folder / "trials" / "test-sweep-ctrl-c@layer3-seed0"
    interrupted = json.loads((stopped / "attnzoo.json").read_text())
    assert interrupted["status"] == "interrupted" and len(interrupted["metrics"]["per_epoch"]) == 1
    assert (stopped / "checkpoints" / "last.safetensors").is_file()  # epoch 1, to resume from
    baseline = (folder / "trials" / "none-seed0" / "model.safetensors").stat().st_mtime_ns

    board = attnzoo.sweep("test_resnet", str(tiny_folder), **calls)
    assert board.counts() == {"complete": 2, "failed": 0, "pruned": 0, "pending": 0}
    record = json.loads((stopped / "attnzoo.json").read_text())
    assert record["status"] == "done" and [r["epoch"] for r in record["metrics"]["per_epoch"]] == [1, 2]
    assert record["metrics"]["per_epoch"][0] == interrupted["metrics"]["per_epoch"][0]  # resumed, not retrained
    assert (folder / "trials" / "none-seed0" / "model.safetensors").stat().st_mtime_ns == baseline  # not retrained
    trials = study_trials(folder)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # given back, then retried once
    assert trials[2].user_attrs["retry_of"] == 1


def test_a_trial_left_running_by_a_process_that_is_gone_goes_back_into_the_queue(tiny_folder, tmp_path):
    from attnzoo.runs.sweep import Worker, check, prepare

    calls = dict(attn="sagan", seeds=1, out=tmp_path / "s", **TINY_API)
    place, _ = prepare(check("test_resnet", str(tiny_folder), **calls))
    worker = Worker(place, {"threads": 1})
    _, trial_id = worker.take()  # as a process that is then killed: the trial stays running
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker.storage.set_trial_user_attr(trial_id, "worker", {"host": socket.gethostname(), "pid": gone.pid})
    board = attnzoo.sweep("test_resnet", str(tiny_folder), **calls)
    assert board.counts()["complete"] == 2
    states = [t.state.name for t in study_trials(tmp_path / "s")]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]  # the lost trial failed, its retry completed


def test_nothing_is_written_outside_the_sweep_folder_and_boxes_give_the_pointing_game(tmp_path, monkeypatch):
    data = make_boxed_folder(tmp_path / "data", {"train": 8, "valid": 4}, size=(32, 32))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    board = attnzoo.sweep("test_resnet", str(data), "sagan", seeds=1, **TINY_API)
    assert board.folder == (tmp_path / "cwd" / "runs" / "sweep-test_resnet-data").absolute()
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == ["runs"]
    assert [p.name for p in (tmp_path / "cwd" / "runs").iterdir()] == [board.folder.name]
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert all(is_run_folder(p) for p in (board.folder / "trials").iterdir())
    record = RunFolder.open(board.folder / "trials" / "sagan@layer3-seed0").record
    row = next(r for r in board.rows if r.config == "sagan@layer3")
    assert record["status"] == "done" and row.map == "layer3"
    assert row.pointing == pytest.approx(record["maps"]["layer3"]["pointing"])  # fit's, from boxes.csv


def test_a_sweep_without_optuna_says_how_to_install_it(monkeypatch, tiny_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(AttnzooError, match=r"pip install 'attnzoo\[sweep\]'"):
        attnzoo.sweep("test_resnet", str(tiny_folder), "sagan", out=tmp_path / "s", **TINY_API)


# --- processes (slow: each starts Python, torch and timm) ----------------------------------------------------

def sweep_command(data: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "attnzoo", "sweep", *TINY, "--data", str(data), "--attn", "sagan", "--out",
            str(out), *more]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def grid_ends_once(folder: Path, points: set[tuple[str, int]]) -> list:
    """Every (configuration, seed) of the grid has exactly one complete trial and a finished run folder."""
    trials = study_trials(folder)
    complete = [(t.user_attrs["config"], t.user_attrs["seed"]) for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(points)
    assert sorted(records(folder)) == sorted(points)
    assert all(r["status"] == "done" for r in records(folder).values())
    return trials


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_is_continued_and_every_trial_ends_exactly_once(tiny_folder, tmp_path):
    import time

    folder = tmp_path / "s"
    command = epochs(sweep_command(tiny_folder, folder, "--seeds", "2"), 3)
    proc = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = folder / "trials" / "none-seed0", folder / "trials" / "sagan@layer3-seed0"
    deadline = time.monotonic() + 240
    while not ((first / "model.safetensors").is_file() and (second / "checkpoints" / "last.safetensors").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.02)
    proc.kill()  # SIGKILL mid-trial: nothing is saved, the trial stays "running" in the study
    proc.wait()
    assert json.loads((second / "attnzoo.json").read_text())["status"] == "training"
    finished = (first / "model.safetensors").stat().st_mtime_ns

    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = grid_ends_once(folder, {(c, s) for c in ("none", "sagan@layer3") for s in (0, 1)})
    lost = [t for t in trials if t.state.name == "FAIL"]
    assert len(lost) == 1 and "stopped" in lost[0].user_attrs["error"]  # found and given back, once
    assert (first / "model.safetensors").stat().st_mtime_ns == finished  # never retrained
    assert [r["epoch"] for r in records(folder)[("sagan@layer3", 0)]["metrics"]["per_epoch"]] == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_on_one_journal_never_train_a_trial_twice(tiny_folder, tmp_path):
    folder = tmp_path / "s"
    command = sweep_command(tiny_folder, folder, "--seeds", "3")
    procs = [subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    trials = grid_ends_once(folder, {(c, s) for c in ("none", "sagan@layer3") for s in (0, 1, 2)})
    assert len(trials) == 6  # the grid was enqueued once, and no trial was made outside it
    assert {t.user_attrs["worker"]["pid"] for t in trials} <= {p.pid for p in procs}
    assert len(list((folder / "trials").iterdir())) == 6
    assert all(len(r["metrics"]["per_epoch"]) == 1 for r in records(folder).values())


@pytest.mark.slow
def test_jobs_share_the_queue_each_on_its_share_of_the_cores(tiny_folder, tmp_path, capfd):
    from attnzoo.train.threads import cpu_budget

    if cpu_budget() < 2:
        pytest.skip("needs 2 cores")
    events = []
    board = attnzoo.sweep("test_resnet", str(tiny_folder), "sagan", seeds=2, jobs=2, out=tmp_path / "s",
                          on_trial=events.append, **{**TINY_API, "threads": None})
    assert board.counts()["complete"] == 4
    # trials that ended between two looks were all told "3/4" (a wrong count); and workers warn of nothing
    assert [(e.done, e.total) for e in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "Warning" not in capfd.readouterr().err
    threads = {r["threads"] for r in records(tmp_path / "s").values()}
    assert threads == {cpu_budget() // 2}


@pytest.mark.slow
def test_a_sampled_learning_rate_with_pruning_makes_no_paired_verdict(tiny_folder, tmp_path):
    board = attnzoo.sweep("test_resnet", str(tiny_folder), "sagan", seeds=3, lr="1e-3..1e-1", prune=True,
                          out=tmp_path / "s", **{**TINY_API, "epochs": 2})
    trials = study_trials(tmp_path / "s")
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(1e-3 <= t.params["lr"] <= 1e-1 for t in trials)
    for (_, _), r in records(tmp_path / "s").items():
        assert r["request"]["lr"] in [t.params["lr"] for t in trials]
        assert r["status"] == "done" or "pruned after epoch" in r["error"]
    assert all(row.verdict in ("", "baseline") and row.pairs == 0 for row in board.rows)
    assert not json.loads((tmp_path / "s" / "leaderboard.json").read_text())["paired"]


def test_auto_site_sets_are_the_defaults_one_level_shallower_and_one_deeper(tiny_folder):
    from attnzoo.runs.sweep import check, resolve_configs

    asked = check("test_resnet", str(tiny_folder), "sagan,lpa-pc", at="auto", img_size=32, out="unused")
    assert [c.name for c in resolve_configs(asked)] == [
        "none", "sagan@layer3", "sagan@layer2", "sagan@layer4",
        "lpa-pc@layer1+layer2+layer3", "lpa-pc@layer1+layer2", "lpa-pc@layer2+layer3+layer4"]  # no level 0: the stem
    asked = check("test_resnet", str(tiny_folder), "sagan", at=["layer2", "layer3,layer4"], img_size=32, out="unused")
    assert [c.sites for c in resolve_configs(asked)] == [(), ("layer2",), ("layer3", "layer4")]


def test_the_leaderboard_chart_shows_a_front_of_one_point_and_counts_the_seeds():
    """The front of a sweep where the baseline wins is that one point: it must still be drawn, not a legend alone."""
    from attnzoo.explain.charts import leaderboard_figure
    from attnzoo.explain.stats import Row

    def row(config, acc, params, verdict, pareto, diff=math.nan):
        return Row(config, 3, 0, 0, 0, acc, 0.01, 0.3, 0.01, None, math.nan, math.nan, params, 30.0, pairs=3,
                   difference=diff, low=diff - 0.02, high=diff + 0.02, verdict=verdict, pareto=pareto)

    fig = leaderboard_figure([row("none", 0.92, 11.18e6, "baseline", True),
                              row("sagan@layer3", 0.91, 11.26e6, "no evidence", False, -0.01)])
    left, right = fig.axes
    front = [line for line in right.get_lines() if line.get_label().startswith("Pareto front")]
    assert len(front) == 1 and list(front[0].get_xdata()) == [11.18e6] and front[0].get_marker() not in (None, "None")
    assert "3 seeds" in left.get_xlabel()
    fig.canvas.draw()
    labels = [t.get_text() for t in right.get_xticklabels() if t.get_text()]
    assert labels and all(t.endswith("M") for t in labels) and len(set(labels)) == len(labels), labels


@pytest.mark.parametrize("cuda, cpus, threads, expected", [
    (False, 2, None, 2), (False, 2, "auto", 2), (False, 8, None, 2), (False, 1, None, 1), (False, 2, 2, 1),
    (False, 8, 4, 2), (True, 8, None, 1)])
def test_jobs_auto_is_two_workers_on_the_cpu_and_one_on_a_gpu(monkeypatch, cuda, cpus, threads, expected):
    from attnzoo.runs import sweep as sweep_module
    from attnzoo.train import distributed

    monkeypatch.setattr(distributed, "use_cuda", lambda: cuda)
    monkeypatch.setattr(sweep_module, "cpu_budget", lambda: cpus)
    assert sweep_module.auto_jobs(threads) == expected


def test_the_command_line_sweeps_with_jobs_auto_unless_told_and_python_in_its_own_process(
        monkeypatch, capsys, tiny_folder, tmp_path):
    from attnzoo.runs import sweep as sweep_module

    real_check, seen = sweep_module.check, []

    def check(*args, **kwargs):
        seen.append(kwargs["jobs"])
        raise AttnzooError("stop here")

    monkeypatch.setattr(sweep_module, "check", check)
    for args, jobs in (([], "auto"), (["--jobs", "1"], "1")):
        code, _, err = run_cli(capsys, "sweep", *TINY[:-2], "--data", str(tiny_folder), "--attn", "sagan", *args,
                               "--out", str(tmp_path / "s"))
        assert code == 2 and "stop here" in err and seen.pop() == jobs
    with pytest.raises(AttnzooError, match="stop here"):
        attnzoo.sweep("test_resnet", str(tiny_folder), "sagan", out=tmp_path / "s", **TINY_API)
    assert seen.pop() is None  # read as 1: trials train in this process
    assert real_check("test_resnet", str(tiny_folder), "sagan", jobs="1", out=tmp_path / "s").jobs == 1
    assert real_check("test_resnet", str(tiny_folder), "sagan", jobs="auto", out=tmp_path / "s").jobs == "auto"
    with pytest.raises(AttnzooError, match="--jobs takes a number or 'auto'"):
        real_check("test_resnet", str(tiny_folder), "sagan", jobs="two", out=tmp_path / "s")
