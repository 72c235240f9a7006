"""``show_attention``: what ``attnzoo show-attention`` does, one figure per image of where the model looks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import AttnzooError
from ..runs.folder import FIGURES
from ..runs.predict import Run, load_run
from . import figures, trust
from .interpret import display_image


def show_attention(run: Run | str | Path, images: Sequence[str | Path], out: str | Path | None = None,
                   top: int = 3, threads: int | str | None = None) -> list[tuple[Path, list[tuple[str, float]], Path]]:
    """What ``attnzoo show-attention`` does: one PNG per image (the image, top predictions, every site's map).

    ``run``: a ``Run``, or a run folder, loaded once the images and ``out`` are known to be usable.
    ``out``: a ``.png`` file (one image) or a folder (default ``RUN/attention``). No file is written over:
    see ``outputs.per_image_outputs``. ``threads``: as ``fit``'s. Returns ``(image, top predictions, file
    written)`` per image."""
    from ..runs.outputs import existing_files, per_image_outputs, refuse_data_folder
    from ..train.threads import use_threads

    if top < 1:
        raise AttnzooError(f"--top must be at least 1, got {top}")
    images = existing_files(images)
    folder = Path(run.path or ".") if isinstance(run, Run) else Path(run)
    targets, fresh = per_image_outputs(images, out, folder / FIGURES)
    if out is not None:
        refuse_data_folder(out)
    use_threads(threads)
    if not isinstance(run, Run):
        run = load_run(folder)
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
