"""Attention scores and their softmax in float32, whatever autocast says.

Under autocast (bf16 or fp16) matmuls run in the low precision: a dot product of large activations
overflows fp16 (max 65504) to inf and its softmax to NaN, and bf16 keeps 8 bits of mantissa for
scores whose differences decide the softmax. Every built-in module computes its scores and softmax
inside ``float32_scores(x)`` (a layer's input in its parameters' dtype, float32 under autocast; matmuls and
softmax on ``.float()`` tensors) and hands a result of its input's dtype back.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def float32_scores(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``x``'s device (a no-op where it is not on, and while ``torch.fx``
    traces: a traced graph has no device yet, and runs in the precision its caller sets)."""
    if isinstance(x, torch.fx.Proxy):
        return contextlib.nullcontext()
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
