"""``interpret_run``: what ``attnzoo interpret`` does. Plots and scores of a trained run: learning curves,
confusion matrix, top losses, attention grids with CAMs side by side, how well attention finds the object
(``explain.boxes``, ``explain.metrics``), how faithful it is (deletion curves, ROAD, the sanity check), and one
self-contained HTML report (``explain.report``).

``fit`` writes the basic plots into every run folder from a fastai ``Learner``; everything else works from a
``Run`` (``load_run``) or a bare model (``learn.model`` of a Learner), so a notebook can call it::

    run = load_run("runs/r")
    x = load_batch(run, paths)                       # normalised [B, 3, S, S]
    cam = gradcam(run, x)                            # [B, h, w] at the deepest site
    probs, maps = run.predict(x)
    curves = deletion_curves(run, x, labels, {**maps, "Grad-CAM": cam})
    result = interpret_run(run, out="report/")       # what `attnzoo interpret` does
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..errors import AttnzooError
from ..runs.folder import CONFIG, PLOTS, REPORT, RunFolder
from ..runs.hub import is_name
from ..runs.predict import Run, load_run
from ..train.demo import demo_root
from . import figures, metrics, trust
from .boxes import BOXES_FILE, has_boxes, load_boxes
from .cams import (
    Progress,
    cam,
    cam_label,
    cam_layer,
    cam_methods,
    deletion_curves,
    gradcam,
    perturbation_curves,
    randomized_model,
    road_scores,
)
from .charts import confusion_figure, curves_figure, history_figure, localization_figure
from .metrics import confusion_matrix, most_confused
from .report import Interpretation, score_table, write_report

__all__ = [
    "attention_rows", "cam_specs", "deletion_curves", "display_image", "fit_plots", "gradcam", "interpret_run",
    "load_batch", "sample_valid", "validation_set",
]
BOX_COLOR = (255, 255, 255)


def display_image(run: Run, path: str | Path, boxes: metrics.ImageBoxes | None = None) -> np.ndarray:
    """The image as the model sees it (squashed to the training size), for plotting; ``boxes`` outlined."""
    im = run.load_image(path).resize((run.img_size, run.img_size), Image.Resampling.BILINEAR)
    for x0, y0, x1, y1 in boxes.boxes if boxes is not None else ():
        ImageDraw.Draw(im).rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), outline=BOX_COLOR)
    return np.asarray(im)


def load_batch(run: Run, paths: Sequence[str | Path]) -> torch.Tensor:
    """Images as the model's normalised input ``[B, 3, S, S]``."""
    return torch.stack([run.preprocess(run.load_image(p)) for p in paths])


def sample_valid(items: Sequence[Path], n: int, seed: int = 0) -> list[Path]:
    """Up to ``n`` validation items, spread over the classes."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Path]] = {}
    for p in items:
        by_class.setdefault(Path(p).parent.name, []).append(Path(p))
    for v in by_class.values():
        rng.shuffle(v)
    out: list[Path] = []
    while len(out) < n and any(by_class.values()):
        for k in sorted(by_class):
            if by_class[k] and len(out) < n:
                out.append(by_class[k].pop())
    return out


def fit_plots(learn: Any, run: Run, out: str | Path, rows: Sequence[dict[str, float]], n: int = 6) -> list[Path]:
    """history.png, confusion_matrix.png, top_losses.png and attention.png into ``out``, from the Learner's
    validation loader (as fastai's ``ClassificationInterpretation`` reads it, without calling its callbacks)."""
    from fastai.torch_core import get_model

    out = Path(out)
    model = get_model(learn.model).eval()
    with torch.no_grad():
        outputs = [(model(x).float(), y) for x, y in trust.valid_batches(learn)]
    logits, targets = torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])
    cm = confusion_matrix(targets.tolist(), logits.argmax(-1).tolist(), len(run.classes))
    written = list(_basic_plots(run, cm, out, rows).values())
    items = [Path(p) for p in learn.dls.valid.items]
    losses, idx = torch.nn.functional.cross_entropy(logits, targets, reduction="none").topk(min(n, len(items)))
    top_paths = [items[i] for i in idx.tolist()]
    labels = [p.parent.name for p in top_paths]
    title = "top losses: " + ", ".join(f"{v:.2f}" for v in losses.tolist())
    written.append(figures.save_figure(attention_rows(run, top_paths, labels, title), out / PLOTS["top_losses"]))
    sample = sample_valid(items, n)
    written.append(figures.save_figure(
        attention_rows(run, sample, [p.parent.name for p in sample],
                       f"{run.config.get('backbone')} + {run.config.get('attn')}: validation images"),
        out / PLOTS["attention"]))
    return written


# --------------------------------------------------------------------------- a whole run


def validation_set(run: Run, data: str | Path | None = None) -> Any:
    """The run's validation split (``DatasetInfo``): from ``data`` or the data root recorded in the run, split
    with the run's seed and validation share, as in training."""
    from ..train.data import find_dataset, resolve_data

    recorded = run.config.get("data") or {}
    root = data_root(run, data)
    seed = int(run.config.get("seed", 0))
    counts = recorded.get("counts") or {}
    n_valid, n_train = (sum((counts.get(s) or {}).values()) for s in ("valid", "train"))
    valid_pct = n_valid / (n_valid + n_train) if n_valid and n_train else 0.2
    try:
        info = find_dataset(resolve_data(str(root), seed), valid_pct=valid_pct, seed=seed)
    except AttnzooError as e:
        if data is None:
            raise AttnzooError(f"{e} (the data folder recorded in the run; pass --data DIR)") from None
        raise
    unknown = sorted(set(info.classes) - set(run.classes))
    if unknown:
        raise AttnzooError(f"{info.root} has classes the run does not know: {', '.join(unknown)} "
                           f"(the run's: {', '.join(run.classes)})")
    if not info.valid:
        raise AttnzooError(f"no validation images in {info.root}")
    if data is None and recorded.get("fingerprint") not in (None, info.fingerprint()):
        raise AttnzooError(f"the data in {info.root} is not what the run was trained on (files were added, removed, "
                           f"changed or moved between classes since): its scores would not be the run's; pass "
                           f"--data DIR to score that data on purpose")
    return info


def data_root(run: Run, data: str | Path | None = None) -> str:
    """The data folder to score: ``data``, else the one the run records. A run that recorded a relative folder
    (attnzoo < 0.2) cannot say relative to what: never guessed from the current folder."""
    if data is not None:
        return str(data)
    root = (run.config.get("data") or {}).get("root")
    if root is None:
        raise AttnzooError("the run records no data folder; pass --data DIR")
    if root != "demo" and not Path(root).is_absolute() and str(root) != str(demo_root()):
        raise AttnzooError(f"the run records its data folder as '{root}', relative to the folder it was trained "
                           f"in, which it does not record; pass --data DIR")
    return str(root)


def _noop(_task: str, _done: int, _total: int) -> None:
    return None


def _predict_all(run: Run, paths: Sequence[Path], bs: int, progress: Progress) -> tuple[torch.Tensor, dict]:
    probs, maps = [], {}
    for start in range(0, len(paths), bs):
        progress("predict", start, len(paths))
        p, m = run.predict(paths[start : start + bs], bs=bs)
        probs.append(p)
        for k, v in m.items():
            maps.setdefault(k, []).append(v)
    progress("predict", len(paths), len(paths))
    return torch.cat(probs), {k: torch.cat(v) for k, v in maps.items()}


def cam_specs(model: nn.Module, methods: str | Sequence[str] = "gradcam", at: str = "final",
              img_size: int | None = None) -> dict[str, tuple[str, str]]:
    """``{label: (method, layer)}`` of the CAMs ``interpret`` computes: each method at the final feature level
    (``at="final"``, see ``explain.cam_layer``) or at each of the model's sites (``at="sites"``)."""
    if at not in ("final", "sites"):
        raise AttnzooError(f"--cam-at must be 'final' or 'sites', got {at!r}")
    where = list(getattr(model, "sites", [])) if at == "sites" else [cam_layer(model, img_size)]
    if not where:
        raise AttnzooError("--cam-at sites: the model has no attention sites (a baseline); use --cam-at final")
    return {cam_label(m, layer): (m, layer) for m in cam_methods(methods) for layer in where}


def _cams(model: nn.Module, x: torch.Tensor, target: torch.Tensor, specs: Mapping[str, tuple[str, str]],
          bs: int, progress: Progress) -> dict[str, torch.Tensor]:
    """Every CAM of ``specs`` on ``x``: one batched pass per method and layer."""
    out = {}
    for j, (label, (method, layer)) in enumerate(specs.items()):
        progress(f"CAMs ({label})", j, len(specs))
        out[label] = cam(model, x, target, method, layer, bs)
    progress("CAMs", len(specs), len(specs))
    return out


def attention_rows(run: Run, paths: Sequence[str | Path], labels: Sequence[str], title: str,
                   cams: Mapping[str, tuple[str, str]] | None = None,
                   boxes: Sequence[metrics.ImageBoxes | None] | None = None) -> Any:
    """Paper-Figure-3 grid for ``paths``: image, then every site's map (and the ``cams`` for the predicted
    class); right/wrong marked. ``boxes`` (in model-input pixels) are outlined on the image."""
    probs, maps = run.predict(list(paths))
    maps = trust.ordered(maps, run.config.get("maps"))  # the map that carries the decision first, labelled
    if cams:
        maps.update(_cams(run.model, load_batch(run, paths), probs.argmax(-1), cams, len(paths), _noop))
    top = run.top(probs, 1)
    boxes = boxes if boxes is not None else [None] * len(paths)
    images = [display_image(run, p, b) for p, b in zip(paths, boxes)]
    preds = [t[0][0] for t in top]
    conf = [t[0][1] for t in top]
    return figures.attention_grid(images, {k: v.numpy() for k, v in maps.items()}, list(labels), preds, conf,
                              title=title, max_rows=len(paths))


def _finest(maps: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The largest map size, for the random baseline's maps."""
    return max((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])


def _sanity(run: Run, x: torch.Tensor, target: torch.Tensor, maps: Mapping[str, torch.Tensor],
            specs: Mapping[str, tuple[str, str]], seed: int, bs: int, progress: Progress) -> dict[str, float]:
    """Each map's rank correlation with the same map of the model re-initialised from the head down."""
    progress("sanity check", 0, 1)
    randomized = randomized_model(run.model, seed)
    after: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(x), bs):
            randomized(x[start : start + bs].to(next(randomized.parameters()).device))
            for k, v in randomized.attention_maps().items():
                after.setdefault(k, []).append(v.cpu())
    random_maps = {k: torch.cat(v) for k, v in after.items()}
    random_maps.update(_cams(randomized, x, target, specs, bs, progress))
    progress("sanity check", 1, 1)
    return {k: metrics.rank_correlation(maps[k], random_maps[k]) for k in maps if k in random_maps}


def _check_counts(n: int, deletion_images: int, steps: int, road_images: int, sanity_images: int,
                  tolerance: float) -> None:
    """Refuse, before any work, a count that leaves nothing to plot or score."""
    for name, value in (("deletion_images", deletion_images), ("steps", steps), ("n", n)):
        if value < 1:
            raise AttnzooError(f"{name} must be at least 1, got {value}")
    if road_images < 0 or sanity_images < 0 or not tolerance >= 0:
        raise AttnzooError("road_images, sanity_images and tolerance must not be negative")


def _output_folder(run: Run, out: str | Path | None, data: str | Path | None) -> Path:
    """Where ``interpret_run`` writes: ``out`` (new or empty, not where data is), or the run folder by default
    (when it can be written in)."""
    from ..runs.outputs import check_new_folder, check_writable, refuse_data_folder

    own = run.own_folder
    if out is None or (own is not None and Path(out).resolve() == Path(own).resolve()):
        check_writable(Path(own), "the run folder", hint="; pass --out DIR for the plots and report")
        return Path(own)
    check_new_folder(out)  # the run folder is attnzoo's own; any other holds nothing of the user's
    refuse_data_folder(out, data_root(run, data))
    return Path(out)


def _basic_plots(run: Run, cm: np.ndarray, out: Path, rows: Sequence[dict[str, float]] | None = None
                 ) -> dict[str, Path]:
    """The learning curves (``rows``, default those recorded in the run), when there are any, and the confusion
    matrix."""
    files = {}
    rows = rows if rows is not None else (run.config.get("metrics") or {}).get("per_epoch") or []
    if rows:
        files["history"] = figures.save_figure(history_figure(rows), out / PLOTS["history"])
    files["confusion"] = figures.save_figure(confusion_figure(cm, run.classes), out / PLOTS["confusion"])
    return files


def _localization(maps: Mapping[str, torch.Tensor], kinds: Mapping[str, str],
                  boxes: Sequence[metrics.ImageBoxes | None], keep: Sequence[int], root: str | Path, img_size: int,
                  tolerance: float, seed: int, progress: Progress) -> dict[str, Any]:
    """How well each map, a random map and chance find the boxed objects, on the images ``keep`` that have a
    box: what attnzoo.json records under ``localization``."""
    kept = [boxes[i] for i in keep]
    scored = {name: m[keep] for name, m in maps.items()}
    scored["random"] = metrics.random_maps(len(keep), _finest(scored), seed)
    progress("localisation", 0, 1)
    scores = metrics.score_maps(scored, kept, img_size, tolerance)
    scores["chance"] = {**metrics.random_baseline(kept, img_size, tolerance), "images": len(keep)}
    return dict(
        images=len(keep), split="valid", boxes=str(Path(root) / BOXES_FILE),
        tolerance=tolerance, iou_threshold=0.5, scores={k: {"kind": kinds[k], **v} for k, v in scores.items()},
    )


def _example_figures(run: Run, paths: Sequence[Path], labels: torch.Tensor, probs: torch.Tensor,
                     boxes: Sequence[metrics.ImageBoxes | None], specs: Mapping[str, tuple[str, str]], n: int,
                     seed: int, out: Path, progress: Progress) -> dict[str, Path]:
    """The attention grids with the CAMs: ``n`` images spread over the classes, and the ``n`` the model gets
    most wrong (highest loss)."""
    progress("figures", 0, 2)
    boxes_of = dict(zip(paths, boxes))
    sample = sample_valid(paths, n, seed)
    title = f"{run.config.get('backbone')} + {run.config.get('attn')}: where it looks"
    files = {"attention": figures.save_figure(
        attention_rows(run, sample, [p.parent.name for p in sample], title, cams=specs,
                       boxes=[boxes_of[p] for p in sample]), out / PLOTS["attention_cams"])}
    progress("figures", 1, 2)
    losses = -probs[torch.arange(len(paths)), labels].clamp_min(1e-12).log()
    top = losses.topk(min(n, len(paths))).indices.tolist()
    files["top_losses"] = figures.save_figure(
        attention_rows(run, [paths[i] for i in top], [paths[i].parent.name for i in top],
                       "top losses: " + ", ".join(f"{losses[i]:.2f}" for i in top), cams=specs,
                       boxes=[boxes[i] for i in top]), out / PLOTS["top_losses"])
    return files


def _faithfulness(run: Run, x: torch.Tensor, target: torch.Tensor, maps: Mapping[str, torch.Tensor],
                  kinds: Mapping[str, str], specs: Mapping[str, tuple[str, str]], steps: int, seed: int, bs: int,
                  road_images: int, sanity_images: int,
                  progress: Progress) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Whether the prediction on ``x`` rests on the pixels each map (and a random map) ranks high: deletion and
    insertion curves, ROAD, and the sanity check. Returns what attnzoo.json records under ``faithfulness``, and
    the curves ``{mode: {map: curve}}`` to plot."""
    del_maps = {**maps, "random": metrics.random_maps(len(x), _finest(maps), seed)}
    curves = {mode: perturbation_curves(run, x, target, del_maps, mode, steps, seed=seed, progress=progress)
              for mode in ("deletion", "insertion")}
    road = road_scores(run, x[:road_images], target[:road_images], {k: v[:road_images] for k, v in del_maps.items()},
                       seed=seed, progress=progress) if road_images else {}
    sanity = _sanity(run, x[:sanity_images], target[:sanity_images],
                     {k: v[:sanity_images] for k, v in del_maps.items() if k != "random"}, specs, seed, bs,
                     progress) if sanity_images else {}
    faithfulness = dict(
        images=len(x), steps=steps, fill="0 in normalised space (the normalisation mean colour)",
        auc={k: metrics.curve_auc(c) for k, c in curves["deletion"].items()},
        insertion_auc={k: metrics.curve_auc(c) for k, c in curves["insertion"].items()},
        curves={k: c.round(5).tolist() for k, c in curves["deletion"].items()},
        insertion_curves={k: c.round(5).tolist() for k, c in curves["insertion"].items()},
        road=dict(images=min(road_images, len(x)), percentiles=[20, 40, 60, 80], scores=road),
        sanity=dict(images=min(sanity_images, len(x)), randomized="every weight, from the head down",
                    rank_correlation=sanity),
        kinds={k: kinds[k] for k in del_maps},
    )
    return faithfulness, curves


def _save_scores(run: Run, localization: dict[str, Any] | None, faithfulness: dict[str, Any],
                 notes: list[str]) -> None:
    """The scores into the run's attnzoo.json, when the run has one, for ``compare`` and later reports; a run
    folder that cannot be written (read-only) keeps them out, and ``notes`` says so."""
    own = run.own_folder
    if own is not None and (Path(own) / CONFIG).is_file():
        entries: dict[str, Any] = {"faithfulness": faithfulness}
        if localization is not None:
            entries["localization"] = localization
        try:
            run.config = RunFolder(own).update(**entries)
        except OSError as e:
            notes.append(f"the scores are not saved in {Path(own) / CONFIG} ({e.strerror or e}): they are in "
                         f"the report and in --json")


def _writable_run(run: Run | str | Path, data: str | Path | None, out: str | Path | None) -> Run:
    """The run, loaded when given by folder or name, once it is known where its outputs go: a run taken by name
    needs ``out`` and ``data`` (checked before a download)."""
    if not isinstance(run, Run):
        if is_name(str(run)) and (out is None or data is None):
            raise AttnzooError(f"{run} is a model repo, not a run folder of yours: pass --data DIR (its images) and "
                               f"--out DIR (a new folder for the plots and report)")
        run = load_run(run)
    if run.own_folder is None and out is None:
        raise AttnzooError(f"{run.source or 'the run'} has no run folder of its own to write into; pass --out DIR")
    return run


def interpret_run(run: Run | str | Path, data: str | Path | None = None, out: str | Path | None = None,
                  n: int = 6, deletion_images: int = 100, steps: int = 10, seed: int = 0, bs: int = 32,
                  cams: str | Sequence[str] = "gradcam", cam_at: str = "final", tolerance: float = 15.0,
                  road_images: int = 16, sanity_images: int = 32, progress: Progress | None = None) -> Interpretation:
    """What ``attnzoo interpret`` does, on the run's validation images. Writes into ``out`` (default: the run
    folder) the attention grid with the CAMs, top losses, confusion matrix, deletion and insertion curves,
    localisation scores (when ``boxes.csv`` is at the data root) and ``report.html``; saves the scores into the
    run's attnzoo.json (``localization``, ``faithfulness``).

    ``cams``: pytorch-grad-cam methods (``explain.CAM_METHODS``) at the final feature level or, ``cam_at="sites"``,
    at each attention site; computed for the true class. ``tolerance``: of the pointing game, in original-image
    pixels. Deletion and insertion curves use ``deletion_images`` images spread over the classes; ROAD and the
    sanity check (model-parameter randomisation) the first ``road_images`` and ``sanity_images`` of them.
    ``run``: a ``Run``, a run folder, or a name (``hf-hub:``, ``local-dir:``: needs ``out`` and ``data``).
    """
    progress = progress or _noop
    run = _writable_run(run, data, out)
    _check_counts(n, deletion_images, steps, road_images, sanity_images, tolerance)
    specs = cam_specs(run.model, cams, cam_at, run.img_size)
    out = _output_folder(run, out, data)
    info = validation_set(run, data)
    notes: list[str] = []
    paths = list(info.valid)
    index = {p: i for i, p in enumerate(paths)}
    labels = torch.tensor([run.classes.index(p.parent.name) for p in paths])
    probs, maps = _predict_all(run, paths, bs, progress)
    preds = probs.argmax(-1)
    kinds = {k: "gate" if run.model.kind == "gate" else "tap" for k in maps}
    cm = confusion_matrix(labels.tolist(), preds.tolist(), len(run.classes))
    files = _basic_plots(run, cm, out)

    boxes: list[metrics.ImageBoxes | None] = [None] * len(paths)
    boxed = has_boxes(info.root)
    if boxed:
        progress("boxes", 0, 1)
        boxes = load_boxes(info.root, paths, run.img_size, notes)
    keep = [i for i, b in enumerate(boxes) if b is not None]  # scored for localisation
    chosen = [index[p] for p in sample_valid(paths, deletion_images, seed)]  # for the curves, ROAD, sanity
    need = sorted(set(keep) | set(chosen))
    x_need = load_batch(run, [paths[i] for i in need])
    for label, m in _cams(run.model, x_need, labels[need], specs, bs, progress).items():  # the true class
        maps[label] = torch.zeros(len(paths), *m.shape[1:])  # only the rows in `need` are used
        maps[label][need] = m
        kinds[label] = "cam"
    kinds.update(random="random", chance="chance")

    localization = None
    if keep:
        localization = _localization(maps, kinds, boxes, keep, info.root, run.img_size, tolerance, seed, progress)
        files["localization"] = figures.save_figure(localization_figure(localization), out / PLOTS["localization"])
    files.update(_example_figures(run, paths, labels, probs, boxes, specs, n, seed, out, progress))

    x = x_need[[need.index(i) for i in chosen]]
    faithfulness, curves = _faithfulness(run, x, labels[chosen], {name: m[chosen] for name, m in maps.items()}, kinds,
                                         specs, steps, seed, bs, road_images, sanity_images, progress)
    for mode in ("deletion", "insertion"):
        files[mode] = figures.save_figure(
            curves_figure(curves[mode], mode, f"{mode} curves ({len(chosen)} validation images)"), out / PLOTS[mode])

    if not boxed:
        notes.append(f"no {BOXES_FILE} at the data root {info.root}: localisation not scored")
    _save_scores(run, localization, faithfulness, notes)
    result = Interpretation(out, len(paths), float((preds == labels).float().mean()),
                            most_confused(cm, run.classes), localization, faithfulness, files,
                            score_table(localization, faithfulness), notes)
    files["report"] = write_report(run, result, out / REPORT)
    return result


# --------------------------------------------------------------------------- compare runs
