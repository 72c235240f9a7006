"""Hostile and careless input, third round: forged run folders, boxes.csv as spreadsheets write it, plugins that
print, attnzoo's own figures next to data, locks and settings at their edges. Each case is one line and exit 2
(what the user can fix), or a warning, never a traceback, never a number from data the user did not mean."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_folder
from PIL import Image
from test_cli import one_line, run_cli
from test_run import make_run

import attnzoo
from attnzoo.errors import AttnzooError
from attnzoo.explain.boxes import load_boxes, read_boxes
from attnzoo.runs.folder import LOCK, RunFolder
from attnzoo.train.data import find_dataset


def forged(tmp_path: Path, **entries) -> Path:
    run = tmp_path / "forged"
    make_run(run)
    config = json.loads((run / "attnzoo.json").read_text())
    (run / "attnzoo.json").write_text(json.dumps({**config, **entries}))
    return run


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    return path


# --- forged attnzoo.json ------------------------------------------------------------------------------------

def test_a_deeply_nested_attnzoo_json_is_one_line_in_every_command_that_reads_it(capsys, tmp_path, image):
    run = tmp_path / "deep"
    make_run(run)
    (run / "attnzoo.json").write_text("[" * 100_000 + "]" * 100_000)
    for command in (["predict", str(image), "--run", str(run)], ["show-attention", str(image), "--run", str(run)],
                    ["export", str(run), "--out", str(tmp_path / "m.onnx")], ["compare", str(run)],
                    ["interpret", str(run), "--out", str(tmp_path / "i")]):
        code, _, err = run_cli(capsys, *command)
        assert one_line(code, err) and "not valid JSON" in err, (command, err)
    (run / "attnzoo.json").write_text(json.dumps({"a": json.loads("[" * 200 + "]" * 200)}))  # valid, absurdly deep
    code, _, err = run_cli(capsys, "predict", str(image), "--run", str(run))
    assert one_line(code, err) and "nests deeper" in err


@pytest.mark.parametrize("size", [10**30, 1, 15, 4097])
def test_an_image_size_fit_would_refuse_is_refused_when_read(capsys, tmp_path, image, size):
    run = forged(tmp_path, img_size=size)
    code, _, err = run_cli(capsys, "predict", str(image), "--run", str(run))
    assert one_line(code, err) and "img_size" in err


def test_compare_refuses_forged_metrics_and_writes_strict_json(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = forged(tmp_path, metrics={"per_epoch": [], "final": {"accuracy": "very high"}})
    code, _, err = run_cli(capsys, "compare", str(run))
    assert one_line(code, err) and "metrics.final" in err
    good = tmp_path / "good"
    make_run(good)
    config = json.loads((good / "attnzoo.json").read_text())
    config["metrics"]["final"] = {"valid_loss": 0.9}  # no accuracy: NaN inside compare
    (good / "attnzoo.json").write_text(json.dumps(config))
    code, out, _ = run_cli(capsys, "compare", str(good), "--json")

    def no_constant(name: str) -> None:
        raise AssertionError(f"bare {name} in --json output")

    rows = json.loads(out, parse_constant=no_constant)
    assert code == 0 and rows[0]["accuracy"] is None


# --- --json stays JSON -------------------------------------------------------------------------------------

class Loud(torch.nn.Module):
    """A gate that prints when built and on every forward, as careless plugins do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        print("Loud: built")
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("Loud: forward")
        return x * self.scale


def test_json_output_stays_json_whatever_a_module_prints(capsys, tmp_path, image):
    attnzoo.register_attention("loud-test", kind="gate", summary="prints")(Loud)
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", "loud-test", num_classes=3, img_size=32)
    config = dict(backbone="test_resnet", attn="loud-test", sites=model.sites, classes=["a", "b", "c"],
                  img_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    RunFolder(tmp_path / "loud").save(model, config)
    capsys.readouterr()
    code, out, err = run_cli(capsys, "predict", str(image), "--run", str(tmp_path / "loud"), "--json")
    assert code == 0 and json.loads(out)[0]["top"] and "Loud: forward" in err


# --- boxes.csv ---------------------------------------------------------------------------------------------

@pytest.fixture
def boxed(tmp_path: Path) -> Path:
    (tmp_path / "a").mkdir()
    for name in ("one.png", "two.png"):
        Image.new("RGB", (40, 20)).save(tmp_path / "a" / name)
    return tmp_path


@pytest.mark.parametrize("content,message", [
    ("image,x_min,y_min,x_max,y_max\na/one.png,30,0,10,10\n", "x_min < x_max"),
    ("image,x_min,y_min,x_max,y_max\na/one.png,5,5,5,10\n", "positive area"),
    ("image,x_min,y_min,x_max,y_max\na/one.png,nan,0,10,10\n", "finite numbers"),
    ("image,x_min,y_min,x_max,y_max\na/one.png,0,0,inf,10\n", "finite numbers"),
    ("image,x_min,y_min,x_max,y_max\na/one.png,0,0,ten,10\n", "with numbers"),
    ("name,left,top\na/one.png,0,0\n", "must name the columns"),
])
def test_a_boxes_csv_that_is_not_boxes_is_one_line_naming_the_row(boxed, content, message):
    (boxed / "boxes.csv").write_text(content)
    with pytest.raises(AttnzooError, match=message) as e:
        read_boxes(boxed)
    assert "\n" not in str(e.value)


def test_a_binary_boxes_csv_is_one_line(boxed):
    (boxed / "boxes.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AttnzooError, match="not a text"):
        read_boxes(boxed)


def test_a_spreadsheets_boxes_csv_with_bom_crlf_and_spaces_reads_the_same(boxed):
    (boxed / "boxes.csv").write_bytes(b"\xef\xbb\xbfImage, X_min ,y_min,x_max,y_max\r\na/one.png,0,0,20,10\r\n")
    assert read_boxes(boxed) == {"a/one.png": [(0.0, 0.0, 20.0, 10.0)]}


def test_boxes_outside_the_image_are_clipped_or_dropped_and_said(boxed):
    (boxed / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max\na/one.png,30,-5,1e23,1e23\n"
                                     "a/two.png,100,100,200,200\n")
    notes: list[str] = []
    got = load_boxes(boxed, [boxed / "a" / "one.png", boxed / "a" / "two.png"], 20, notes)
    assert got[0].boxes == ((15.0, 0.0, 20.0, 20.0),)  # clipped to 40x20, then scaled to 20x20
    assert got[1] is None
    assert any("1 boxes" in n and "outside" in n for n in notes)
    assert any("1 of the 2 images" in n for n in notes)


def test_boxes_that_name_no_scored_image_say_so(boxed):
    (boxed / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max\nelsewhere/x.png,0,0,5,5\n")
    notes: list[str] = []
    assert load_boxes(boxed, [boxed / "a" / "one.png"], 20, notes) == [None]
    assert any("none of the 1 images" in n and "elsewhere/x.png" in n for n in notes)


# --- what is not data ----------------------------------------------------------------------------------------

def test_attnzoos_own_figures_are_never_training_images_wherever_they_are(tmp_path):
    from attnzoo.explain import charts, figures

    data = make_folder(tmp_path / "data", n=4, size=16)
    before = find_dataset(data).counts()
    figures.save_new_figure(charts.bar_figure(["a"], {"s": [1.0]}, "t", "y"), data / "train" / "red" / "fig.png")
    after = find_dataset(data)
    assert after.counts() == before
    assert any(p.endswith("fig.png") and "attnzoo's own figure" in why for p, why in after.skipped)


def test_figure_commands_refuse_a_class_folder_as_their_output(capsys, tmp_path, tiny_run):
    data = make_folder(tmp_path / "data", n=2, size=16)
    image = next((data / "valid" / "red").iterdir())
    for command in (["show-attention", str(image), "--run", str(tiny_run), "--out", str(data / "train" / "red")],
                    ["show-attention", str(image), "--run", str(tiny_run), "--out",
                     str(data / "train" / "red" / "x.png")],
                    ["compare", str(tiny_run), "--out", str(data / "train" / "blue" / "c.png")],
                    ["interpret", str(tiny_run), "--out", str(data / "valid" / "red" / "report")],
                    ["export", str(tiny_run), "--format", "hub", "--out", str(data / "valid" / "red" / "hub")]):
        code, _, err = run_cli(capsys, *command)
        assert one_line(code, err) and "training images" in err, (command, err)
    assert not list((data / "train" / "red").glob("*-2.png")) and not (data / "valid" / "red" / "report").exists()


def test_figure_commands_refuse_an_output_inside_the_runs_data_folder(capsys, tiny_run, tiny_folder):
    """Not a class folder yet, but a new folder of images at the data's top would be read as a class next time."""
    image = next((tiny_folder / "valid" / "red").iterdir())
    inside = tiny_folder / "figures-here"
    for command in (["show-attention", str(image), "--run", str(tiny_run), "--out", str(inside)],
                    ["compare", str(tiny_run), "--out", str(inside / "c.png")],
                    ["interpret", str(tiny_run), "--out", str(inside / "report")],
                    ["export", str(tiny_run), "--format", "hub", "--out", str(inside / "hub")]):
        code, _, err = run_cli(capsys, *command)
        assert one_line(code, err) and "inside the run's data folder" in err, (command, err)
    assert not inside.exists()


def test_a_sweep_or_a_run_being_claimed_inside_the_data_is_attnzoos_not_a_class(tmp_path):
    """A sweep whose --out is inside a flat data set was read as an empty class, its journal as a skipped file, and
    each trial's own folder (locked, before its attnzoo.json) the same."""
    flat = make_folder(tmp_path / "data", n=4, size=16) / "train"
    (flat / "my-sweep" / "trials" / "none-seed0").mkdir(parents=True)
    (flat / "my-sweep" / "study.journal").write_text("{}\n")
    (flat / "my-sweep" / "trials" / "none-seed0" / "attnzoo.json").write_text("{}")
    (flat / "runs" / "sweep-x").mkdir(parents=True)
    (flat / "runs" / "sweep-x" / "study.journal").write_text("{}\n")
    (flat / "claimed").mkdir()
    (flat / "claimed" / LOCK).write_text(f"{socket.gethostname()} {os.getpid()}")
    found = find_dataset(flat)
    assert found.classes == ["blue", "green", "red"]
    assert not found.skipped, found.skipped
    warnings = " ".join(found.warnings)
    assert all(f"'{name}/'" in warnings for name in ("my-sweep", "runs", "claimed")), warnings
    assert "has no images" not in warnings


def test_a_sweep_folder_given_as_a_run_says_where_its_runs_are(capsys, tmp_path):
    (tmp_path / "s" / "trials").mkdir(parents=True)
    (tmp_path / "s" / "study.journal").write_text("{}\n")
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "s"))
    assert one_line(code, err) and str(tmp_path / "s" / "trials") + "/*" in err, err


def test_hidden_and_system_folders_inside_class_folders_are_named(tmp_path):
    data = make_folder(tmp_path / "data", n=4, size=16)
    for hidden in (data / "train" / "__MACOSX" / "red", data / "train" / "red" / ".ipynb_checkpoints"):
        hidden.mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(hidden / "junk.png")
    warnings = " ".join(find_dataset(data).warnings)
    assert "train/__MACOSX/" in warnings and "train/red/.ipynb_checkpoints/" in warnings


def test_an_empty_validation_folder_is_refused_not_filled_with_training_images(tmp_path):
    data = make_folder(tmp_path / "data", n=4, size=16)
    for image in (data / "valid").rglob("*.png"):
        image.unlink()
    with pytest.raises(AttnzooError, match="valid holds no usable images"):
        find_dataset(data)


def test_fit_without_data_is_an_error_not_the_demo(tmp_path):
    with pytest.raises(AttnzooError, match="fit needs --data"):
        attnzoo.fit("test_resnet", "lpa-pc", out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_data_demo_says_it_is_not_the_demo_folder_here(tmp_path, monkeypatch):
    from attnzoo.train.data import resolve_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    notes: list[str] = []
    monkeypatch.setattr("attnzoo.train.demo.make_demo", lambda **_: tmp_path / "cached")
    assert resolve_data("demo", notes=notes) == tmp_path / "cached"
    assert notes and "./demo" in notes[0]


# --- locks and settings at their edges ------------------------------------------------------------------------

def test_a_lock_holding_an_impossible_pid_is_stale_and_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {10**30}")
    folder = RunFolder(tmp_path)
    folder.lock()
    assert (tmp_path / LOCK).read_text().split()[1] == str(os.getpid())
    folder.unlock()


def test_a_lock_whose_pid_now_names_another_process_is_stale_and_taken_over(tmp_path):
    """A killed run's pid can be given to a new process: the lock names its process's start time too."""
    from attnzoo.runs.folder import process_started

    started = process_started(os.getpid())
    if started is None:
        pytest.skip("no /proc here: the start time is unknown")
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {os.getpid()} {started + 1}")  # alive pid, another start
    folder = RunFolder(tmp_path)
    folder.lock()
    assert (tmp_path / LOCK).read_text().split() == [socket.gethostname(), str(os.getpid()), str(started)]
    folder.unlock()
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {os.getpid()} {started}")  # the very same process: held
    with pytest.raises(AttnzooError, match="another attnzoo fit"):
        RunFolder(tmp_path).lock()


def test_a_new_run_takes_over_a_folder_holding_only_a_killed_claims_lock(tmp_path):
    """A fit killed between claiming its folder and writing attnzoo.json leaves only its lock: the folder is free."""
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {10**30}")
    folder = RunFolder.claim(tmp_path)
    assert (tmp_path / LOCK).read_text().split()[1] == str(os.getpid())
    folder.release()
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {os.getpid()}")  # a live claim: still refused
    with pytest.raises(AttnzooError, match="being claimed by another attnzoo fit"):
        RunFolder.claim(tmp_path)


def test_a_lock_that_is_a_folder_is_one_line_saying_what_to_do(tmp_path):
    (tmp_path / LOCK).mkdir()
    with pytest.raises(AttnzooError, match="not attnzoo's lock file.*remove it"):
        RunFolder(tmp_path).lock()


def test_a_plugin_time_limit_beyond_what_a_thread_can_wait_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("ATTNZOO_PLUGIN_TIMEOUT", "999999999999")
    from attnzoo.model import plugins

    with pytest.raises(AttnzooError, match="ATTNZOO_PLUGIN_TIMEOUT must be .* at most"):
        plugins.time_limit()


def test_a_batch_of_one_that_batch_norm_cannot_train_is_refused_before_the_run(capsys, tiny_folder, tmp_path):
    code, _, err = run_cli(capsys, "fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--data",
                           str(tiny_folder), "--no-pretrained", "--bs", "1", "--img-size", "32", "--epochs", "1",
                           "--out", str(tmp_path / "r"))
    assert one_line(code, err) and "--bs 1" in err and "--bs 2" in err
    assert not (tmp_path / "r").exists()


def test_class_names_with_escape_sequences_are_printed_escaped(capsys, tmp_path):
    from attnzoo.runs.outputs import printable

    name = "red\x1b[2J\x07"
    assert printable(name) == "red\\x1b[2J\\x07"
    data = make_folder(tmp_path / "data", n=4, size=16)
    for split in ("train", "valid"):
        (data / split / "red").rename(data / split / name)
    code, out, err = run_cli(capsys, "fit", "--backbone", "test_resnet", "--attn", "none", "--data", str(data),
                             "--no-pretrained", "--bs", "4", "--img-size", "32", "--epochs", "1",
                             "--out", str(tmp_path / "r"))
    assert code == 0 and "\x1b" not in out + err and "red\\x1b[2J\\x07" in out


def test_a_diverged_run_is_done_with_a_warning_saying_so(tmp_path):
    from attnzoo.train.callbacks import Divergence, RunState

    state = RunState(RunFolder(tmp_path), [(False, 2, 1e-2)], history=[
        {"epoch": 1, "valid_loss": 1.2}, {"epoch": 2, "valid_loss": 2e35}])
    Divergence(state, n_classes=3).finish()
    (warning,) = state.folder.record["warnings"]
    assert "diverged" in warning and "ln 3" in warning and "first epoch" in warning and "--lr" in warning
    calm = RunState(RunFolder(tmp_path), [(False, 2, 1e-2)], history=[
        {"epoch": 1, "valid_loss": 1.2}, {"epoch": 2, "valid_loss": 0.4}])
    Divergence(calm, n_classes=3).finish()
    assert not calm.folder.record.get("warnings")


# --- interpret: the data the run was trained on, and only that ------------------------------------------------

def test_interpret_refuses_data_that_changed_since_the_run(capsys, tmp_path):
    data = make_folder(tmp_path / "data", n=4, size=16)
    run = attnzoo.fit("test_resnet", "none", str(data), pretrained=False, epochs=1, bs=4, img_size=32, plots=False,
                      out=str(tmp_path / "run"))
    assert Path(json.loads((run / "attnzoo.json").read_text())["data"]["root"]).is_absolute()
    red, blue = data / "valid" / "red", data / "valid" / "blue"
    red.rename(data / "valid" / "tmp")
    blue.rename(red)
    (data / "valid" / "tmp").rename(blue)  # same counts, classes swapped
    capsys.readouterr()
    code, _, err = run_cli(capsys, "interpret", str(run), "--out", str(tmp_path / "i"))
    assert one_line(code, err) and "not what the run was trained on" in err and not (tmp_path / "i").exists()


def test_interpret_refuses_a_relative_data_folder_it_cannot_place(capsys, tmp_path, tiny_run):
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    config = json.loads((run / "attnzoo.json").read_text())
    config["data"]["root"] = "c8"
    (run / "attnzoo.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "interpret", str(run), "--out", str(tmp_path / "i"))
    assert one_line(code, err) and "relative" in err and "--data" in err


@pytest.mark.slow  # 5-7 s: the default run keeps under 3 minutes on a 2-core machine
def test_interpret_into_a_run_folder_it_cannot_save_in_still_reports(capsys, tmp_path, tiny_run, monkeypatch):
    import errno
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = (run / "attnzoo.json").read_bytes()

    def read_only(self, **entries):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(RunFolder, "update", read_only)
    code, out, err = run_cli(capsys, "interpret", str(run), "--out", str(tmp_path / "i"), "--deletion-images", "3",
                             "--road-images", "0", "--sanity-images", "0")
    assert code == 0 and "not saved" in err and "Read-only" in err and (tmp_path / "i" / "report.html").is_file()
    assert (run / "attnzoo.json").read_bytes() == before


# --- timm's keywords through fit ---------------------------------------------------------------------------------

def test_fit_trains_one_channel_images_with_drop_path_and_the_run_predicts_them(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=4, size=16)
    code, _, err = run_cli(capsys, "fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--data", str(data),
                           "--no-pretrained", "--bs", "4", "--img-size", "32", "--epochs", "1", "--in-chans", "1",
                           "--drop-path", "0.1", "--drop", "0.2", "--no-plots", "--out", str(tmp_path / "r"))
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "attnzoo.json").read_text())
    assert record["timm_kwargs"] == {"in_chans": 1, "drop_rate": 0.2, "drop_path_rate": 0.1}
    assert len(record["mean"]) == len(record["std"]) == 1
    run = attnzoo.load_run(tmp_path / "r")
    assert run.model.backbone.conv1[0].in_channels == 1
    image = next((data / "valid" / "red").iterdir())
    x = run.preprocess(run.load_image(image))
    grey = Image.open(image).convert("L").resize((32, 32), Image.Resampling.BILINEAR)  # independent reading
    want = (torch.tensor(list(grey.getdata()), dtype=torch.float32).view(1, 32, 32) / 255 - record["mean"][0]) \
        / record["std"][0]
    torch.testing.assert_close(x, want)
    probs, _ = run.predict([image])
    assert probs.shape == (1, 3) and torch.isfinite(probs).all()


@pytest.mark.parametrize("option,value,message", [("--in-chans", "2", "in_chans must be 1"),
                                                  ("--drop-path", "1.5", "--drop-path must be a number"),
                                                  ("--drop", "-0.1", "--drop must be a number")])
def test_timm_keywords_out_of_range_are_one_line(capsys, tmp_path, option, value, message):
    code, _, err = run_cli(capsys, "fit", "--backbone", "test_resnet", "--attn", "none", "--data", "demo",
                           option, value, "--out", str(tmp_path / "r"))
    assert one_line(code, err) and message in err


class Double(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_a_gate_returning_another_dtype_is_named_with_its_site_when_built():
    attnzoo.register_attention("double-test", kind="gate", summary="returns float64")(Double)
    with pytest.raises(attnzoo.SiteError, match="'double-test' at site 'layer3'.*torch.float64.*dtype torch.float32"):
        attnzoo.create_model("test_resnet", "double-test", at="layer3", num_classes=3, img_size=32)
