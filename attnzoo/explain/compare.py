"""``compare``: what ``attnzoo compare`` does, several run folders side by side, read from their files alone."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnzooError
from ..runs.folder import CONFIG, WEIGHTS, RunFolder, parameter_count, recorded_data_root
from .charts import bar_figure
from .report import best_map, score_table, time_per_epoch
from .stats import Row, config_name, decisive_map, leaderboard

RunRef = str | Path | RunFolder  # a run folder, by path or already read


def _opened(run: RunRef) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder.open(run)


def run_result(path: RunRef) -> dict[str, Any]:
    """One run as the statistics over seeds read it (``stats.leaderboard``): its configuration and seed, how it
    ended, validation accuracy and loss, its most decisive map with that map's share and pointing game (from
    ``fit``'s record; pointing needs boxes.csv), parameters and seconds per epoch."""
    folder = _opened(path)
    record = folder.record
    final = (record.get("metrics") or {}).get("final") or {}
    name, share, pointing = decisive_map(record.get("maps"))
    weights = folder.file(WEIGHTS)
    nan = float("nan")
    return dict(
        config=config_name(record.get("attn"), record.get("sites") or [], record.get("attn_options")),
        seed=record.get("seed"), state=_STATES.get(record.get("status"), "pending"),
        error=record.get("error"), accuracy=float(final.get("accuracy", nan)),
        valid_loss=float(final.get("valid_loss", nan)), map=name, share=share, pointing=pointing,
        params=float(parameter_count(weights)) if weights.is_file() else nan, time_per_epoch=time_per_epoch(record),
        epochs=len((record.get("metrics") or {}).get("per_epoch") or []),
    )


_STATES = {"done": "complete", "failed": "failed"}  # a run's status, as the statistics count it


def _family(record: Mapping[str, Any]) -> str:
    """What runs that differ only in their module (and its sites and options) and seed have in common."""
    request = {k: v for k, v in (record.get("request") or {}).items()
               if k not in ("seed", "attn", "at", "attn_options", "threads", "num_workers")}
    return json.dumps([record.get("backbone"), request], sort_keys=True, default=str)


def over_seeds(paths: Sequence[RunRef]) -> tuple[list[list[Row]], dict[str, Row]]:
    """The statistics over seeds of runs that differ only in their seed: a leaderboard per family of runs with
    the same settings (each configuration against that family's ``none`` runs, paired by seed), for the families
    where some configuration has two seeds or more; and each such run's row, by its path."""
    families: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for folder in map(_opened, paths):
        families.setdefault(_family(folder.record), []).append((str(folder.path), run_result(folder)))
    boards, by_run = [], {}
    for members in families.values():
        board = leaderboard([r for _, r in members])
        if any(row.seeds > 1 for row in board):
            boards.append(board)
            rows = {row.config: row for row in board}
            by_run.update({p: rows[r["config"]] for p, r in members if rows[r["config"]].seeds > 1})
    return boards, by_run


def compare_runs(paths: Sequence[RunRef]) -> list[dict[str, Any]]:
    """One row per run folder (read from attnzoo.json and the safetensors header, no model is built): accuracy,
    size, speed, the best attention map and the best CAM by the pointing game, flagged maps, and ``scores``,
    the run's whole score table (``report.score_table``) when ``attnzoo interpret`` has scored it."""
    out = []
    for folder in map(_opened, paths):
        p, cfg = folder.path, folder.record
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


def with_seeds(rows: list[dict[str, Any]], paths: Sequence[RunRef]) -> list[list[Row]]:
    """Each row's ``over_seeds``: the numbers of its configuration over the runs that differ from it only in their
    seed (None when there are no such runs); returns those leaderboards."""
    boards, by_run = over_seeds(paths)
    for row in rows:
        row["over_seeds"] = by_run[row["path"]].to_dict() if row["path"] in by_run else None
    return boards


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


def compare(paths: Sequence[str | Path], out: str | Path | None = None
            ) -> tuple[list[dict[str, Any]], list[list[Row]], Path]:
    """What ``attnzoo compare`` does: the rows of ``compare_runs`` (with their numbers over seeds), the
    leaderboards of the runs that differ only in their seed, and the bar chart, written to ``out`` (a new file,
    never one that exists; default ``compare.png``, or ``compare-2.png``... when taken)."""
    from ..runs.outputs import check_new_file, refuse_data_folder, refuse_inside_data
    from . import figures

    if out is not None:
        check_new_file(out)
        refuse_data_folder(out)
    folders = [RunFolder.open(p) for p in paths]  # each attnzoo.json read once
    rows = compare_runs(folders)
    for folder in folders if out is not None else ():
        refuse_inside_data(out, recorded_data_root(folder.record))
    boards = with_seeds(rows, folders)
    written = figures.save_new_figure(compare_figure(rows), out or Path("compare.png"), fresh=out is None)
    return rows, boards, written
