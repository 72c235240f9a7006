"""Register your own attention module in-process, check it with the conformance kit, and use it.

    python examples/custom_attention.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo
from attnzoo.testing import check_attention


@attnzoo.register_attention(
    "strip-pool", kind="gate",
    summary="Strip pooling gate: row and column means score each position, sigmoid gate",
)
class StripPoolGate(nn.Module):
    """A gate in a few lines: s_ij = conv(mean over row i + mean over column j); y = x * sigmoid(s).

    Args:
        channels: channels of the gated feature map (passed by attnzoo from the site).
        hidden: channels of the 1x1 bottleneck.
    """

    def __init__(self, channels: int, hidden: int = 16):
        super().__init__()
        self.score = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strips = x.mean(3, keepdim=True) + x.mean(2, keepdim=True)  # [B, C, H, W] by broadcasting
        gate = torch.sigmoid(self.score(strips))
        # how show-attention and attention_maps() see it: squeeze(gate, 1), computed only when somebody looks
        attnzoo.report_map(self, torch.squeeze, gate, 1)
        return x * gate


if __name__ == "__main__":
    print("conformance:", len(check_attention("strip-pool")), "checks passed")
    model = attnzoo.create_model("test_resnet", "strip-pool", at=["layer2", "layer3"], num_classes=10,
                                 attn_kwargs={"hidden": 8})
    logits = model(torch.randn(2, 3, 96, 96))
    print("logits", tuple(logits.shape))
    for site, m in model.attention_maps().items():
        print(f"map at {site}: {tuple(m.shape)}")
