"""Messy data, bad arguments, interruption and resume, NaN losses, untrusted files, reproducibility, doctor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from badfiles import make_bad_folder
from conftest import make_folder
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import run_cli
from torch import nn

from attnzoo import register_attention
from attnzoo.errors import TrainingFailed
from attnzoo.train.fit import fit

TINY = dict(backbone="test_resnet", attn="lpa-pc", pretrained=False, bs=8, img_size=32, plots=False)
CLI_TINY = ["--backbone", "test_resnet", "--attn", "lpa-pc", "--no-pretrained", "--bs", "8", "--img-size", "32",
            "--no-plots"]  # the plots are tested elsewhere


def epochs_of(run: Path) -> list[dict]:
    rows = json.loads((run / "attnzoo.json").read_text())["metrics"]["per_epoch"]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data16"), n=16)


@pytest.fixture(scope="module")
def reference(data16, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run, seed 3."""
    return fit(**TINY, data=str(data16), epochs=4, seed=3, out=str(tmp_path_factory.mktemp("ref") / "run"))


# --- bad data ---------------------------------------------------------------------------------------------------

def test_training_goes_on_through_a_folder_of_bad_files(tmp_path, capsys):
    usable, skipped = make_bad_folder(tmp_path / "data")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "fit", *CLI_TINY, "--data", str(tmp_path / "data"), "--epochs", "1",
                           "--out", str(run))
    assert code == 0, err
    assert f"skipped {len(skipped)} files" in err and "skipped.txt" in err
    assert "'empty' has no images" in err and "'owl' has a single training image" in err
    listed = [line.split("\t") for line in (run / "skipped.txt").read_text().splitlines()[1:]]
    assert {Path(p) for p, _ in listed} == set(skipped)
    config = json.loads((run / "attnzoo.json").read_text())
    assert {Path(s["path"]) for s in config["skipped"]} == set(skipped)
    assert config["status"] == "done" and config["classes"] == ["cat", "dog", "owl"]
    counts = config["data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["valid"].values()) == len(usable)


# --- interruption, resume, reproducibility ----------------------------------------------------------------------

@pytest.mark.slow  # three 4-epoch fits: 25 s
def test_the_same_seed_gives_the_same_run_and_another_seed_does_not(reference, data16, tmp_path):
    again = fit(**TINY, data=str(data16), epochs=4, seed=3, out=str(tmp_path / "again"))
    assert epochs_of(again) == epochs_of(reference)
    assert same_weights(again, reference)
    other = fit(**TINY, data=str(data16), epochs=1, seed=4, out=str(tmp_path / "other"))
    assert epochs_of(other)[0] != epochs_of(reference)[0]


@pytest.mark.slow  # a fit process signalled, then resumed: 25 s; the full-disk test resumes in the default run
def test_sigterm_saves_and_resume_reaches_the_uninterrupted_result(reference, data16, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    threads = str(torch.get_num_threads())  # the reference's: with --threads auto a busy machine changes the sums
    args = [sys.executable, "-m", "attnzoo", "fit", *CLI_TINY, "--data", str(data16), "--epochs", "4", "--seed", "3",
            "--threads", threads, "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = run / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 180
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"attnzoo fit --resume {run}" in err and "Traceback" not in err
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["status"] == "interrupted" and (run / "model.safetensors").is_file()
    with safe_open(str(last), "pt") as f:
        saved_epoch = json.loads(f.metadata()["attnzoo_checkpoint"])["epoch"]
    assert 1 <= saved_epoch < 4  # stopped mid-run, after at least one epoch

    code, _, err = run_cli(capsys, "fit", "--resume", str(run), "--threads", threads)
    assert code == 0, err
    assert epochs_of(run) == epochs_of(reference)
    assert same_weights(run, reference)
    assert json.loads((run / "attnzoo.json").read_text())["status"] == "done"
    best = json.loads((run / "attnzoo.json").read_text())["best"]
    assert (run / best["weights"]).is_file() and not last.exists()  # the best epoch's weights, stored once


def test_resume_refuses_changed_settings_and_finished_runs(tiny_run, capsys):
    code, _, err = run_cli(capsys, "fit", "--resume", str(tiny_run), "--epochs", "9")
    assert code == 2 and "leave out --epochs" in err
    code, _, err = run_cli(capsys, "fit", "--resume", str(tiny_run))
    assert code == 2 and "already finished" in err


# --- numerical faults -------------------------------------------------------------------------------------------

class FaultAfter(nn.Module):
    """A test-only gate that injects ``fault`` at its ``at``-th training forward (``calls`` counts them)."""

    at = 0
    calls = 0

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def fault(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type != "meta":
            type(self).calls += 1
            if type(self).calls == self.at:
                x = self.fault(x)
        return x * self.scale


@register_attention("test-nan-after", kind="gate", summary="test only: NaN output at the 9th training forward")
class NanAfter(FaultAfter):
    at = 9

    def fault(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_a_nan_loss_stops_training_naming_epoch_and_batch(data16, tmp_path):
    NanAfter.calls = 0
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=r"NaN/inf at epoch 2, batch 3") as e:
        fit(backbone="test_resnet", attn="test-nan-after", data=str(data16), pretrained=False, bs=8, img_size=32,
            epochs=3, out=str(run))
    assert "last good checkpoint (epoch 1)" in str(e.value)
    with safe_open(str(run / "checkpoints" / "last.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["attnzoo_checkpoint"])
        weights = [f.get_tensor(k) for k in f.keys() if k.startswith("model.")]
    assert meta["epoch"] == 1 and all(torch.isfinite(w.float()).all() for w in weights)
    assert json.loads((run / "attnzoo.json").read_text())["status"] == "failed"


# --- untrusted files --------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": Payload(marker)}, path)
    return path


def test_the_malicious_pickle_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "control-marker"
    torch.load(evil_checkpoint(tmp_path / "control.pth", marker), weights_only=False)
    assert marker.read_text() == "pwned"  # so the marker not appearing below means something


def test_weights_that_need_unpickling_are_refused(tmp_path, tiny_folder, capsys):
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    code, _, err = run_cli(capsys, "fit", *CLI_TINY, "--data", str(tiny_folder), "--weights", str(evil),
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "full unpickling" in err and "Traceback" not in err
    assert not marker.exists()


def test_load_run_never_unpickles(tmp_path, tiny_run, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    (run / "attnzoo.json").write_text((tiny_run / "attnzoo.json").read_text())
    evil_checkpoint(run / "model.safetensors", marker)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "x.png"), "--run", str(run))
    assert code == 2 and "not a readable safetensors file" in err
    assert not marker.exists()


# --- bad arguments ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--bs", "0"], "bs must be at least 1"),
    (["--img-size", "8"], "img_size must be at least 16"),
    (["--valid-pct", "1.5"], "valid_pct"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--lr", "nan"], "lr must be a positive number"),
    (["--workers", "-1"], "workers must be 0 or more"),
    (["--freeze-epochs", "-1"], "freeze_epochs"),
    (["--weights", "/no/such.safetensors"], "weights file not found"),
    (["--attn-arg", "reduction"], "KEY=VALUE"),
])
def test_bad_fit_options_are_one_line_with_exit_code_2(capsys, tiny_folder, tmp_path, extra, message):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "fit", *CLI_TINY, "--data", str(tiny_folder), *extra, "--out", str(run))
    assert code == 2 and message in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) <= 2
    assert not run.exists()  # nothing was written


def test_other_bad_fit_calls(capsys, tmp_path, tiny_folder, tiny_run):
    code, _, err = run_cli(capsys, "fit", "--attn", "lpa-pc", "--data", str(tiny_folder))
    assert code == 2 and "fit needs --backbone" in err
    code, _, err = run_cli(capsys, "fit", *CLI_TINY, "--data", str(tiny_folder), "--out", str(tiny_run))
    assert code == 2 and "already exists" in err
    assert json.loads((tiny_run / "attnzoo.json").read_text())["status"] == "done"  # nothing lost
    code, _, err = run_cli(capsys, "fit", "--resume", str(tmp_path / "nope"))
    assert code == 2 and "needs a run folder" in err
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"x")
    code, _, err = run_cli(capsys, "fit", *CLI_TINY, "--data", str(tiny_folder), "--weights", str(weights))
    assert code == 2 and "must be one of" in err


# --- doctor -----------------------------------------------------------------------------------------------------

def test_doctor_reports_a_healthy_environment(capsys):
    code, out, _ = run_cli(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0
    for name in ("torch", "torchvision", "torchvision ops", "timm", "fastai", "fastai needs torch", "CUDA"):
        assert checks[name]["status"] == "ok", checks[name]
    assert any(n.startswith("plugin attnzoo") for n in checks)


def test_doctor_diagnoses_a_torchvision_built_for_another_torch(monkeypatch, capsys):
    import torchvision

    def broken(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", broken)
    code, out, _ = run_cli(capsys, "doctor", "--json")
    check = next(c for c in json.loads(out) if c["name"] == "torchvision ops")
    assert code == 1 and check["status"] == "fail"
    assert "torchvision::nms does not exist" in check["detail"] and "pip install --upgrade torch torchvision" in \
        check["fix"]


def test_doctor_sees_a_fastai_that_does_not_accept_the_installed_torch(monkeypatch):
    from attnzoo import doctor

    monkeypatch.setattr(doctor, "requires", lambda dist: ["torch<2.0,>=1.10"])
    check = doctor.check_requirement("fastai", "torch")
    assert check.status == "fail" and "needs torch<2.0,>=1.10" in check.detail and check.fix


@register_attention("test-sigint-after", kind="gate", summary="test only: sends SIGINT at the 8th training forward")
class SigintAfter(FaultAfter):
    at = 8

    def fault(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGINT)
        return x


def test_ctrl_c_ends_the_batch_saves_and_says_how_to_resume(data16, tmp_path):
    from attnzoo.errors import Interrupted

    SigintAfter.calls = 0
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match=f"SIGINT: .*attnzoo fit --resume {run} \\(continues after epoch 1") as e:
        fit(backbone="test_resnet", attn="test-sigint-after", data=str(data16), pretrained=False, bs=8, img_size=32,
            epochs=3, out=str(run))
    assert e.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is before  # handler given back
    config = json.loads((run / "attnzoo.json").read_text())
    assert config["status"] == "interrupted" and len(config["metrics"]["per_epoch"]) == 1
    assert (run / "model.safetensors").is_file() and (run / "checkpoints" / "last.safetensors").is_file()


def test_an_unreadable_image_for_show_attention_is_one_line(reference, tmp_path, capsys):
    (tmp_path / "empty.jpg").write_bytes(b"")
    code, _, err = run_cli(capsys, "show-attention", str(tmp_path / "empty.jpg"), "--run", str(reference),
                           "--out", str(tmp_path))
    assert code == 2 and "cannot read image" in err and "Traceback" not in err


def test_checkpoints_store_tied_weights_and_views(tmp_path):
    from attnzoo.train.checkpoints import load_model_tensors, read_checkpoint, save_checkpoint

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one parameter under two names
            self.register_buffer("rows", torch.arange(8.0).view(2, 4))
            self.register_buffer("row", self.rows[1])  # a view into another buffer

    model = Tied()
    save_checkpoint(tmp_path / "c.safetensors", None, model, {"epoch": 3})
    tensors, meta = read_checkpoint(tmp_path / "c.safetensors")
    assert meta == {"epoch": 3} and torch.equal(tensors["model.row"], torch.arange(4.0, 8.0))
    fresh = Tied()
    load_model_tensors(fresh, tensors)
    assert torch.equal(fresh.a.weight, model.a.weight) and fresh.b.weight is fresh.a.weight
