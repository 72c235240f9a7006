"""``report.html``: one self-contained page explaining a run to someone who did not train it."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runs.folder import CONFIG
from ..runs.outputs import replace, strict_json
from ..runs.predict import Run
from .metrics import flags
from .page import facts_table, figure, page
from .page import table as html_table


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{round(v, digits) + 0.0:.{digits}f}"
    return str(v)


def _epochs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch history a run's config records (none for a run saved without one)."""
    return (config.get("metrics") or {}).get("per_epoch") or []


def time_per_epoch(config: Mapping[str, Any]) -> float:
    """Mean seconds per epoch recorded in a run's config (NaN when none)."""
    times = [r["time"] for r in _epochs(config) if "time" in r]
    return float(np.mean(times)) if times else float("nan")




@dataclass(frozen=True)
class Column:
    """A score of the table: its key, its header, whether higher is better, and what it measures."""

    key: str
    label: str
    higher: bool
    what: str


COLUMNS = (
    Column("pointing", "pointing game", True, "share of images whose map peaks inside a box"),
    Column("pointing_tolerance", "pointing ±tol", True, "the same, a peak within the tolerance of a box hits"),
    Column("energy", "energy in box", True, "share of the map's mass inside the boxes (Score-CAM's energy game)"),
    Column("iou", "IoU@0.5", True, "IoU of the map above half its range with the boxes"),
    Column("max_box_acc", "MaxBoxAcc", True, "best threshold's share of images whose map box has IoU >= 0.5"),
    Column("deletion", "deletion AUC", False, "true-class probability as top pixels are deleted"),
    Column("insertion", "insertion AUC", True, "true-class probability as top pixels are inserted"),
    Column("road", "ROAD", True, "remove-and-debias: (LeRF - MoRF) / 2 probability drop"),
    Column("sanity", "sanity ρ", False, "Spearman correlation with the map of the re-initialised model"),
)
BASELINES = ("random", "chance")


def score_table(localization: Mapping[str, Any] | None, faithfulness: Mapping[str, Any] | None,
                insensitive_at: float = 0.5, inverted_below: float = 0.5) -> dict[str, dict[str, Any]]:
    """Every map against every score (``COLUMNS``), with its kind and its flags (``metrics.flags``), from what
    ``interpret_run`` saves into attnzoo.json; NaN where a score was not measured."""
    loc = (localization or {}).get("scores") or {}
    faith = faithfulness or {}
    sources = {"deletion": faith.get("auc") or {}, "insertion": faith.get("insertion_auc") or {},
               "road": (faith.get("road") or {}).get("scores") or {},
               "sanity": (faith.get("sanity") or {}).get("rank_correlation") or {}}
    kinds = {**(faith.get("kinds") or {}), **{k: v.get("kind") for k, v in loc.items()}}
    names = list(dict.fromkeys([*loc, *sources["deletion"]]))
    names = [k for k in names if k not in BASELINES] + [k for k in BASELINES if k in names]
    chance = loc.get("chance", {}).get("pointing", math.nan)
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        row = {c.key: float(loc.get(name, {}).get(c.key, math.nan)) for c in COLUMNS}
        row["flat"] = float(loc.get(name, {}).get("flat", math.nan))
        row.update({key: float(values.get(name, math.nan)) for key, values in sources.items()})
        row["kind"] = kinds.get(name) or "attention"
        row["flags"] = [] if name in BASELINES else flags(row, chance, insensitive_at, inverted_below)
        table[name] = row
    return table


def best_per_column(table: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{score: the map that does best}`` among the maps (the baselines and flat maps excluded), for measured
    scores."""
    out = {}
    for c in COLUMNS:
        values = [(name, row[c.key]) for name, row in table.items()
                  if name not in BASELINES and "flat" not in row["flags"] and not math.isnan(row[c.key])]
        if values:
            out[c.key] = (max if c.higher else min)(values, key=lambda kv: kv[1])[0]
    return out


def _beats(value: float, reference: float, higher: bool) -> bool:
    return not math.isnan(reference) and (value > reference if higher else value < reference)


def _names(items: Sequence[str]) -> str:
    quoted = [f"<b>{html.escape(i)}</b>" for i in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def findings(run: Run, result: Interpretation) -> list[str]:
    """The report's conclusions in a few sentences (HTML), each read off the score table."""
    chance = 1 / len(run.classes)
    out = [f"The model is right on <b>{result.accuracy:.1%}</b> of {result.n_images} validation images "
           f"(guessing: {chance:.1%})."]
    table = result.table
    best = best_per_column(table)
    random_row = table.get("random", {})
    for key in ("pointing", "energy", "max_box_acc", "deletion", "insertion", "road"):
        if key not in best:
            continue
        col = next(c for c in COLUMNS if c.key == key)
        name, value, ref = best[key], table[best[key]][key], random_row.get(key, math.nan)
        versus = f"; random map {_fmt(ref, 3)}" if not math.isnan(ref) else ""
        if math.isnan(ref) or _beats(value, ref, col.higher):
            out.append(f"Best {col.label} ({'higher' if col.higher else 'lower'} is better): {_names([name])}, "
                       f"{_fmt(value, 3)}{versus}.")
        else:
            out.append(f"No map beats the random map on {col.label} (best: {html.escape(name)} {_fmt(value, 3)}"
                       f"{versus}).")
    inverted = [k for k, r in table.items() if "inverted" in r["flags"]]
    if inverted:
        base = table.get("chance", {}).get("pointing", math.nan)
        out.append(f"Inverted: {_names(inverted)} {'peaks' if len(inverted) == 1 else 'peak'} on the object "
                   f"less than half as often as a map that knows nothing would ({base:.3f}): "
                   "they mark the background.")
    flat = [k for k, r in table.items() if "flat" in r["flags"]]
    if flat:
        out.append(f"Flat: {_names(flat)} {'is' if len(flat) == 1 else 'are'} constant (all zero, say) on most "
                   "images, so it points nowhere; its scores say nothing about where the model looks.")
    insensitive = [k for k, r in table.items() if "insensitive" in r["flags"]]
    if insensitive:
        out.append(f"Insensitive: {_names(insensitive)} barely change when the model's weights are "
                   "re-initialised (rank correlation 0.5 or more): such a map shows the image more than what "
                   "the model learned.")
    return out


def score_table_html(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The table of every map against every score; the best value per column in bold."""
    best = best_per_column(table)
    cols = [c for c in COLUMNS if any(not math.isnan(r[c.key]) for r in table.values())]
    head = "".join(f'<th title="{html.escape(c.what)}">{html.escape(c.label)} {"&uarr;" if c.higher else "&darr;"}'
                   "</th>" for c in cols)
    body = []
    for name, row in table.items():
        cells = []
        for c in cols:
            text = _fmt(row[c.key], 3)
            cells.append(f"<td><b>{text}</b></td>" if best.get(c.key) == name else f"<td>{text}</td>")
        flagged = "".join(f'<span class="flag">{f}</span>' for f in row["flags"])
        cls = ' class="baseline"' if name in BASELINES else ""
        body.append(f"<tr{cls}><th>{html.escape(name)}</th><td>{html.escape(str(row['kind']))}</td>"
                    + "".join(cells) + f"<td>{flagged}</td></tr>")
    return ('<div class="wide"><table class="scores"><thead><tr><th>map</th><th>kind</th>'
            f"{head}<th>flags</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _run_summary(run: Run) -> tuple[str, list[list[Any]]]:
    """What was trained, on what, and how: a lead sentence (HTML) and the rows of the facts table."""
    cfg = run.config
    metrics = cfg.get("metrics") or {}
    rows = _epochs(cfg)
    train = cfg.get("request") or cfg.get("train") or {}  # (older runs recorded "train")
    data = cfg.get("data") or {}
    counts = data.get("counts") or {}
    sites = ", ".join(cfg.get("sites") or []) or "none (baseline)"
    kind = run.model.kind or "no attention"
    n_train = sum((counts.get("train") or {}).values())
    lead = (f"<b>{html.escape(str(cfg.get('backbone')))}</b> with <b>{html.escape(str(cfg.get('attn')))}</b> "
            f"attention ({html.escape(kind)}) at <b>{html.escape(sites)}</b>, trained for "
            f"{len(rows) or '?'} epochs on {n_train or '?'} images of {len(run.classes)} classes.")
    facts = [
        ["backbone", cfg.get("backbone")], ["attention module", f"{cfg.get('attn')} ({kind})"],
        ["sites", sites], ["attention options", json.dumps(cfg.get("attn_options") or {})],
        ["classes", ", ".join(run.classes)], ["input size", f"{run.img_size} x {run.img_size} (squashed)"],
        ["pretrained", cfg.get("pretrained")], ["data", f"{data.get('root', '?')} ({data.get('layout', '?')})"],
        ["epochs / lr / batch size / seed",
         f"{train.get('epochs', '?')} / {train.get('lr', '?')} / {train.get('bs', '?')} / {cfg.get('seed', '?')}"],
        ["parameters", f"{sum(p.numel() for p in run.model.parameters()):,}"],
        ["time per epoch", f"{time_per_epoch(cfg):.1f} s"],
        ["final metrics", ", ".join(f"{k} {_fmt(v)}" for k, v in (metrics.get("final") or {}).items())],
        ["versions", ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items())],
    ]
    return lead, facts


def _training_section(rows: Sequence[Mapping[str, Any]], files: Mapping[str, Path]) -> list[str]:
    """The learning curves, then every epoch's numbers as a table."""
    parts = ["<h2>Training</h2>", figure(files.get("history"), "learning curves")]
    if rows:
        epoch_keys = list(dict.fromkeys(k for r in rows for k in r))
        parts.append(html_table([k.replace("_", " ") + (" (s)" if k == "time" else "") for k in epoch_keys],
                                 [[_fmt(r.get(k, float("nan")), 1 if k == "time" else 4) for k in epoch_keys]
                                  for r in rows]))
    return parts


def _localization_text(loc: Mapping[str, Any] | None) -> str:
    """How localisation is scored, or how to have it scored when the data has no boxes."""
    if loc is None:
        return ("<p>No <code>boxes.csv</code> at the data root, so there is nothing to score localisation "
                "against. Add one (<code>image,x_min,y_min,x_max,y_max</code>, a row per box) to measure it.</p>")
    return (
        f"<p><b>Does the map find the object?</b> Scored on the {loc['images']} validation images that have a "
        "box. <i>Pointing game</i>: the share of images whose map peaks inside a box "
        f"(<i>±tol</i>: within {_fmt(float(loc.get('tolerance', 0)), 0)} pixels of the original image, as "
        "TorchRay's benchmark). <i>Energy in box</i>: the share of the map's mass inside the boxes. "
        "<i>IoU@0.5</i>: overlap of the map's upper half with the boxes. <i>MaxBoxAcc</i>: at the best "
        "threshold, the share of images where the box around the map overlaps a box by IoU 0.5 or more.</p>")


def _faithfulness_text(faith: Mapping[str, Any]) -> str:
    """How deletion, insertion, ROAD and the sanity check test a map, on how many images."""
    road, sanity = faith.get("road") or {}, faith.get("sanity") or {}
    return (
        f"<p><b>Does the prediction rest on the pixels the map ranks high?</b> On {faith['images']} validation "
        f"images, the top-ranked pixels are deleted (replaced by the mean colour) or inserted into a blank image, "
        f"{100 // faith['steps']}% at a time, and the true class's probability is measured: <i>deletion AUC</i> "
        "is lower and <i>insertion AUC</i> higher for a faithful map. <i>ROAD</i> (on "
        f"{road.get('images', 0)} images) removes pixels by imputing them from their neighbours, so that the "
        "image stays natural; higher is more faithful. <b>Sanity check</b> (on "
        f"{sanity.get('images', 0)} images): the rank correlation of each map with the same map after every "
        "weight of the model is re-initialised (<i>sanity ρ</i>, Spearman); a map that explains the model changes "
        "(low ρ).</p>")


def _scores_section(result: Interpretation) -> list[str]:
    """How good each map is: what each score measures, the table of every map against every score, the plots."""
    files = result.files
    return [
        "<h2>How good is each map?</h2>",
        _localization_text(result.localization),
        _faithfulness_text(result.faithfulness),
        "<p>CAMs are computed for the true class. Arrows give the better direction; the best map per column is "
        "in bold. <i>random</i> is a seeded noise map scored the same way; <i>chance</i> is what a map that "
        "knows nothing scores on average. Flags: <i>flat</i>, a map constant on most images; <i>inverted</i>, a "
        "pointing game below half of chance; "
        "<i>insensitive</i>, a rank correlation of 0.5 or more with the randomised model's map.</p>",
        score_table_html(result.table),
        figure(files.get("localization"), "localisation scores"),
        figure(files.get("deletion"), "deletion curves"),
        figure(files.get("insertion"), "insertion curves"),
    ]


def _mistakes_section(result: Interpretation) -> list[str]:
    """The confusion matrix, the most confused pairs, and the images the model got most wrong."""
    parts = ["<h2>Mistakes</h2>", figure(result.files.get("confusion"), "confusion matrix")]
    if result.confused:
        parts += ["<p>Most confused pairs:</p>",
                  html_table(["actual", "predicted", "images"], [list(c) for c in result.confused])]
    parts += [
        "<p>The validation images the model got most wrong (highest loss), with their maps:</p>",
        figure(result.files.get("top_losses"), "top losses with attention maps"),
    ]
    return parts


def write_report(run: Run, result: Interpretation, path: str | Path) -> Path:
    """One self-contained HTML page (plots embedded as data URIs) explaining the run to someone who did not
    train it: configuration, learning curves, where the model looks, localisation, faithfulness, errors."""
    cfg = run.config
    path = Path(path)
    name = run.name if run.path is not None else path.parent.name
    lead, facts = _run_summary(run)
    parts = [
        f'<p class="lead">{lead}</p>',
        '<div class="note"><b>How to read this page.</b> An <i>attention map</i> is where the model weighs the '
        "image most when it decides; attnzoo reads it straight from the attention module at each <i>site</i> "
        "(a layer of the backbone). A <i>CAM</i> (class activation map, e.g. Grad-CAM) is a post-hoc "
        "explanation computed from the features of the layer its name gives and, for most methods, their "
        "gradients, shown for comparison. The sections below show how training went, where the model looks, whether "
        "that is where the object is (when object boxes are known), whether the prediction really rests on "
        "the attended pixels, and which classes get mixed up.</div>",
        "<h2>In short</h2><ul>" + "".join(f"<li>{f}</li>" for f in findings(run, result)) + "</ul>",
        "<h2>The run</h2>", facts_table(facts),
        *_training_section(_epochs(cfg), result.files),
        "<h2>Where the model looks</h2>",
        "<p>One row per validation image: the image as the model sees it, then each site's attention map "
        "blended over it (red = high, blue = low), then each CAM for the predicted "
        "class. A green "
        "&#10003; title means the prediction is right, a red &#10007; wrong, with the probability the model "
        "gives its prediction. The white rectangle, when shown, is the object's box. Each map is scaled to its "
        "own range, so compare where maps are high, not their colours.</p>",
        figure(result.files.get("attention"), "attention maps and Grad-CAM on validation images"),
        *_scores_section(result),
        *_mistakes_section(result),
        "<h2>Configuration</h2>",
        f"<details><summary>{CONFIG}</summary><pre>{html.escape(json.dumps(cfg, indent=2, default=str))}"
        "</pre></details>",
    ]
    text = page(f"Run report: {name}", parts, "Written by attnzoo interpret.")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def best_map(scores: Mapping[str, Any], kinds: Sequence[str]) -> tuple[str, dict[str, float]] | None:
    """The map of one of ``kinds`` with the highest pointing game."""
    found = [(k, v) for k, v in scores.items()
             if v.get("kind") in kinds and not math.isnan(v.get("pointing", math.nan))]
    return max(found, key=lambda kv: kv[1]["pointing"]) if found else None


@dataclass
class Interpretation:
    """What ``interpret_run`` measured and wrote. ``table``: every map (each attention map, each CAM, the random
    map, chance) against every score, with its ``kind`` and ``flags`` (``report.score_table``)."""

    out: Path
    n_images: int
    accuracy: float
    confused: list[tuple[str, str, int]]
    localization: dict[str, Any] | None
    faithfulness: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    table: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a reader of the numbers must know (boxes, saving)

    def to_dict(self) -> dict[str, Any]:
        """Every number, for ``interpret --json``: strict JSON (a score not measured is null, never NaN)."""
        return strict_json(dict(accuracy=self.accuracy, images=self.n_images, most_confused=self.confused,
                                table=self.table, localization=self.localization, faithfulness=self.faithfulness,
                                files={k: str(v) for k, v in self.files.items()}, notes=self.notes))
