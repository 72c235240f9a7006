"""``report.html``: one self-contained page explaining a run to someone who did not train it."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .explain import gradcam_site
from .run import Run, _atomic_write

if TYPE_CHECKING:
    from .interpret import Interpretation


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts_table(rows: Sequence[Sequence[Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _figure(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="{_data_uri(path)}"></figure>'


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def time_per_epoch(config: Mapping[str, Any]) -> float:
    """Mean seconds per epoch recorded in a run's config (NaN when none)."""
    times = [r["time"] for r in (config.get("metrics") or {}).get("per_epoch") or [] if "time" in r]
    return float(np.mean(times)) if times else float("nan")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.lead{font-size:1.08em;color:#444} .note{background:#f6f8fa;border-left:4px solid #4a7bd0;padding:.6em 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .7em;text-align:left} th{background:#f3f3f3}
td:not(:first-child){font-variant-numeric:tabular-nums}
figure{margin:.8em 0} img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.85em} .muted{color:#777;font-size:.9em}
"""


def findings(run: Run, result: Interpretation) -> list[str]:
    """The report's conclusions in a few sentences (HTML)."""
    chance = 1 / len(run.classes)
    out = [f"The model is right on <b>{result.accuracy:.1%}</b> of {result.n_images} validation images "
           f"(guessing: {chance:.1%})."]
    loc = result.localization
    if loc is not None:
        scores = loc["scores"]
        best = best_map(scores, "attention") or best_map(scores, "grad-cam")
        base = scores["chance"]["energy"]
        if best is not None:
            name, v = best
            out.append(f"The map that finds the object best is <b>{html.escape(name)}</b>: its peak is on the "
                       f"object in {v['pointing']:.0%} of the images and {v['energy']:.0%} of its mass lies on "
                       f"the object, where a map that knows nothing about the object gets {base:.0%} on both.")
    auc = result.faithfulness["auc"]
    ranked = sorted(auc, key=auc.get)
    if ranked and ranked[0] != "random":
        site = next((k for k in ranked if k in run.model.sites), None)
        also = (f"; the most faithful attention map is {html.escape(site)} ({auc[site]:.3f})"
                if site is not None and site != ranked[0] else "")
        out.append(f"Deleting the pixels <b>{html.escape(ranked[0])}</b> ranks highest lowers the true class's "
                   f"probability fastest: deletion AUC {auc[ranked[0]]:.3f}, against "
                   f"{auc.get('random', float('nan')):.3f} for a random map (lower is more faithful){also}.")
    elif ranked:
        out.append("No map beats the random map in the deletion test: the prediction does not rest on the "
                   "attended pixels more than on any others.")
    return out


def write_report(run: Run, result: Interpretation, path: str | Path) -> Path:
    """One self-contained HTML page (plots embedded as data URIs) explaining the run to someone who did not
    train it: configuration, learning curves, where the model looks, localisation, faithfulness, errors."""
    cfg = run.config
    path = Path(path)
    files = result.files
    metrics = cfg.get("metrics") or {}
    rows = metrics.get("per_epoch") or []
    train = cfg.get("train") or {}
    data = cfg.get("data") or {}
    counts = data.get("counts") or {}
    sites = ", ".join(cfg.get("sites") or []) or "none (baseline)"
    kind = run.model.kind or "no attention"
    cam_site = gradcam_site(run.model, run.img_size)
    name = run.path.name if run.path is not None else path.parent.name
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
    epoch_keys = list(dict.fromkeys(k for r in rows for k in r))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>attnzoo run report: {html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {html.escape(name)}</h1>", f'<p class="lead">{lead}</p>',
        '<div class="note"><b>How to read this page.</b> An <i>attention map</i> is where the model weighs the '
        "image most when it decides; attnzoo reads it straight from the attention module at each <i>site</i> "
        f"(a layer of the backbone). <i>Grad-CAM</i> is a different, gradient-based explanation at {cam_site}, "
        "shown for comparison. The sections below show how training went, where the model looks, whether "
        "that is where the object is (when object boxes are known), whether the prediction really rests on "
        "the attended pixels, and which classes get mixed up.</div>",
        "<h2>In short</h2><ul>" + "".join(f"<li>{f}</li>" for f in findings(run, result)) + "</ul>",
        "<h2>The run</h2>", _facts_table(facts),
        "<h2>Training</h2>", _figure(files.get("history"), "learning curves"),
    ]
    if rows:
        parts.append(_html_table([k.replace("_", " ") + (" (s)" if k == "time" else "") for k in epoch_keys],
                                 [[_fmt(r.get(k, float("nan")), 1 if k == "time" else 4) for k in epoch_keys]
                                  for r in rows]))
    parts += [
        "<h2>Where the model looks</h2>",
        "<p>One row per validation image: the image as the model sees it, then each site's attention map "
        f"blended over it (red = high, blue = low), then Grad-CAM at {html.escape(cam_site)} for the predicted "
        "class. A green "
        "&#10003; title means the prediction is right, a red &#10007; wrong, with the probability the model "
        "gives its prediction. The white rectangle, when shown, is the object's box. Each map is scaled to its "
        "own range, so compare where maps are high, not their colours.</p>",
        _figure(files.get("attention"), "attention maps and Grad-CAM on validation images"),
    ]
    loc = result.localization
    parts.append("<h2>Does attention find the object?</h2>")
    if loc is None:
        parts.append("<p>No <code>boxes.csv</code> at the data root, so there is nothing to score the maps "
                     "against. Add one (<code>image,x_min,y_min,x_max,y_max</code>) to measure this.</p>")
    else:
        parts += [
            f"<p>Scored on the {loc['images']} validation images that have a box. <b>Pointing game</b>: the share "
            "of images where the map's strongest cell lies inside the object's box. <b>Energy in box</b>: the share of "
            "the map's mass inside the box (after shifting the map's minimum to 0). Both are higher when the "
            "map finds the object. Grad-CAM is computed for the true class here. <i>Random</i> is a seeded "
            "noise map scored the same way; <i>chance</i> is what a map that knows nothing scores on average "
            "(the box's share of the image).</p>",
            _html_table(["map", "kind", "pointing game", "energy in box"],
                        [[k, v["kind"], _fmt(v["pointing"], 3), _fmt(v["energy"], 3)]
                         for k, v in loc["scores"].items()]),
            _figure(files.get("localization"), "localisation scores"),
        ]
    faith = result.faithfulness
    parts += [
        "<h2>Does the prediction rest on the attended pixels?</h2>",
        f"<p>Deletion test on {faith['images']} validation images: the pixels a map ranks highest are "
        f"replaced by the mean colour, {100 // faith['steps']}% of the image at a time, and the probability of "
        "the true class is measured. A map that points at what the prediction depends on makes the probability "
        "fall fast: a <b>lower area under the curve (AUC) is more faithful</b>. Grad-CAM is for the true "
        "class; the random map is the reference.</p>",
        _figure(files.get("deletion"), "deletion curves"),
        _html_table(["map", "deletion AUC (lower = more faithful)"],
                    [[k, _fmt(v, 3)] for k, v in sorted(faith["auc"].items(), key=lambda kv: kv[1])]),
        "<h2>Mistakes</h2>",
        _figure(files.get("confusion"), "confusion matrix"),
    ]
    if result.confused:
        parts += ["<p>Most confused pairs:</p>",
                  _html_table(["actual", "predicted", "images"], [list(c) for c in result.confused])]
    parts += [
        "<p>The validation images the model got most wrong (highest loss), with their maps:</p>",
        _figure(files.get("top_losses"), "top losses with attention maps"),
        "<h2>Configuration</h2>",
        f"<details><summary>attnzoo.json</summary><pre>{html.escape(json.dumps(cfg, indent=2, default=str))}"
        "</pre></details>",
        '<p class="muted">Written by <code>attnzoo interpret</code>.</p></body></html>',
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: tmp.write_text("\n".join(p for p in parts if p), encoding="utf-8"))
    return path



def best_map(scores: Mapping[str, Any], kind: str) -> tuple[str, dict[str, float]] | None:
    """The map of ``kind`` with the highest energy in box."""
    found = [(k, v) for k, v in scores.items() if v.get("kind") == kind]
    return max(found, key=lambda kv: kv[1]["energy"]) if found else None
