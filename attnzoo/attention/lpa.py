"""Learn To Pay Attention (Jetley, Lord, Lee, Torr; ICLR 2018). https://arxiv.org/abs/1804.02391

A readout: local features l_s (one map per tap s) are compared with the global feature g, the
compatibility scores are normalised over positions, and the attention-weighted sums g_a^s feed
the classifier, which replaces the backbone's.

    pc (parametrised):  c_i = <u_s, l_i + g>        dp (dot product):  c_i = <l_i, g>
    a = softmax_i(c)    g_a = sum_i a_i l_i         (norm='sigmoid': a = sigmoid(c), g_a = mean_i a_i l_i)

When l and g differ in width, ``project='g'`` maps g down to each tap's channels with a linear layer
(the paper's choice), ``project='l'`` lifts l to g's channels with a 1x1 conv. ``agg='concat'``
concatenates the g_a of all taps into one linear classifier; ``agg='indep'`` gives each tap its own
classifier and averages their logits. Compatibilities, their normalisation and the attended features
are computed in float32 under autocast; the classifier runs in autocast's precision.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..model.maps import report_map
from ..model.registry import register_attention
from .precision import float32_scores

PAPER = "Jetley et al., Learn To Pay Attention, ICLR 2018 (arXiv:1804.02391)"


class _Tap(nn.Module):
    """Attention of one tap: projection, compatibility and the attended feature."""

    def __init__(self, channels: int, global_channels: int, compat: str, project: str):
        super().__init__()
        self.project = project
        if project == "g":
            self.proj = nn.Linear(global_channels, channels, bias=False)
            width = channels
        else:
            self.proj = nn.Conv2d(channels, global_channels, 1, bias=False)
            width = global_channels
        self.width = width
        # u: the learned vector of pc, as a 1x1 conv to one channel; dp has no parameters here
        self.u = nn.Conv2d(width, 1, 1, bias=False) if compat == "pc" else None

    def forward(self, l: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.project == "g":
            g = self.proj(g)
        else:
            l = self.proj(l)
        g = g[:, :, None, None]
        if self.u is not None:
            c = self.u(l + g)
        else:
            c = (l * g).sum(1, keepdim=True)
        return l, c.flatten(1)  # [B, C, h, w], [B, h*w]


@register_attention(
    "lpa-pc", kind="readout", paper=PAPER, compat="pc",
    summary="Learn To Pay Attention, parametrised compatibility <u, l+g>; attended features of each tap classify",
)
@register_attention(
    "lpa-dp", kind="readout", paper=PAPER, compat="dp",
    summary="Learn To Pay Attention, dot-product compatibility <l, g>; attended features of each tap classify",
)
class LearnToPayAttention(nn.Module):
    """Args:
    local_channels: channels of each tap's feature map.
    global_channels: width of the backbone's pooled global feature g.
    num_classes: number of classes.
    compat: 'pc' (parametrised, <u, l+g>) or 'dp' (dot product <l, g>); fixed by the registered name.
    agg: 'concat' (one classifier over all taps) or 'indep' (one per tap, logits averaged).
    norm: 'softmax' over positions (paper) or 'sigmoid' per position with a spatial mean.
    project: 'g' (project g to each tap's width) or 'l' (lift l to g's width).
    """

    def __init__(
        self,
        local_channels: list[int],
        global_channels: int,
        num_classes: int,
        compat: Literal["pc", "dp"] = "pc",
        agg: Literal["concat", "indep"] = "concat",
        norm: Literal["softmax", "sigmoid"] = "softmax",
        project: Literal["g", "l"] = "g",
    ):
        super().__init__()
        if not local_channels:
            raise ValueError("Learn To Pay Attention needs at least one tap")
        self.agg, self.norm = agg, norm
        self.taps = nn.ModuleList(_Tap(c, global_channels, compat, project) for c in local_channels)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for ``num_classes`` (0: none; the model then gives the attended features)."""
        widths = [t.width for t in self.taps]
        self.num_classes = num_classes
        if num_classes == 0:
            self.classifier = nn.Identity()
        elif self.agg == "concat":
            self.classifier = nn.Linear(sum(widths), num_classes)
        else:
            self.classifier = nn.ModuleList(nn.Linear(w, num_classes) for w in widths)

    def pre_logits(self, locals_: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
        """The attended features g_a of every tap, concatenated: what the classifier reads."""
        return torch.cat(self._attend(locals_, g), 1)

    def _attend(self, locals_: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
        attended, maps = [], []
        with float32_scores(g):
            for tap, l in zip(self.taps, locals_):
                dtype = tap.proj.weight.dtype  # float32 under autocast (its parameters are)
                l, c = tap(l.to(dtype), g.to(dtype))
                l, c = l.float(), c.float()
                if self.norm == "softmax":
                    a = torch.softmax(c, dim=1)
                    g_a = torch.einsum("bn,bcn->bc", a, l.flatten(2))
                else:
                    a = torch.sigmoid(c)
                    g_a = torch.einsum("bn,bcn->bc", a, l.flatten(2)) / a.shape[1]
                attended.append(g_a.to(g.dtype))
                maps.append(a.unflatten(1, l.shape[2:]))
        report_map(self, maps)
        return attended

    def forward(self, locals_: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
        attended = self._attend(locals_, g)
        if self.agg == "concat" or isinstance(self.classifier, nn.Identity):
            return self.classifier(torch.cat(attended, 1))
        return torch.stack([fc(x) for fc, x in zip(self.classifier, attended)]).mean(0)
