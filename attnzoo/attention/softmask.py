"""Soft attention masks: a learned score per position, squashed, multiplied into the features.

The simple attention of many tutorials (e.g. trained on the Intel scene folders): a 1x1 conv (or a
small conv stack) scores each position, and the gate multiplies the features element-wise.

    s = f(x)   sigmoid:  m = sigmoid(s) in (0, 1)     softmax:  m = h*w * softmax_positions(s)  (mean 1)
    y = m * x

The softmax mask is rescaled so its mean is 1 and the gated features keep their scale. Scores and
mask are computed in float32 under autocast.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import SiteError
from ..model.maps import report_map
from ..model.registry import register_attention
from .precision import float32_scores


class SoftMask(nn.Module):
    """Args:
    channels: channels of the gated feature map.
    norm: 'sigmoid' (per position) or 'softmax' (over positions, mean 1); fixed by the registered name.
    hidden: 0 for a single 1x1 conv scorer; else a 3x3 conv with this many channels, BN and ReLU first.
    """

    def __init__(self, channels: int, norm: Literal["sigmoid", "softmax"] = "sigmoid", hidden: int = 0):
        super().__init__()
        self.norm = norm
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        if hidden:
            self.score = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, 1, 1),
            )
        else:
            self.score = nn.Conv2d(channels, 1, 1)

    def check_site(self, shape: tuple[int, ...]) -> None:
        """Called by create_model with the site's output shape [B, C, h, w]."""
        if self.norm == "softmax" and shape[-1] * shape[-2] < 2:
            raise SiteError(f"softmax attention over a {shape[-2]}x{shape[-1]} map is constant (use an earlier site)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_scores(x):
            s = self.score(x.to(next(self.score.parameters()).dtype)).float()  # [B, 1, h, w]
            if self.norm == "sigmoid":
                m = torch.sigmoid(s)
            else:
                m = torch.softmax(s.flatten(1), 1).view_as(s) * (s.shape[-1] * s.shape[-2])
        report_map(self, torch.squeeze, m, 1)  # the mask [B, h, w], squeezed only when somebody looks
        return x * m.to(x.dtype)


register_attention(
    "softmask-sigmoid", kind="gate", norm="sigmoid",
    summary="Soft mask: a 1x1 conv scores each position, sigmoid gate in (0, 1) multiplies the features",
)(SoftMask)
register_attention(
    "softmask-softmax", kind="gate", norm="softmax",
    summary="Soft mask: a 1x1 conv scores each position, softmax over positions (mean 1) multiplies the features",
)(SoftMask)
