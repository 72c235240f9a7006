"""``show_attention``: what ``attnzoo show-attention`` does, one figure per image of where the model looks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import AttnzooError
from ..runs.folder import FIGURES
from ..runs.hub import is_name
from ..runs.predict import Run, load_run
from . import figures, trust
from .interpret import display_image


def show_attention(run: Run | str | Path, images: Sequence[str | Path], out: str | Path | None = None,
                   top: int = 3, threads: int | str | None = None) -> list[tuple[Path, list[tuple[str, float]], Path]]:
    """What ``attnzoo show-attention`` does: one PNG per image (the image, top predictions, every site's map).

    ``run``: a ``Run``, or a run folder or name (``hf-hub:org/name``, ``local-dir:PATH``), loaded once the images
    and ``out`` are known to be usable. ``out``: a ``.png`` file (one image) or a folder (default
    ``RUN/attention``; ``./attention`` for a run taken by name, which has no folder of its own to write into, as a
    Hub download lives in the Hub's cache). No file is written over:
    see ``outputs.per_image_outputs``. ``threads``: as ``fit``'s. Returns ``(image, top predictions, file
    written)`` per image."""
    from ..runs.folder import recorded_data_root
    from ..runs.outputs import existing_files, per_image_outputs, refuse_data_folder, refuse_inside_data
    from ..train.threads import use_threads

    if top < 1:
        raise AttnzooError(f"--top must be at least 1, got {top}")
    images = existing_files(images)
    if isinstance(run, Run):
        folder = Path(run.own_folder or ".")
    else:
        folder = Path("." if is_name(str(run)) else run)
    targets, fresh = per_image_outputs(images, out, folder / FIGURES)
    if out is not None:
        refuse_data_folder(out)
    use_threads(threads)
    if not isinstance(run, Run):
        run = load_run(run)
    if out is not None:
        refuse_inside_data(out, recorded_data_root(run.config))
    probs, maps = run.predict(images)
    maps = trust.ordered(maps, run.config.get("maps"))  # the map that carries the decision first, labelled
    tops = run.top(probs, top)
    written = []
    for i, (p, target) in enumerate(zip(images, targets)):
        fig = figures.attention_figure(display_image(run, p), {k: v[i].numpy() for k, v in maps.items()}, tops[i],
                                   title=f"{p.name}: {run.config.get('backbone')} + {run.config.get('attn')}")
        try:
            written.append((p, tops[i], figures.save_new_figure(fig, target, fresh=fresh)))
        except OSError as e:  # a read-only run folder, a full disk: somewhere else may do
            raise AttnzooError(f"cannot write {target}: {e.strerror or e}; choose another place with --out") from None
    return written
