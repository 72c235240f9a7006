"""Two processes on CPU (gloo) through torchrun write one run folder, like a single process does.

One real launch (``python -m torch.distributed.run --nproc_per_node 2 -m attnzoo fit``) on a tiny folder whose
15 validation images do not split evenly over two ranks, so the padding fastai adds to the last shard is there
to be (not) counted; then the same fit in this process for comparison.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_folder

from attnzoo import load_run
from attnzoo.cli import main
from attnzoo.errors import AttnzooError
from attnzoo.train import ddp, distributed

FIT = ["fit", "--backbone", "test_resnet", "--attn", "lpa-pc", "--no-pretrained", "--epochs", "1", "--bs", "4",
       "--img-size", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"), n=10)  # 30 train, 15 valid images


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "attnzoo", *FIT, "--data", str(data), "--out", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: on a busy small machine more threads only contend
    try:
        with pytest.raises(SystemExit) as e:
            main([*FIT, "--data", str(data), "--out", str(run_dir)])
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 0
    return run_dir


def config(run_dir: Path) -> dict:
    return json.loads((run_dir / "attnzoo.json").read_text())


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.mark.slow  # two processes launched by torchrun: 45 s (CI runs `pytest -m slow` too)
def test_two_processes_write_one_run_folder_like_a_single_process(launched, single):
    run_dir, _ = launched
    assert files(run_dir) == files(single)
    assert config(run_dir).keys() == config(single).keys()
    assert config(run_dir)["metrics"].keys() == config(single)["metrics"].keys()
    assert config(run_dir)["status"] == "done"
    run = load_run(run_dir)
    assert run.classes == ["blue", "green", "red"] and run.model.sites == ["layer1", "layer2", "layer3"]


@pytest.mark.slow  # the torchrun launch (45 s) is slow: CI runs `pytest -m slow` too
def test_each_rank_trains_on_its_half_of_the_batches(launched, single):
    record = config(launched[0])["distributed"]
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["effective_bs"] == 8
    (alone,) = config(single)["distributed"]["train_batches"]  # 30 images in batches of 4, the last dropped: 7
    assert alone == 7
    assert [abs(b - alone / 2) <= 1 for b in record["train_batches"]] == [True, True]  # gathered from both ranks


@pytest.mark.slow  # the torchrun launch (45 s) is slow: CI runs `pytest -m slow` too
def test_validation_metrics_cover_the_whole_validation_set(launched, data):
    run_dir, _ = launched
    final = config(run_dir)["metrics"]["final"]
    run = load_run(run_dir)
    images = sorted((data / "valid").rglob("*.png"))
    probs, _ = run.predict(images)
    target = torch.tensor([run.classes.index(p.parent.name) for p in images])
    # fastai's own averaging would count the image that pads rank 1's shard twice: accuracy k/16, another loss
    assert final["valid_loss"] == pytest.approx(-probs[torch.arange(15), target].log().mean().item(), abs=1e-4)
    assert final["accuracy"] == pytest.approx((probs.argmax(1) == target).float().mean().item(), abs=1e-6)


@pytest.mark.slow  # the torchrun launch (45 s) is slow: CI runs `pytest -m slow` too
def test_only_rank_0_reports(launched):
    _, proc = launched
    out = proc.stdout + proc.stderr
    assert out.count("run folder:") == 1
    assert out.count("train_loss") == 1  # the epoch table's header, once
    assert sum(line.split()[:1] == ["1"] for line in out.splitlines()) == 1  # its row of the only epoch
    assert out.count("total") == 1  # the data table


def test_a_single_process_run_records_one_process(tiny_run):
    assert config(tiny_run)["distributed"] == dict(world_size=1, backend=None, sync_bn=False, effective_bs=8,
                                                   train_batches=[3])  # 24 training images, batches of 8


@pytest.mark.slow  # the torchrun launch (45 s) is slow: CI runs `pytest -m slow` too
def test_checkpoints_hold_the_same_tensors_as_a_single_process(launched, single):
    from safetensors import safe_open

    def keys(run_dir: Path) -> list[str]:
        with safe_open(str(run_dir / config(run_dir)["best"]["weights"]), "pt") as f:  # a checkpoint or the model
            return sorted(k.removeprefix("model.") for k in f.keys())

    assert keys(launched[0]) == keys(single)


def test_a_shard_counts_the_batches_it_yields(data):
    from attnzoo.train.data import find_dataset, image_dataloaders

    dls = image_dataloaders(find_dataset(data), img_size=32, bs=4)
    sharded = ddp.ShardedDL
    # 30 training images: 15 per rank, 3 batches of 4 with the last dropped (fastai's own count says 4)
    assert [len(sharded(dls.train, rank=r, world_size=2)) for r in (0, 1)] == [3, 3]
    assert len(sharded(dls.valid, rank=1, world_size=2)) == 2  # 15 valid images padded to 16: 8 per rank


def test_without_a_launcher_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast("x") == "x" and distributed.gather(3) == [3]


def test_alone_hides_the_launch_from_fastai_and_restores_it(monkeypatch):
    from fastai.torch_core import num_distrib, rank_distrib

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.alone():
        assert (num_distrib(), rank_distrib()) == (0, 0)
    assert (num_distrib(), rank_distrib(), distributed.is_main()) == (2, 1, False)


def test_sync_bn_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(AttnzooError, match="sync-bn needs CUDA"):
        distributed.Training(learn=None, sync_bn=True)


def test_sync_bn_keeps_timm_norm_act_layers_and_is_undone():
    import timm
    from timm.layers import BatchNormAct2d

    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before, originals = model(x), [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    swapped = ddp.swap_batch_norm(model)
    assert len(swapped) == len(originals) > 0
    assert not any(isinstance(m, BatchNormAct2d) and not isinstance(m, torch.nn.SyncBatchNorm)
                   for m in model.modules())
    torch.testing.assert_close(model(x), before)  # torch's converter would drop each layer's activation
    ddp.unswap_batch_norm(swapped)
    assert [m for m in model.modules() if isinstance(m, BatchNormAct2d)] == originals
