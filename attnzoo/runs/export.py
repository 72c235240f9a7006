"""Export a trained model for deployment: ONNX (dynamo exporter) or a ``torch.export`` program (``.pt2``); or a
run's Hub face (``hub``: ``config.json`` and the model card, see ``runs.hub``).

    attnzoo export runs/my-run                   # -> my-run.onnx: logits + one attention map per site
    attnzoo.export(load_run("runs/my-run"), "model.pt2", format="pt2", maps=False)
    attnzoo export runs/my-run --format hub      # an older run becomes a Hub model repo (push it, or share it)

The exported graph has a dynamic batch. Its outputs are ``logits`` (``[B, classes]``) and, with ``maps``,
``map:<site>`` (``[B, h, w]``, float32) for every site, the maps ``attention_maps()`` gives. Before a file
is written, the export is run on inputs of other batch sizes than the one it was traced with (onnxruntime
for ONNX, the reloaded program for pt2) and compared with PyTorch; an export whose outputs differ by more
than the tolerance is refused. The classes and the preprocessing (input size, mean/std, squash resize)
travel in the file: ONNX metadata properties, or ``attnzoo.json`` among the pt2 archive's extra files.
A file is never written over (``attnzoo.runs.outputs``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AttnzooError
from ..model.create import AttentionModel
from .folder import CONFIG
from .outputs import check_new_file, write_new

log = logging.getLogger("attnzoo")

Format = Literal["onnx", "pt2", "hub"]
#: batch sizes the export is checked at (it is traced at ``TRACE_BATCH``)
CHECK_BATCHES = (1, 3)
TRACE_BATCH = 2
ATOL, RTOL = 1e-4, 1e-3


class WithMaps(nn.Module):
    """``model`` whose outputs are ``(logits, map of each site...)``: an exportable forward, no side channel."""

    def __init__(self, model: AttentionModel, maps: bool = True):
        super().__init__()
        self.model = model
        self.maps = maps and bool(model.sites)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)
        if not self.maps:
            return (logits,)
        maps = self.model.attention_maps()
        return (logits, *(maps[s] for s in self.model.sites))

    def output_names(self) -> list[str]:
        return ["logits", *(f"map:{s}" for s in self.model.sites if self.maps)]


@dataclass
class Exported:
    """What ``export`` wrote and how it was checked."""

    path: Path
    format: str
    outputs: list[str]
    max_diff: float  # largest |export - PyTorch| over every output and checked batch
    batches: tuple[int, ...]
    metadata: dict[str, str] = field(default_factory=dict)


def _model_and_meta(run_or_model: Any) -> tuple[AttentionModel, dict[str, str], str]:
    from .predict import Run, load_run

    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = load_run(run_or_model)
    if isinstance(run_or_model, Run):
        run = run_or_model
        model, name = run.model, run.name
        cfg = {"classes": run.classes, "img_size": run.img_size, "mean": list(run.mean), "std": list(run.std)}
    elif isinstance(run_or_model, AttentionModel):
        model, name = run_or_model, f"{run_or_model.backbone_name}-{run_or_model.attn}"
        pc = model.pretrained_cfg
        cfg = {"classes": pc.get("label_names"), "img_size": int(pc["input_size"][-1]),
               "mean": list(pc.get("mean", ())), "std": list(pc.get("std", ()))}
    else:
        raise AttnzooError(f"export needs a run (folder or load_run) or an attnzoo model, not {type(run_or_model)}")
    channels = model.in_chans  # the input the model takes (a run's mean/std have as many values)
    image = f"image: [B, {channels}, img_size, img_size], {'grey' if channels == 1 else 'RGB'} in [0, 1]"
    meta = {**{k: json.dumps(v) for k, v in cfg.items()},
            "resize": "squash (bilinear, no crop)", "input": f"{image}, normalised with mean/std",
            "backbone": model.backbone_name, "attn": model.attn, "sites": json.dumps(model.sites),
            "producer": "attnzoo"}
    return model, meta, name


def export(run_or_model: Any, path: str | os.PathLike | None = None, format: Format = "onnx", maps: bool = True,
           atol: float = ATOL, rtol: float = RTOL, threads: int | str | None = None) -> Exported:
    """Export a run (folder, ``Run``, a ``hf-hub:``/``local-dir:`` name) or an ``AttentionModel`` to ``path``
    (default ``<run name>.<format>``, moving on to ``-2``... when taken; a ``path`` given that exists is an
    error). ``format="hub"``: the Hub face of a run folder, written into it, or with ``path`` into a new folder
    holding only the Hub files. ``threads``: as ``fit``'s. See the module docstring."""
    from ..train.threads import use_threads

    if format not in ("onnx", "pt2", "hub"):
        raise AttnzooError(f"format must be onnx, pt2 or hub, got '{format}'")
    if format == "hub":
        from .hub import export_face

        if not isinstance(run_or_model, (str, os.PathLike)):
            raise AttnzooError("format='hub' takes a run folder")
        folder, files = export_face(run_or_model, path)
        return Exported(folder, format, files, 0.0, ())
    if path is not None:
        check_new_file(path, "export file")
    use_threads(threads)
    model, meta, name = _model_and_meta(run_or_model)
    target = Path(path) if path is not None else Path(f"{name}.{format}")
    was_training = model.training
    model.eval().capture_maps(True)
    wrapper = WithMaps(model, maps).eval()
    size = json.loads(meta["img_size"])
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    channels = model.in_chans
    example = torch.randn(TRACE_BATCH, channels, size, size, generator=gen).to(device)
    checks = [torch.randn(b, channels, size, size, generator=gen).to(device) for b in CHECK_BATCHES]
    try:
        with torch.no_grad():
            expected = [[t.cpu().numpy() for t in wrapper(x)] for x in checks]
        writer = _onnx if format == "onnx" else _pt2
        result: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            result["diff"] = writer(wrapper, example, checks, expected, tmp, meta, atol, rtol)

        written = write_new(target, write, fresh=path is None)
    finally:
        model.train(was_training)
    log.info("exported %s (%s): outputs %s; max |difference| from PyTorch %.2e at batch sizes %s", written, format,
             ", ".join(wrapper.output_names()), result["diff"], ", ".join(map(str, CHECK_BATCHES)))
    return Exported(written, format, wrapper.output_names(), result["diff"], CHECK_BATCHES, meta)


def _compare(got: list[Any], want: list[Any], names: list[str], batch: int, atol: float, rtol: float) -> float:
    import numpy as np

    worst = 0.0
    for g, w, name in zip(got, want, names):
        g = np.asarray(g, dtype=np.float64)
        if g.shape != w.shape:
            raise AttnzooError(f"export check failed: output '{name}' has shape {g.shape} at batch {batch}, "
                               f"PyTorch gives {w.shape}")
        diff = float(np.abs(g - w).max()) if g.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(g, w, atol=atol, rtol=rtol):
            raise AttnzooError(f"export check failed: output '{name}' differs from PyTorch by {diff:.2e} at batch "
                               f"{batch} (tolerance {atol:g} + {rtol:g} x |value|); nothing written")
    return worst


def _dynamic_batch() -> dict[str, Any]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}


def _onnx(wrapper: WithMaps, example: torch.Tensor, checks: list[torch.Tensor], expected: list[list[Any]],
          tmp: Path, meta: dict[str, str], atol: float, rtol: float) -> float:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise AttnzooError(f"ONNX export needs onnx, onnxruntime and onnxscript: pip install 'attnzoo[export]' "
                           f"({e.name} is missing)") from None
    names = wrapper.output_names()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["image"], output_names=names,
                                    dynamic_shapes=_dynamic_batch(), verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(tmp))
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x, want in zip(checks, expected):
        got = session.run(None, {"image": x.cpu().numpy()})
        worst = max(worst, _compare(got, want, names, x.shape[0], atol, rtol))
    return worst


def _pt2(wrapper: WithMaps, example: torch.Tensor, checks: list[torch.Tensor], expected: list[list[Any]],
         tmp: Path, meta: dict[str, str], atol: float, rtol: float) -> float:
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=_dynamic_batch())
    # through a buffer: torch warns about (and refuses to load) any file whose name does not end in .pt2
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={CONFIG: json.dumps(meta)})
    tmp.write_bytes(buffer.getvalue())
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
    worst = 0.0
    with torch.no_grad():
        for x, want in zip(checks, expected):
            got = [t.cpu().numpy() for t in loaded(x)]
            worst = max(worst, _compare(got, want, wrapper.output_names(), x.shape[0], atol, rtol))
    return worst
