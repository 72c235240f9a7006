"""``compare``: what ``attnzoo compare`` does, several run folders side by side, read from their files alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnzooError
from ..runs.folder import CONFIG, WEIGHTS, RunFolder, parameter_count
from .charts import bar_figure
from .report import best_map, score_table, time_per_epoch


def compare_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run folder (read from attnzoo.json and the safetensors header, no model is built): accuracy,
    size, speed, the best attention map and the best CAM by the pointing game, flagged maps, and ``scores``,
    the run's whole score table (``report.score_table``) when ``attnzoo interpret`` has scored it."""
    out = []
    for p in paths:
        p = Path(p)
        cfg = RunFolder(p).read_config()
        final = (cfg.get("metrics") or {}).get("final") or {}
        try:
            table = score_table(cfg.get("localization"), cfg.get("faithfulness"))
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # scores hand-edited past any use
            raise AttnzooError(f"{p / CONFIG}: its localisation or faithfulness scores cannot be read "
                               f"({type(e).__name__}: {e})") from None
        best, cam_row = best_map(table, ("tap", "gate", "attention")), best_map(table, ("cam", "grad-cam"))
        nan = float("nan")
        out.append(dict(
            run=p.name, path=str(p), backbone=cfg.get("backbone"), attn=cfg.get("attn"), sites=cfg.get("sites") or [],
            accuracy=final.get("accuracy", nan), valid_loss=final.get("valid_loss", nan),
            params=parameter_count(p / WEIGHTS) if (p / WEIGHTS).is_file() else None,
            time_per_epoch=time_per_epoch(cfg), epochs=len((cfg.get("metrics") or {}).get("per_epoch") or []),
            best_site=best[0] if best else None,
            pointing=best[1]["pointing"] if best else nan, energy=best[1]["energy"] if best else nan,
            best_cam=cam_row[0] if cam_row else None,
            cam_pointing=cam_row[1]["pointing"] if cam_row else nan,
            cam_energy=cam_row[1]["energy"] if cam_row else nan,
            random_pointing=table.get("random", {}).get("pointing", nan),
            flagged={k: r["flags"] for k, r in table.items() if r["flags"]},
            scores=table,
        ))
    return out


def compare_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Accuracy and the localisation scores of several runs as grouped bars."""
    names = [f"{r['run']}\n{r['backbone']} + {r['attn']}" for r in rows]
    series = {"accuracy": [r["accuracy"] for r in rows]}
    for key, label in (("pointing", "pointing (best site)"), ("energy", "energy (best site)"),
                       ("cam_pointing", "pointing (best CAM)"), ("cam_energy", "energy (best CAM)")):
        values = [r[key] for r in rows]
        if not all(math.isnan(v) for v in values):
            series[label] = values
    return bar_figure(names, series, "runs compared", "validation score")


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> tuple[list[dict[str, Any]], Path]:
    """What ``attnzoo compare`` does: the rows of ``compare_runs`` and their bar chart, written to ``out`` (a new
    file, never one that exists; default ``compare.png``, or ``compare-2.png``... when taken)."""
    from ..runs.outputs import check_new_file, refuse_data_folder
    from . import figures

    if out is not None:
        check_new_file(out)
        refuse_data_folder(out)
    rows = compare_runs(paths)
    written = figures.save_new_figure(compare_figure(rows), out or Path("compare.png"), fresh=out is None)
    return rows, written
