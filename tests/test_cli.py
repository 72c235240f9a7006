"""The CLI end to end on a tiny generated folder: fit, show-attention, predict, list, layers, and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder
from PIL import Image

from attnzoo.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def one_line(code: int, err: str) -> bool:
    """A user's mistake as the CLI reports it: exit code 2 and one line, no traceback."""
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = make_folder(tmp_path_factory.mktemp("data"))
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--data", str(root), "--no-pretrained",
              "--epochs", "1", "--bs", "8", "--img-size", "32", "--out", str(run_dir)])
    assert e.value.code == 0
    return root, run_dir


def test_fit_writes_a_complete_run_folder(trained):
    root, run_dir = trained
    for name in ("attnzoo.json", "model.safetensors", "history.csv", "history.png", "confusion_matrix.png",
                 "top_losses.png", "attention.png"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "attnzoo.json").read_text())
    assert config["classes"] == ["blue", "green", "red"]
    assert config["backbone"] == "test_resnet" and config["attn"] == "lpa-pc"
    assert config["sites"] == ["layer1", "layer2", "layer3"]
    assert len(config["metrics"]["per_epoch"]) == 1 and "accuracy" in config["metrics"]["final"]
    assert config["data"]["counts"]["train"] == {"blue": 8, "green": 8, "red": 8}
    assert not list(run_dir.glob("*.pkl")) and not list(run_dir.glob("*.pth"))


def test_show_attention_writes_one_png_per_image(trained, capsys, tmp_path):
    root, run_dir = trained
    images = sorted((root / "valid" / "red").glob("*.png"))[:2]
    code, out, _ = run_cli(capsys, "show-attention", *map(str, images), "--run", str(run_dir), "--out", str(tmp_path))
    assert code == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.stem for p in pngs] == [p.stem for p in images]
    with Image.open(pngs[0]) as im:
        assert im.width > im.height > 100  # image plus one panel per site
    assert "predictions" in out


def test_predict_json_gives_probabilities_over_the_folder_classes(trained, capsys):
    root, run_dir = trained
    image = next((root / "valid" / "blue").glob("*.png"))
    code, out, _ = run_cli(capsys, "predict", str(image), "--run", str(run_dir), "--json", "--top", "3")
    assert code == 0
    result = json.loads(out)
    assert {t["class"] for t in result[0]["top"]} == {"red", "green", "blue"}
    assert sum(t["prob"] for t in result[0]["top"]) == pytest.approx(1, abs=1e-4)


def test_list_and_layers_print_json(capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0 and {"lpa-pc", "sagan"} <= {m["name"] for m in json.loads(out)}
    code, out, _ = run_cli(capsys, "layers", "test_resnet", "--img-size", "64", "--json")
    sites = {s["name"]: s for s in json.loads(out)}
    assert code == 0 and sites["layer3"]["size"] == [4, 4] and sites["layer3"]["default_gate"]


@pytest.mark.parametrize("args,message", [
    (["fit", "--backbone", "resnet181", "--attn", "sagan", "--data", "demo"], "did you mean 'resnet18'"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagn", "--data", "demo"], "did you mean 'sagan'"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--at", "layer9", "--data", "demo"], "layer9"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--attn-arg", "reduction=x", "--data", "demo"],
     "needs a int"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--attn-arg", "redux=2", "--data", "demo"],
     "did you mean 'reduction'"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--data", "/no/such/folder", "--no-pretrained"],
     "data folder not found"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--data", "demo", "--epochs", "0"], "epochs"),
    (["fit", "--backbone", "test_resnet", "--attn", "sagan", "--data", "demo", "--lr", "fast"], "--lr"),
    (["predict", "/no/such.jpg", "--run", "."], "image not found"),
    (["layers", "vgg16bn"], "did you mean 'vgg16_bn'"),
])
def test_user_errors_are_one_line_with_exit_code_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) <= 2  # one line (rich may wrap a long one)


def test_predict_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    code, _, err = run_cli(capsys, "predict", str(image), "--run", str(tmp_path))
    assert code == 2 and "not a run folder" in err


def test_offline_pretrained_weights_give_a_way_forward(capsys, tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    code, _, err = run_cli(capsys, "fit", "--backbone", "resnet18", "--attn", "sagan", "--data", str(root))
    assert code == 2 and "--no-pretrained" in err and "--weights FILE" in err


def test_help_and_list_do_not_import_fastai_or_torchvision():
    script = (
        "import sys\nfrom attnzoo.cli import main\n"
        "for args in (['--help'], ['list']):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "heavy = [m for m in ('fastai', 'torchvision') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


# --- every mistake on the command line: one line, exit code 2, before anything starts ---------------------------

FIT_DEMO = ["fit", "--backbone", "test_resnet", "--attn", "sagan", "--data", "demo", "--no-pretrained"]


@pytest.mark.parametrize("args,message", [
    (["fit", "--foo"], "No such option: --foo"),
    (["fit", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["predict"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_command_line_usage_errors_are_one_line_with_exit_code_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and message in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1
    assert "--help" in err  # where to look next


@pytest.mark.parametrize("args", [["fit", "--foo"], ["nosuch"]])
def test_usage_errors_from_the_installed_command_have_no_traceback(args):
    done = subprocess.run([sys.executable, "-m", "attnzoo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("extra,message", [
    (["--workers", "1000"], "workers must be at most"),
    (["--img-size", "100000"], "img_size must be at most 4096"),
    (["--seed", str(2**64)], "seed must be at most 4294967295"),
    (["--seed", "-1"], "seed must be at least 0"),
    (["--epochs", "1000000"], "epochs must be at most"),
    (["--freeze-epochs", "1000000"], "freeze_epochs must be at most"),
    (["--bs", "64", "--img-size", "2048"], "pixels per batch"),
    (["--lr", "100"], "lr must be at most 10"),
    (["--valid-pct", "0"], "valid_pct must be between 0 and 1"),
    (["--attn-arg", "reduction=4", "--attn-arg", "reduction=8"], "--attn-arg reduction is given twice"),
])
def test_out_of_range_settings_are_refused_before_anything_starts(capsys, tmp_path, extra, message):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *FIT_DEMO, *extra, "--out", str(run))
    assert code == 2 and message in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_an_out_folder_under_a_file_is_refused_before_anything_starts(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, *FIT_DEMO, "--out", str(blocker / "run"))
    assert code == 2 and f"{blocker} is a file" in err, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_out_folder_where_nothing_can_be_written_is_refused_even_for_root(capsys):
    # /proc takes no new folders, not even from root (to whom a permission bit or os.access says nothing)
    code, _, err = run_cli(capsys, *FIT_DEMO, "--out", "/proc/attnzoo-test/run")
    assert code == 2 and "cannot write in /proc" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in a read-only folder")
def test_an_out_folder_in_a_read_only_folder_is_refused(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, _, err = run_cli(capsys, *FIT_DEMO, "--out", str(locked / "run"))
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"cannot write in {locked}" in err, err


def test_fit_settings_are_checked_before_torch_is_imported():
    cases = [["--epochs", "0"], ["--workers", "1000"], ["--seed", str(2**64)],
             ["--attn-arg", "reduction=4", "--attn-arg", "reduction=8"]]
    script = (
        "import sys\nfrom attnzoo.cli import main\n"
        f"for extra in {cases!r}:\n"
        f"    try:\n        main({FIT_DEMO!r} + extra)\n"
        "    except SystemExit as e:\n        assert e.code == 2, (extra, e.code)\n"
        "print('HEAVY', [m for m in ('torch', 'timm', 'fastai') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
    assert done.stderr.count("error:") == len(cases)


def test_version_is_printed_without_importing_torch():
    import attnzoo

    script = ("import sys\nfrom attnzoo.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
              "    assert e.code in (0, None), e.code\nprint('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == [f"attnzoo {attnzoo.__version__}", "TORCH False"], done.stdout + done.stderr


def test_debug_shows_the_traceback_of_a_mistake(capsys):
    code, _, err = run_cli(capsys, "--debug", *FIT_DEMO, "--epochs", "0")
    assert code == 2 and "Traceback" in err and "AttnzooError: epochs must be at least 1" in err
