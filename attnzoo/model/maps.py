"""The one mechanism every attention module uses to report its attention map.

A module calls ``report_map`` in ``forward`` with its map: a tensor ``[B, h, w]`` (or ``[B, C, h, w]``,
channels averaged) for a gate, a list of them (one per tap, in order) for a readout. Three ways to say it:

- ``report_map(self, m)``: the map itself, when the forward has it anyway (a mask, a softmax);
- ``report_map(self, fn, *args)``: ``fn(*args)`` is the map, computed only when somebody asks: ``fn`` a
  module-level function (or a static method), ``args`` the forward's tensors it needs. Nothing is computed and
  nothing is captured but ``args``;
- ``report_map(self, fn)`` with a zero-argument ``fn`` (often a lambda): attnzoo's first style, still supported.

Nothing is computed then: the host that wants maps has installed a sink on the module and evaluates the map
only when somebody asks (``model.attention_maps()``). With no sink (nobody looking) the call is a dictionary
lookup. While ``torch.fx`` traces a model the call does nothing: a traced graph has no side channel, so fx and
the TorchScript built from it (see ``AttentionModel.__prepare_scriptable__``) report no maps.

TorchScript cannot parse a lambda, nor call ``report_map`` (a Python function of a module). A module traced by
fx needs neither. A module fx cannot trace, registered with timm's ``register_notrace_module``, is scripted as it
is: it calls ``report_map`` under ``if not torch.jit.is_scripting():`` in one of the two lambda-free styles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_SINK = "_attnzoo_map_sink"

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # torch < 2.3: the same flag, without excluding torch.export (which attnzoo does not run here)
    from torch.fx._symbolic_trace import _get_is_fx_tracing as _fx_tracing


def fx_tracing() -> bool:
    """True while ``torch.fx`` symbolically traces (not under ``torch.compile`` or ``torch.export``)."""
    return _fx_tracing()


def report_map(module: nn.Module, map_or_fn: Any, *args: Any) -> None:
    """Called by a module in its forward; see the module docstring."""
    sink = module.__dict__.get(_SINK)
    if sink is not None and not fx_tracing():
        sink(map_or_fn, args)


def _evaluate(map_or_fn: Any, args: tuple[Any, ...]) -> Any:
    return map_or_fn(*args) if callable(map_or_fn) else map_or_fn


class MapRecorder:
    """Keeps the latest map (or how to compute it) of each watched module, and evaluates them on demand."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[Any, tuple[Any, ...]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles hold no reports: those are the last forward's tensors."""
        return {"_reports": {}}

    def watch(self, key: str, module: nn.Module) -> None:
        module.__dict__[_SINK] = _Sink(self, key)

    @staticmethod
    def unwatch(module: nn.Module) -> None:
        module.__dict__.pop(_SINK, None)

    def clear(self) -> None:
        self._reports.clear()

    def evaluate(self) -> dict[str, Any]:
        with torch.no_grad():
            return {k: _evaluate(*report) for k, report in self._reports.items()}


class _Sink:
    """A plain object, not a closure, so ``copy.deepcopy`` of a model re-points it to the copy's recorder."""

    def __init__(self, recorder: MapRecorder, key: str) -> None:
        self.recorder, self.key = recorder, key

    def __call__(self, map_or_fn: Any, args: tuple[Any, ...]) -> None:
        self.recorder._reports[self.key] = (map_or_fn, args)



def as_spatial(m: torch.Tensor) -> torch.Tensor:
    """Normalise a reported map to ``[B, h, w]`` float (channels averaged when a module gives several)."""
    m = m.detach()
    if m.dim() == 4:
        m = m.mean(1)
    if m.dim() != 3:
        raise ValueError(f"an attention map must be [B, h, w] or [B, C, h, w], got shape {tuple(m.shape)}")
    return m.float()
