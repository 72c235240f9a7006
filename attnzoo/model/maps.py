"""The one mechanism every attention module uses to report its attention map.

A module calls ``report_map(self, fn)`` in ``forward``, where ``fn`` is a zero-argument callable
returning its map: a tensor ``[B, h, w]`` (or ``[B, 1, h, w]``) for a gate, a list of them (one per
tap, in order) for a readout. Nothing is computed then: the host that wants maps has installed a
sink on the module and evaluates ``fn`` only when somebody asks (``model.attention_maps()``). With
no sink (nobody looking) the call is a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MapFn = Callable[[], Any]
_SINK = "_attnzoo_map_sink"


def report_map(module: nn.Module, fn: MapFn) -> None:
    """Called by a module in its forward; see the module docstring."""
    sink = module.__dict__.get(_SINK)
    if sink is not None:
        sink(fn)


class MapRecorder:
    """Keeps the latest map thunk of each watched module, and evaluates them on demand."""

    def __init__(self) -> None:
        self._thunks: dict[str, MapFn] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles hold no thunks: those are closures over the last forward's tensors."""
        return {"_thunks": {}}

    def watch(self, key: str, module: nn.Module) -> None:
        module.__dict__[_SINK] = _Sink(self, key)

    @staticmethod
    def unwatch(module: nn.Module) -> None:
        module.__dict__.pop(_SINK, None)

    def clear(self) -> None:
        self._thunks.clear()

    def evaluate(self) -> dict[str, Any]:
        with torch.no_grad():
            return {k: fn() for k, fn in self._thunks.items()}


class _Sink:
    """A plain object, not a closure, so ``copy.deepcopy`` of a model re-points it to the copy's recorder."""

    def __init__(self, recorder: MapRecorder, key: str) -> None:
        self.recorder, self.key = recorder, key

    def __call__(self, fn: MapFn) -> None:
        self.recorder._thunks[self.key] = fn


def as_spatial(m: torch.Tensor) -> torch.Tensor:
    """Normalise a reported map to ``[B, h, w]`` float (channels averaged when a module gives several)."""
    m = m.detach()
    if m.dim() == 4:
        m = m.mean(1)
    if m.dim() != 3:
        raise ValueError(f"an attention map must be [B, h, w] or [B, C, h, w], got shape {tuple(m.shape)}")
    return m.float()
