"""Self-attention of SAGAN (Zhang, Goodfellow, Metaxas, Odena; ICML 2019). https://arxiv.org/abs/1805.08318

A gate: every position attends to every other one.

    q = W_q x, k = W_k x (C/8 channels), v = W_v x (C channels), 1x1 convs
    beta_{j,i} = softmax_i(q_j . k_i)      o_j = sum_i beta_{j,i} v_i      y = gamma * o + x

gamma starts at 0, so the block starts as the identity and a pretrained backbone is undisturbed.

The N x N matrix beta (N = h*w) is never built in one piece: the product runs through PyTorch's
fused ``scaled_dot_product_attention`` kernels (flash / memory-efficient), whose memory grows with
N, not N^2. Those kernels want q, k and v of one width: v is split into heads of ``HEAD_WIDTH``
channels, q and k are zero-padded to that width (which leaves every q.k unchanged) and shared by all
heads. Off the GPU, where PyTorch's fused CPU backward is slow, a chunked implementation runs instead:
queries in chunks, only the per-query log-sum-exp kept for the backward pass, which recomputes each
chunk (the flash-attention recipe, in plain matmuls). Either way the result is the formula above.
Chunks are sized by N alone (never by the batch), so a traced or exported graph keeps a dynamic batch,
and every chunk is a new tensor joined by ``cat`` (no writes into slices, which tracing would drop).
Scores and softmax run in float32 under autocast.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..model.maps import report_map
from ..model.registry import register_attention
from .precision import float32_scores

#: width of the heads v is split into; the fused kernels are efficient at 32..128
HEAD_WIDTH = 64
#: elements per sample of one chunk's [queries, N] score matrix in the chunked path (4 MB in fp32)
CHUNK_ELEMS = 1 << 20


def chunk_size(n: int, elems: int) -> int:
    """Queries per chunk for N positions: a function of N only, so the batch size stays free in a graph."""
    return max(1, elems // max(1, n))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T) v and the per-query log-sum-exp, ``chunk`` queries at a time (forward only)."""
    kt = k.transpose(1, 2)
    outs, lses = [], []
    for s in range(0, q.shape[1], chunk):
        scores = q[:, s : s + chunk] @ kt  # [B, c, N]
        m = torch.logsumexp(scores, -1)
        outs.append(torch.bmm(scores.sub_(m[..., None]).exp_(), v))
        lses.append(m)
    return torch.cat(outs, 1), torch.cat(lses, 1)


class ChunkedAttention(torch.autograd.Function):
    """softmax(q k^T) v for q, k [B, N, d], v [B, N, C], holding O(chunk * N) memory, forward and backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
        out, lse = chunked_attention(q, k, v, chunk)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        rows = (dout * out).sum(-1)  # [B, N]: sum_j P_ij dP_ij
        dqs = []
        for s in range(0, q.shape[1], ctx.chunk):
            e = s + ctx.chunk
            p = (q[:, s:e] @ kt).sub_(lse[:, s:e, None]).exp_()  # recomputed P, [B, c, N]
            dv.baddbmm_(p.transpose(1, 2), dout[:, s:e])
            ds = p.mul_((dout[:, s:e] @ vt).sub_(rows[:, s:e, None]))  # dS = P * (dP - rowsum)
            dqs.append(torch.bmm(ds, k))
            dk.baddbmm_(ds.transpose(1, 2), q[:, s:e])
        return torch.cat(dqs, 1), dk, dv, None


def received_attention(q: torch.Tensor, k: torch.Tensor, chunk_elems: int | None = None) -> torch.Tensor:
    """Mean over queries of softmax(q k^T): the attention each key position receives, [B, N], float32.

    q, k: [B, N, d]. Queries are processed in chunks (``chunk_elems`` per sample) so the full matrix is
    never held.
    """
    n = q.shape[1]
    step = chunk_size(n, CHUNK_ELEMS if chunk_elems is None else chunk_elems)
    kt = k.float().transpose(1, 2)
    with float32_scores(q):
        parts = [torch.softmax(q[:, s : s + step].float() @ kt, -1).sum(1) for s in range(0, n, step)]
    return torch.stack(parts).sum(0) / n


@register_attention(
    "sagan", kind="gate",
    paper="Zhang et al., Self-Attention Generative Adversarial Networks, ICML 2019 (arXiv:1805.08318)",
    summary="SAGAN self-attention: every position attends to all others; gamma-gated residual, starts as identity",
)
class SelfAttention(nn.Module):
    """Args:
    channels: channels of the gated feature map.
    reduction: q/k width is channels // reduction (at least 1); the paper uses 8.
    backend: 'auto' (fused SDPA kernels on GPU, the chunked path elsewhere), 'sdpa' or 'chunked'.
    """

    def __init__(self, channels: int, reduction: int = 8, backend: Literal["auto", "sdpa", "chunked"] = "auto"):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.qk_channels = max(1, channels // reduction)
        self.head_width = max(self.qk_channels, min(channels, HEAD_WIDTH))
        self.query = nn.Conv2d(channels, self.qk_channels, 1)
        self.key = nn.Conv2d(channels, self.qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        # the fused kernels need unit stride along the feature dim, hence the copies (O(N*C), not O(N^2))
        q = self.query(x).flatten(2).transpose(1, 2).contiguous()  # [B, N, d]
        k = self.key(x).flatten(2).transpose(1, 2).contiguous()
        v = self.value(x).flatten(2).transpose(1, 2).contiguous()  # [B, N, C]
        o = self_attention(q, k, v, self.backend, self.head_width, CHUNK_ELEMS)
        o = self.gamma * o.transpose(1, 2).unflatten(2, (h, w))
        if not torch.jit.is_scripting():
            report_map(self, received_map, q, k, h, w)
        return x + o.to(x.dtype)  # the sum keeps x's memory format (o is channels_last-strided)


def received_map(q: torch.Tensor, k: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SAGAN's attention map: the attention each position receives, ``[B, h, w]``."""
    return received_attention(q.detach(), k.detach()).unflatten(1, (h, w))


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, head_width: int,
                   chunk_elems: int) -> torch.Tensor:
    """softmax(q k^T) v in float32, whatever autocast says, for q, k ``[B, N, d]``, v ``[B, N, C]``: on the fused
    kernels (``backend`` 'sdpa', or 'auto' on a GPU) or in chunks of ``chunk_elems`` scores per sample.

    Its path depends on the device and on N, so ``torch.fx`` keeps it a leaf of its graphs (it is
    ``torch.fx.wrap``-ped); TorchScript compiles the chunked path without its memory-light backward."""
    if torch.jit.is_scripting():
        return chunked_attention(q.float(), k.float(), v.float(), chunk_size(q.shape[1], chunk_elems))[0]
    else:  # noqa: RET505 (TorchScript compiles neither branch it does not take, only when both are branches)
        with float32_scores(q):
            q, k, v = q.float(), k.float(), v.float()
            if backend == "chunked" or (backend == "auto" and not q.is_cuda):
                return _chunked(q, k, v, chunk_size(q.shape[1], chunk_elems))
            return _sdpa(q, k, v, head_width)


torch.fx.wrap("self_attention")


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """The chunked path: with its memory-light backward when a gradient is wanted, plain ops otherwise
    (what a tracer such as ONNX's legacy exporter can read)."""
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                     or v.requires_grad)):
        return chunked_attention(q, k, v, chunk)[0]
    return ChunkedAttention.apply(q, k, v, chunk)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int) -> torch.Tensor:
    """The fused-kernel path: v in heads of width ``d``, q and k zero-padded to it and shared."""
    b, n, c = v.shape
    heads = -(-c // d)
    pad = heads * d - c
    if pad:
        v = F.pad(v, (0, pad))
    v = v.view(b, n, heads, d).transpose(1, 2)  # [B, heads, N, d]
    qh = F.pad(q, (0, d - q.shape[-1])).unsqueeze(1).expand(b, heads, n, d)
    kh = F.pad(k, (0, d - k.shape[-1])).unsqueeze(1).expand(b, heads, n, d)
    o = F.scaled_dot_product_attention(qh, kh, v, scale=1.0)  # the paper has no 1/sqrt(d)
    return o.transpose(1, 2).reshape(b, n, heads * d)[..., :c]


def naive_self_attention(m: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference formula with the full N x N matrix (the seed code): (output, received attention).

    For tests and benchmarks only: its memory grows with N^2.
    """
    b, c, h, w = x.shape
    q = m.query(x).flatten(2)  # [B, d, N]
    k = m.key(x).flatten(2)
    v = m.value(x).flatten(2)  # [B, C, N]
    beta = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, N(query), N(key)]
    o = (v @ beta.transpose(1, 2)).view(b, c, h, w)
    return m.gamma * o + x, beta.mean(1).view(b, h, w)
