"""The run folder round trip: what load_run gives back predicts exactly as the trained model did."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import AttnzooError
from attnzoo.runs.folder import RunFolder, latest_run
from attnzoo.runs.predict import Run, load_run


def make_run(path, attn="lpa-dp", **options) -> Run:
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet", attn, num_classes=3, img_size=32, attn_kwargs=options).eval()
    config = dict(backbone="test_resnet", attn=attn, attn_options=options, sites=model.sites,
                  classes=["a", "b", "c"], img_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    RunFolder(path).save(model, config, [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5}])
    return Run(model, config["classes"], 32, (0.5,) * 3, (0.25,) * 3, config, path)


def test_load_run_predicts_like_the_saved_model(tmp_path):
    saved = make_run(tmp_path / "r", agg="indep")
    image = tmp_path / "x.png"
    Image.new("RGB", (50, 30), (200, 30, 90)).save(image)
    loaded = load_run(tmp_path / "r")
    p1, m1 = saved.predict([image])
    p2, m2 = loaded.predict([image])
    torch.testing.assert_close(p1, p2)
    assert m1.keys() == m2.keys() == {"layer1", "layer2", "layer3"}
    assert loaded.model.readout.agg == "indep"


def test_run_folder_holds_json_and_safetensors_only(tmp_path):
    make_run(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["attnzoo.json", "history.csv", "model.safetensors"]
    config = json.loads((tmp_path / "r" / "attnzoo.json").read_text())
    assert config["metrics"]["final"] == {"train_loss": 1.0, "valid_loss": 0.9, "accuracy": 0.5}
    assert set(config["versions"]) >= {"torch", "timm", "fastai", "attnzoo"}
    assert not list((tmp_path / "r").glob(".*tmp"))


def test_latest_run_is_the_newest(tmp_path):
    make_run(tmp_path / "old")
    make_run(tmp_path / "new")
    os.utime(tmp_path / "old" / "attnzoo.json", (1, 1))
    assert latest_run(tmp_path) == tmp_path / "new"


def test_missing_runs_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(AttnzooError, match="no run folder"):
        latest_run(tmp_path)
    make_run(tmp_path / "r")
    (tmp_path / "r" / "model.safetensors").unlink()
    with pytest.raises(AttnzooError, match="no weights"):
        load_run(tmp_path / "r")


def test_a_crash_while_saving_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    import safetensors.torch

    make_run(tmp_path / "r")
    before = (tmp_path / "r" / "model.safetensors").read_bytes()

    def crash(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        make_run(tmp_path / "r")
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]
    load_run(tmp_path / "r")  # still loads


# --- claiming a run folder ---------------------------------------------------------------------------------------

def claim_together(claim, n: int = 8) -> list:
    """``claim()`` in ``n`` threads released at once: what each got (a RunFolder or the error)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = claim()
        except AttnzooError as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("exists", [False, True], ids=["new", "empty"])
def test_runs_claiming_one_folder_at_once_give_it_to_exactly_one(tmp_path, exists):
    for round_ in range(20):
        path = tmp_path / f"run{round_}"
        if exists:
            path.mkdir()
        results = claim_together(lambda path=path: RunFolder.claim(path))
        winners = [r for r in results if isinstance(r, RunFolder)]
        assert len(winners) == 1
        assert all("another attnzoo fit" in str(r) or "not empty" in str(r) for r in results if r not in winners)


def test_default_run_names_claimed_at_once_are_all_different(tmp_path):
    results = claim_together(lambda: RunFolder.claim_new(tmp_path / "test_resnet-sagan-20260101-120000"))
    names = sorted(r.path.name for r in results)
    assert names == sorted(["test_resnet-sagan-20260101-120000"] + [f"test_resnet-sagan-20260101-120000-{n}"
                                                                     for n in range(2, 9)])


def test_a_folder_with_files_is_never_claimed_and_keeps_them(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(AttnzooError, match="not empty"):
        RunFolder.claim(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["notes.txt"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(AttnzooError, match="is a file"):
        RunFolder.claim(tmp_path / "f")
    with pytest.raises(AttnzooError, match="cannot create the run folder"):
        RunFolder.claim(tmp_path / "f" / "r")


def test_a_released_claim_leaves_nothing_and_a_written_run_keeps_its_folder(tmp_path):
    folder = RunFolder.claim(tmp_path / "r")
    folder.release()
    assert not (tmp_path / "r").exists()
    folder = RunFolder.claim(tmp_path / "r")
    folder.start({"status": "training"})
    folder.release()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["attnzoo.json"]  # the lock went, the run stays


# --- writing -----------------------------------------------------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_are_written_with_the_users_umask(tmp_path, umask, mask):
    from attnzoo.explain import figures as viz
    from attnzoo.explain.compare import bar_figure
    from attnzoo.train.checkpoints import save_checkpoint

    umask(mask)
    run = make_run(tmp_path / "r")
    save_checkpoint(tmp_path / "r" / "checkpoints" / "last.safetensors", None, run.model, {"epoch": 1})
    RunFolder(tmp_path / "r").start(run.config, [("x.png", "broken")])
    viz.save_figure(bar_figure(["a"], {"s": [1.0]}, "t", "y"), tmp_path / "r" / "plot.png")
    for name in ("attnzoo.json", "model.safetensors", "history.csv", "skipped.txt", "plot.png",
                 "checkpoints/last.safetensors"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o666 & ~mask, name


def test_skipped_names_with_tabs_newlines_and_undecodable_bytes_read_back_as_written(tmp_path):
    skipped = [(os.fsdecode(b"data/cat/a\tb.png"), "not an image file (.png)"),
               (os.fsdecode(b"data/cat/two\nlines \"q\".jpg"), "cannot be decoded"),
               (os.fsdecode(b"data/caf\xe9/x\xff.png"), "empty file")]
    folder = RunFolder(tmp_path)
    folder.start({}, skipped)
    assert folder.read_skipped() == skipped
    assert b"caf\xe9/x\xff.png" in (tmp_path / "skipped.txt").read_bytes()  # the name's own bytes


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    make_run(tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints"
    ck.mkdir()
    stale = [ck / ".last.safetensors.k2x_9a0b.tmp", ck / ".tmpA9zQ3c", tmp_path / "r" / ".attnzoo.json.00ff12ab.tmp"]
    kept = [ck / "best.safetensors", tmp_path / "r" / "notes.tmp", tmp_path / "r" / ".tmp", ck / ".tmpdir.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(RunFolder(tmp_path / "r").clean_temporaries()) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_json_with_undecodable_bytes_in_names_round_trips(tmp_path):
    name = os.fsdecode(b"caf\xe9")
    run = make_run(tmp_path / "r")
    config = {**run.config, "classes": [name, "b", "c"]}
    RunFolder(tmp_path / "r").update(classes=config["classes"])
    assert load_run(tmp_path / "r").classes == [name, "b", "c"]


# --- reading: one schema -----------------------------------------------------------------------------------------

FORGED = {
    "mean missing": (lambda c: c.pop("mean"), "mean: missing"),
    "std missing": (lambda c: c.pop("std"), "std: missing"),
    "img_size string": (lambda c: c.update(img_size="32"), "img_size"),
    "img_size 0": (lambda c: c.update(img_size=0), "img_size"),
    "img_size negative": (lambda c: c.update(img_size=-5), "img_size"),
    "img_size NaN": (lambda c: c.update(img_size=float("nan")), "img_size"),
    "attn_options list": (lambda c: c.update(attn_options=[]), "attn_options"),
    "attn_options null": (lambda c: c.update(attn_options=None), "attn_options"),
    "mean of one": (lambda c: c.update(mean=[0.5]), "mean"),
    "std zero": (lambda c: c.update(std=[0.25, 0, 0.25]), "std.1"),
    "classes dict": (lambda c: c.update(classes={"a": 0}), "classes"),
    "classes string": (lambda c: c.update(classes="abc"), "classes"),
    "classes twice": (lambda c: c.update(classes=["a", "a", "b"]), "classes"),
    "backbone number": (lambda c: c.update(backbone=123), "backbone"),
    "status unknown": (lambda c: c.update(status="great"), "status"),
    "skipped without reason": (lambda c: c.update(skipped=[{"path": "x"}]), "skipped.0.reason"),
}


@pytest.mark.parametrize("forge", FORGED.values(), ids=FORGED.keys())
def test_a_forged_config_is_one_line_naming_the_field(tmp_path, forge):
    edit, field_name = forge
    make_run(tmp_path / "r")
    path = tmp_path / "r" / "attnzoo.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(AttnzooError) as e:
        load_run(tmp_path / "r")
    message = str(e.value)
    assert "\n" not in message and f"attnzoo.json: {field_name}" in message, message


@pytest.mark.parametrize("text", ["[]", "null", "3", '"run"'])
def test_a_config_that_is_not_an_object_is_one_line(tmp_path, text):
    make_run(tmp_path / "r")
    (tmp_path / "r" / "attnzoo.json").write_text(text)
    with pytest.raises(AttnzooError, match="must hold a JSON object"):
        load_run(tmp_path / "r")


def test_an_unknown_backbone_in_the_config_names_the_file(tmp_path):
    make_run(tmp_path / "r")
    path = tmp_path / "r" / "attnzoo.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "backbone": "123"}))
    with pytest.raises(AttnzooError, match=r"attnzoo.json: unknown backbone '123'"):
        load_run(tmp_path / "r")


@pytest.mark.parametrize("attn", ["lpa-dp", "sagan", None])
def test_a_class_list_that_does_not_match_the_weights_is_refused(tmp_path, attn):
    make_run(tmp_path / "r", attn=attn)
    path = tmp_path / "r" / "attnzoo.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "classes": ["a", "b", "c", "d"]}))
    with pytest.raises(AttnzooError, match=r"classes: 4 names, but the weights in model.safetensors have 3 classes"):
        load_run(tmp_path / "r")


def test_a_minimal_format_1_config_still_loads(tmp_path):
    run = make_run(tmp_path / "r")
    keep = ("backbone", "attn", "attn_options", "sites", "classes", "img_size", "mean", "std")
    (tmp_path / "r" / "attnzoo.json").write_text(json.dumps({k: run.config[k] for k in keep}))
    assert load_run(tmp_path / "r").classes == ["a", "b", "c"]


def test_a_config_from_a_newer_attnzoo_says_so(tmp_path):
    make_run(tmp_path / "r")
    path = tmp_path / "r" / "attnzoo.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99}))
    with pytest.raises(AttnzooError, match="newer attnzoo"):
        load_run(tmp_path / "r")
