"""Pretrained weights without network: known in seconds, named, and the local cache still serves."""

from __future__ import annotations

import socket

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from attnzoo import create_model
from attnzoo.errors import PretrainedUnavailable

NOWHERE = "http://127.0.0.1:9"  # the discard port: refused at once, no retries needed to find out


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """A hub that cannot be reached, without HF_HUB_OFFLINE, and an empty local cache."""
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> None:  # this test can never reach the network
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test_hub refuses a connection to {address}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", NOWHERE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_an_unreachable_hub_is_named_in_full(no_network):
    with pytest.raises(PretrainedUnavailable) as e:
        create_model("test_resnet", pretrained=True, num_classes=3)
    assert "no connection to 127.0.0.1" in str(e.value) and "not in the local cache" in str(e.value)
    assert "--no-pretrained" in str(e.value) and "--weights FILE" in str(e.value)
    assert constants.HF_HUB_OFFLINE is False  # the hub's offline mode was only borrowed


def test_cached_weights_load_when_the_hub_is_unreachable(no_network):
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    snapshot = no_network / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    weights = {k: torch.full_like(v, 0.25) for k, v in timm.create_model("test_resnet").state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    model = create_model("test_resnet", pretrained=True, num_classes=3)
    assert torch.all(model.backbone.conv1[0].weight == 0.25)
