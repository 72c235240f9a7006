"""A run's model card (``README.md`` of its Hub face): YAML metadata that huggingface_hub reads and the Hub
indexes, then what a reader needs: what the model is, where it looks, which map carries the decision, the
command that trained it, and how to load it (with attnzoo, and the backbone alone with timm).

Made from the run's record (attnzoo.json), never holding a local path: the data folder is named by its last
part, the training command shows ``DATA`` for it.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..train.settings import fit_command
from .folder import PLOTS, WEIGHTS

TASK = "image-classification"
REPO_PLACEHOLDER = "USER/REPO"  # in a card written before the run was pushed


def model_card(record: Mapping[str, Any], config: Mapping[str, Any], repo_id: str | None = None,
               license: str | None = None, figures: Sequence[str] = ()) -> str:
    """The card of a run (``record``: its attnzoo.json; ``config``: its config.json). Its metadata is built with
    huggingface_hub's ``ModelCardData`` and the whole card is parsed back with ``ModelCard``: a card the Hub
    would not read is never written."""
    from huggingface_hub import ModelCard

    data = card_data(record, config, repo_id, license)
    body = "\n".join([*_summary(record, config, repo_id or REPO_PLACEHOLDER), *_where_it_looks(record, figures),
                      *_training(record), *_loading(config, repo_id or REPO_PLACEHOLDER)])
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    ModelCard(text, ignore_metadata_errors=False)
    return text


def training_command(record: Mapping[str, Any]) -> str:
    """The command that trained the run, local paths as placeholders ("" for a run that records none)."""
    return shlex.join(fit_command(record["request"])) if record.get("request") else ""


def card_data(record: Mapping[str, Any], config: Mapping[str, Any], repo_id: str | None = None,
              license: str | None = None) -> Any:
    """``ModelCardData``: library, task, tags, license, base model, and a model-index of the validation accuracy
    and (with boxes) each map's pointing game."""
    from huggingface_hub import EvalResult, ModelCardData

    attn = record.get("attn") or "none"
    common = dict(task_type=TASK, dataset_type="imagefolder", dataset_name=dataset_name(record),
                  dataset_split="validation")
    results = []
    accuracy = config["attnzoo"]["metrics"].get("accuracy")  # finite numbers only
    if accuracy is not None:
        results.append(EvalResult(**common, metric_type="accuracy", metric_value=round(float(accuracy), 4),
                                  metric_name="validation accuracy"))
    for site, verdict in (record.get("maps") or {}).items():
        if isinstance(verdict.get("pointing"), (int, float)) and math.isfinite(verdict["pointing"]):
            results.append(EvalResult(**common, metric_type="pointing_game", metric_value=round(verdict["pointing"], 4),
                                      metric_name=f"pointing game ({site})"))
    name = (repo_id or REPO_PLACEHOLDER).rsplit("/", 1)[-1]
    tags = list(dict.fromkeys(["attnzoo", "timm", TASK, "attention-maps", record["backbone"], attn]))
    return ModelCardData(library_name="attnzoo", pipeline_tag=TASK, tags=tags, license=license,
                         base_model=config["attnzoo"]["base_model"], model_name=name if results else None,
                         eval_results=results or None)


def dataset_name(record: Mapping[str, Any]) -> str:
    """The data folder's last part (never its path), or the demo set."""
    request = record.get("request") or {}
    if request.get("data") == "demo":
        return "attnzoo demo"
    root = (record.get("data") or {}).get("root")
    return Path(str(root)).name if root else "image folder"


def _summary(record: Mapping[str, Any], config: Mapping[str, Any], repo_id: str) -> list[str]:
    attn, sites = record.get("attn") or "none", list(record.get("sites") or [])
    accuracy = config["attnzoo"]["metrics"].get("accuracy")
    epochs = len((record.get("metrics") or {}).get("per_epoch") or [])
    size, colour = record["img_size"], "grey" if len(record["mean"]) == 1 else "RGB"
    start = config["attnzoo"]["base_model"] or ("pretrained weights from a local file" if record.get("pretrained")
                                   else "random initialisation")
    what = f"**{attn}** attention at {', '.join(f'`{s}`' for s in sites)}" if sites else "no attention (baseline)"
    lines = [f"# {repo_id.rsplit('/', 1)[-1]}", "",
             f"A `{record['backbone']}` (timm) with {what}, trained with attnzoo"
             f" to tell {len(record['classes'])} classes apart"
             + (f"; validation accuracy **{accuracy:.1%}**." if accuracy is not None else "."), "",
             "| | |", "|---|---|",
             f"| backbone | `{record['backbone']}` |",
             f"| attention module | `{attn}`, options `{dict(record.get('attn_options') or {})}` |",
             f"| sites | {', '.join(sites) or '-'} |",
             f"| classes | {', '.join(map(str, record['classes']))} |",
             f"| input | {size} x {size} {colour}, squashed (bilinear, no crop), mean {list(record['mean'])}, "
             f"std {list(record['std'])} |",
             f"| started from | {start} |"]
    if epochs:
        lines.append(f"| epochs | {epochs} |")
    return [*lines, ""]


def _where_it_looks(record: Mapping[str, Any], figures: Sequence[str]) -> list[str]:
    maps = record.get("maps") or {}
    lines = ["## Where it looks", ""]
    if PLOTS["attention"] in figures:
        lines += [f"![attention maps of validation images]({PLOTS['attention']})", ""]
    if maps:
        boxes = any(v.get("pointing") is not None for v in maps.values())
        lines += ["Each map's share of the decision: the drop in the true class's probability when that map's "
                  "attention is taken away, as a share of all maps' drops. Trust the map that carries the decision"
                  + ("; the pointing game says whether it finds the object in the boxes." if boxes else "."), "",
                  "| map | decision share |" + (" pointing game |" if boxes else "") + " flags |",
                  "|---|---|" + ("---|" if boxes else "") + "---|"]
        for site, v in maps.items():
            cells = [f"`{site}`", "-" if v.get("share") is None else f"{v['share']:.1%}"]
            if boxes:
                cells.append("-" if v.get("pointing") is None else f"{v['pointing']:.1%}")
            cells.append(", ".join(v.get("flags") or []) or "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    others = [f for f in figures if f != PLOTS["attention"]]
    if others:
        lines += ["Figures: " + ", ".join(f"[{Path(f).stem.replace('_', ' ')}]({f})" for f in others), ""]
    return lines


def _training(record: Mapping[str, Any]) -> list[str]:
    versions = record.get("versions") or {}
    command = training_command(record)
    lines = ["## How it was trained", ""]
    if command:
        lines += ["```bash", command, "```", "", "`DATA` is an image folder (one sub-folder per class, or train/ and "
                  "valid/); it is not part of this repo."]
    if versions:
        lines += ["", "With " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return [*lines, ""]


def _loading(config: Mapping[str, Any], repo_id: str) -> list[str]:
    kind = config["attnzoo"]["kind"]
    classes = 0 if kind == "readout" else config["num_classes"]
    img = "".join(f", {k}={v!r}" for k, v in (config.get("model_args") or {}).items())
    what = {"readout": "the backbone's features (the attention readout, which classifies, needs attnzoo)",
            "gate": "the backbone's weights, trained with the attention gates inside it, without them: "
                    "not this model's predictions",
            None: "the whole model: this run has no attention module"}[kind]
    return ["## How to load it", "", "```bash", "pip install attnzoo",
            f"attnzoo predict IMAGE.jpg --run hf-hub:{repo_id}",
            f"attnzoo show-attention IMAGE.jpg --run hf-hub:{repo_id} --out maps/", "```", "",
            "```python", "import attnzoo", "", f'run = attnzoo.load_run("hf-hub:{repo_id}")',
            'probs, maps = run.predict(["image.jpg"])  # class probabilities, one attention map per site',
            "print(run.top(probs))", "```", "",
            f"With timm alone, `{WEIGHTS}` gives {what}:", "",
            "```python", "import timm", "from huggingface_hub import hf_hub_download",
            "from safetensors.torch import load_file", "",
            f'weights = load_file(hf_hub_download("{repo_id}", "{WEIGHTS}"))',
            f'backbone = timm.create_model("{config["architecture"]}", num_classes={classes}{img})',
            'backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items() '
            'if k.startswith("backbone.")})', "```", ""]

