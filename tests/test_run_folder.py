"""The run folder through ``fit``: claimed by one run, failures recorded, names that are not UTF-8."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder

from attnzoo.errors import AttnzooError, TrainingFailed
from attnzoo.runs.folder import LOCK, RunFolder
from attnzoo.runs.predict import load_run
from attnzoo.train.fit import fit

TINY = dict(backbone="test_resnet", attn="lpa-pc", pretrained=False, bs=8, img_size=32, epochs=1, plots=False)


@pytest.mark.slow  # two fit processes: 25 s; test_run.py races the claim itself in threads in the default run
def test_two_fits_started_together_on_one_folder_give_it_to_one(tiny_folder, tmp_path):
    out = tmp_path / "same"
    command = [sys.executable, "-m", "attnzoo", "fit", "--backbone", "test_resnet", "--attn", "lpa-pc",
               "--no-pretrained", "--bs", "8", "--img-size", "32", "--epochs", "1", "--data", str(tiny_folder),
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another attnzoo fit" in loser or "not empty" in loser
    assert json.loads((out / "attnzoo.json").read_text())["status"] == "done"
    assert not (out / LOCK).exists()


def test_fit_into_a_folder_another_run_holds_is_refused_and_leaves_it_alone(tiny_folder, tmp_path):
    RunFolder.claim(tmp_path / "r")
    with pytest.raises(AttnzooError, match="another attnzoo fit"):
        fit(**TINY, data=str(tiny_folder), out=str(tmp_path / "r"))
    assert os.listdir(tmp_path / "r") == [LOCK]


def test_a_fit_that_fails_before_training_leaves_no_folder(tmp_path):
    with pytest.raises(AttnzooError):
        fit(**TINY, data=str(tmp_path / "no-such-data"), out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_full_disk_at_the_final_save_is_recorded_and_the_run_resumes(tiny_folder, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_model", disk_full)
        with pytest.raises(TrainingFailed, match=rf"No space left on device; .*attnzoo fit --resume {run}"):
            fit(**TINY, data=str(tiny_folder), out=str(run))
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["status"] == "failed" and "No space left on device" in config["error"]
    assert config["resume"] == f"attnzoo fit --resume {run}"
    assert not list(run.glob(".*.tmp"))
    stale = [run / "checkpoints" / ".last.safetensors.a1b2c3d4.tmp", run / "checkpoints" / ".tmpQ3x9Zk"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    assert fit(resume=str(run)) == run
    assert json.loads((run / "attnzoo.json").read_text())["status"] == "done"
    assert not any(p.exists() for p in stale)
    load_run(run)


@pytest.mark.slow  # 5-7 s: the default run keeps under 3 minutes on a 2-core machine
def test_names_that_are_not_utf8_go_through_fit_and_back(tmp_path):
    root = make_folder(tmp_path / "data")
    cafe = os.fsdecode(b"caf\xe9")
    for split in ("train", "valid"):
        os.rename(root / split / "red", root / split / cafe)
    bad = [root / "train" / "green" / os.fsdecode(b"x\xff\ty.png"), root / "train" / "blue" / "two\nlines.png"]
    for p in bad:
        p.write_bytes(b"not an image")
    run = fit(**{**TINY, "plots": True}, data=str(root), out=str(tmp_path / "r"))
    folder = RunFolder(run)
    assert folder.read_config()["status"] == "done"
    assert {Path(p) for p, _ in folder.read_skipped()} == set(bad)
    assert load_run(run).classes == ["blue", cafe, "green"]
    assert (run / "confusion_matrix.png").is_file() and (run / "attention.png").is_file()


def test_show_attention_into_a_read_only_run_folder_is_one_line_suggesting_out(tiny_run, tiny_folder, capsys,
                                                                              monkeypatch):
    from test_cli import run_cli

    image = sorted((tiny_folder / "valid" / "red").glob("*.png"))[0]
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # tests run as root, whom chmod does not stop
        if str(path).startswith(str(tiny_run)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run_cli(capsys, "show-attention", str(image), "--run", str(tiny_run))
    assert code == 2 and "Permission denied" in err and "--out" in err and len(err.strip().splitlines()) == 1


def test_interpret_scores_are_added_to_a_valid_config_keeping_the_training_versions(tmp_path):
    from test_run import make_run


    make_run(tmp_path / "r")
    path = tmp_path / "r" / "attnzoo.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "versions": {"attnzoo": "0.0.1"}}))
    config = RunFolder(tmp_path / "r").update(faithfulness={"auc": {"random": 0.5}})
    assert config == json.loads(path.read_text())
    assert config["versions"] == {"attnzoo": "0.0.1"} and config["faithfulness"] == {"auc": {"random": 0.5}}
    path.write_text(json.dumps({**config, "img_size": "32"}))
    with pytest.raises(AttnzooError, match="img_size"):
        RunFolder(tmp_path / "r").update(faithfulness={})


def test_compare_reads_runs_against_the_same_schema(tmp_path):
    from test_run import make_run

    from attnzoo.explain.compare import compare_runs

    make_run(tmp_path / "r")
    path = tmp_path / "r" / "attnzoo.json"
    assert compare_runs([tmp_path / "r"])[0]["backbone"] == "test_resnet"
    path.write_text(json.dumps({**json.loads(path.read_text()), "classes": "abc"}))
    with pytest.raises(AttnzooError, match="attnzoo.json: classes: input should be a valid list"):
        compare_runs([tmp_path / "r"])


def test_one_process_trains_in_a_run_folder_at_a_time(tmp_path):
    import socket

    folder = RunFolder(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(AttnzooError, match=f"pid {sleeper.pid}"):
            folder.lock()
    finally:
        sleeper.kill()
        sleeper.wait()
    folder.lock()  # its process is gone: a stale lock is taken over
    assert (tmp_path / LOCK).read_text().split()[1] == str(os.getpid())
    folder.unlock()
    assert not (tmp_path / LOCK).exists()


def test_resume_of_a_run_another_process_trains_is_refused_and_touches_nothing(tiny_run, tmp_path):
    import shutil
    import socket

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    config = json.loads((run / "attnzoo.json").read_text())
    (run / "attnzoo.json").write_text(json.dumps({**config, "status": "training"}))
    stale = run / ".model.safetensors.0123abcd.tmp"  # the other process's file being written
    stale.write_bytes(b"x")
    (run / LOCK).write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process
    with pytest.raises(AttnzooError, match="is training in"):
        fit(resume=str(run))
    assert stale.exists() and (run / LOCK).exists()


def test_a_run_that_never_starts_leaves_no_runs_folder_either(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AttnzooError):
        fit("test_resnet", "lpa-pc", str(tmp_path / "no-such-data"), pretrained=False, epochs=1)
    assert list(tmp_path.iterdir()) == []  # neither the run folder nor the runs/ made for it
