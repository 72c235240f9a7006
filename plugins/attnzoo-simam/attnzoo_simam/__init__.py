"""SimAM as an attnzoo plugin: a template for plugin authors (the whole plugin is this file and its pyproject).

SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks
(Yang, Zhang, Li, Xie; ICML 2021), https://proceedings.mlr.press/v139/yang21o.html

Each neuron is weighted by how much it stands out from the other neurons of its channel. Over the
``h*w`` positions of one channel, with ``n = h*w - 1``:

    mu = mean(x)    var = sum((x - mu)^2) / n
    e  = (x - mu)^2 / (4 (var + lambda)) + 0.5      (the inverse of the neuron's minimal energy)
    y  = x * sigmoid(e)

No parameters: the module works at any channel count and adds nothing to the state dict.

How attnzoo finds it: the pyproject declares the entry point ``simam = "attnzoo_simam:SimAM"`` in the
group ``attnzoo.attention``; attnzoo registers the class under the entry point's name, reading its kind,
summary and paper from the ``attnzoo_*`` class attributes and its options from ``__init__``'s signature.
"""

from __future__ import annotations

import torch
from torch import nn

# Only the public API: report_map is how every module hands attnzoo its attention map.
from attnzoo import SiteError, report_map

# The attnzoo plugin API versions this plugin works with (a PEP 440 specifier). attnzoo skips the plugin,
# and says why in `attnzoo plugins`, when its own PLUGIN_API_VERSION is outside this range.
ATTNZOO_API = ">=1,<2"

__version__ = "0.1.0"


class SimAM(nn.Module):
    """SimAM, a parameter-free gate: y = x * sigmoid((x - mu)^2 / (4 (var + lambda)) + 0.5), per channel.

    Paper: https://proceedings.mlr.press/v139/yang21o.html

    Attention map: the gate sigmoid(e) averaged over channels, [B, h, w], in (0.62, 1): 0.62 = sigmoid(0.5)
    where a position is average in every channel, higher where it stands out.

    Args:
        channels: channels of the gated feature map. attnzoo passes it to every gate; SimAM needs none.
        e_lambda: the regulariser lambda of the energy function (the paper's 1e-4).
    """

    # What attnzoo reads from a class entry point. The registered name is the entry point's name.
    attnzoo_kind = "gate"  # "gate": Module(channels, **options), forward(x [B,C,H,W]) -> [B,C,H,W]
    attnzoo_summary = "SimAM: parameter-free 3-D attention, each neuron gated by sigmoid of its inverse energy"
    attnzoo_paper = "https://proceedings.mlr.press/v139/yang21o.html"

    # Options are keyword arguments with defaults; their types (here float) let `--attn-arg e_lambda=1e-3`
    # be checked and converted. A Literal["a", "b"] annotation would list the allowed choices.
    def __init__(self, channels: int, e_lambda: float = 1e-4):
        super().__init__()
        if e_lambda <= 0:
            raise ValueError(f"e_lambda must be > 0, got {e_lambda}")
        self.e_lambda = e_lambda

    def check_site(self, shape: tuple[int, ...]) -> None:
        """Optional: attnzoo calls it with the site's output shape [B, C, h, w] when building a model, so a
        site the module cannot work at fails at once, naming the site, instead of in the first batch."""
        if shape[-2] * shape[-1] < 2:
            raise SiteError("SimAM's variance needs at least 2 positions, the map is 1x1 (use an earlier site)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2] * x.shape[-1] - 1
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        var = d.sum(dim=(2, 3), keepdim=True) / n
        gate = torch.sigmoid(d / (4 * (var + self.e_lambda)) + 0.5)
        # The map is torch.mean(gate, 1): a function and the tensors it needs, not the map itself, so attnzoo
        # computes it only when somebody looks at the maps and training pays nothing. No lambda: a lambda works
        # too, but TorchScript cannot parse one. Never store tensors on the module for this.
        report_map(self, torch.mean, gate, 1)
        return x * gate
