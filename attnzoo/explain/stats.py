"""Statistics over seeds: what ``attnzoo sweep``'s leaderboard and ``attnzoo compare`` report when runs differ
only in their seed.

One run is one draw: two modules trained once each differ by as much as one module trained twice (0.879 against
0.874 one day, 0.8855 against 0.8745 the next, on Fashion-MNIST). So each configuration is summarised over its
seeds (mean and sample standard deviation), and compared with the baseline seed by seed: the two runs of a seed
share the data split and the order of the batches, so their difference leaves out what the seed alone does. The
verdict is read off the 95% t-interval of the mean paired difference: ``better`` when all of it is above 0,
``worse`` when all of it is below, ``no evidence`` otherwise (an interval needs two pairs or more).

A result is a dict per run: ``config``, ``seed``, ``state`` (``complete``, ``failed``, ``pruned``, ``pending``),
and when complete ``accuracy``, ``valid_loss``, ``map`` (the map with the largest share of the decision),
``share``, ``pointing``, ``params``, ``time_per_epoch``, optionally ``lr`` and ``error``. numpy and scipy only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..runs.outputs import strict_json

BASELINE = "none"
LEVEL = 0.95
BETTER, NO_EVIDENCE, WORSE = "better", "no evidence", "worse"
NAN = float("nan")


def config_name(attn: str | None, sites: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> str:
    """A configuration's name: ``none``, or the module at its sites (``sagan@layer3``, ``lpa-pc@layer1+layer2``),
    with its options when it has some (``sagan@layer3{reduction=4}``)."""
    if attn in (None, BASELINE):
        return BASELINE
    extra = "{" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "}" if options else ""
    return f"{attn}@{'+'.join(sites)}{extra}"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than two values) of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return NAN, NAN
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, NAN
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class Paired:
    """The mean paired difference (configuration minus baseline) over ``n`` seeds, its ``level`` t-interval
    ``[low, high]`` (NaN with fewer than two pairs), and the verdict read off that interval."""

    n: int
    mean: float
    low: float
    high: float
    verdict: str


def paired_difference(values: Mapping[Any, float], baseline: Mapping[Any, float], level: float = LEVEL) -> Paired:
    """``values[seed] - baseline[seed]`` over the seeds both have, with its t-interval (``scipy.stats.t``)."""
    diffs = [values[k] - baseline[k] for k in values if k in baseline
             if math.isfinite(values[k]) and math.isfinite(baseline[k])]
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return Paired(len(diffs), mean, NAN, NAN, NO_EVIDENCE)
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half, verdict(mean - half, mean + half))


def verdict(low: float, high: float) -> str:
    """``better`` when the whole interval is above 0, ``worse`` when below, else ``no evidence``."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_EVIDENCE


def pareto_front(scores: Sequence[float], costs: Sequence[float]) -> list[bool]:
    """Whether each point is on the front of high score and low cost: no other point scores as well or better at
    a cost as low or lower, and strictly better in one of the two. Points with a NaN are never on it."""
    ok = [math.isfinite(s) and math.isfinite(c) for s, c in zip(scores, costs)]
    return [ok[i] and not any(ok[j] and scores[j] >= scores[i] and costs[j] <= costs[i]
                              and (scores[j] > scores[i] or costs[j] < costs[i]) for j in range(len(scores)))
            for i in range(len(scores))]


def decisive_map(maps: Mapping[str, Mapping[str, Any]] | None) -> tuple[str | None, float, float]:
    """The map with the largest share of the decision in a run's ``maps`` record, its share and its pointing game
    (NaN when the data has no boxes)."""
    scored = [(name, m) for name, m in (maps or {}).items() if m.get("share") is not None]
    if not scored:
        return None, NAN, NAN
    name, m = max(scored, key=lambda kv: kv[1]["share"])
    pointing = m.get("pointing")
    return name, float(m["share"]), NAN if pointing is None else float(pointing)


@dataclass
class Row:
    """One configuration of the leaderboard: its numbers over its seeds, against the baseline."""

    config: str
    seeds: int  # complete runs, the n of every mean
    failed: int
    pruned: int
    pending: int
    accuracy: float
    accuracy_std: float
    valid_loss: float
    valid_loss_std: float
    map: str | None
    pointing: float
    share: float
    params: float
    time_per_epoch: float
    pairs: int = 0
    difference: float = NAN  # accuracy minus the baseline's, paired by seed
    low: float = NAN
    high: float = NAN
    verdict: str = ""
    pareto: bool = False
    lr: float | None = None  # the best run's, when the learning rate was sampled
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: NaN is null."""
        return strict_json(asdict(self))


def leaderboard(results: Sequence[Mapping[str, Any]], baseline: str = BASELINE, paired: bool = True) -> list[Row]:
    """One ``Row`` per configuration, best mean accuracy first; each against ``baseline`` paired by seed (unless
    ``paired`` is False: runs that differ in more than the seed, such as sampled learning rates), and marked when
    on the Pareto front of mean accuracy against parameters."""
    configs = list(dict.fromkeys(r["config"] for r in results))
    done = {c: [r for r in results if r["config"] == c and r["state"] == "complete"] for c in configs}
    base = {r["seed"]: r["accuracy"] for r in done.get(baseline, [])}
    rows = []
    for c in configs:
        runs, states = done[c], Counter(r["state"] for r in results if r["config"] == c)
        acc, acc_std = mean_std(r["accuracy"] for r in runs)
        loss, loss_std = mean_std(r["valid_loss"] for r in runs)
        names = Counter(r.get("map") for r in runs if r.get("map"))
        best = max(runs, key=lambda r: r["accuracy"], default=None)

        def mean(key: str) -> float:
            return mean_std(r.get(key, NAN) for r in runs)[0]  # noqa: B023 (called in this iteration)

        row = Row(c, len(runs), states["failed"], states["pruned"], states["pending"], acc, acc_std, loss, loss_std,
                  names.most_common(1)[0][0] if names else None, mean("pointing"), mean("share"), mean("params"),
                  mean("time_per_epoch"), lr=best.get("lr") if best is not None else None,
                  errors=tuple(dict.fromkeys(r["error"] for r in results if r["config"] == c and r.get("error"))))
        if c == baseline:
            row.verdict = "baseline"
        elif paired and base:
            d = paired_difference({r["seed"]: r["accuracy"] for r in runs}, base)
            row.pairs, row.difference, row.low, row.high, row.verdict = d.n, d.mean, d.low, d.high, d.verdict
        rows.append(row)
    for row, on in zip(rows, pareto_front([r.accuracy for r in rows], [r.params for r in rows])):
        row.pareto = on
    return sorted(rows, key=lambda r: (math.isnan(r.accuracy), -r.accuracy if not math.isnan(r.accuracy) else 0))


ROW_HEADERS = ["config", "seeds", "accuracy", "valid loss", "map (share)", "pointing", "params", "s/epoch",
               "vs none (95% CI)", "verdict"]


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _count(n: float) -> str:
    if math.isnan(n):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def row_cells(row: Row) -> list[str]:
    """A leaderboard row as text, under ``ROW_HEADERS``: the same cells in the terminal, the HTML and compare."""
    ended = [f"{n} {what}" for n, what in ((row.failed, "failed"), (row.pruned, "pruned"), (row.pending, "pending"))
             if n]
    if math.isnan(row.difference):
        versus = "-"
    elif math.isnan(row.low):
        versus = f"{row.difference:+.4f} ({row.pairs} pair{'s' * (row.pairs != 1)})"
    else:
        versus = f"{row.difference:+.4f} [{row.low:+.4f}, {row.high:+.4f}]"
    decisive = f"{row.map} ({row.share:.2f})" if row.map and not math.isnan(row.share) else row.map or "-"
    lr = f", lr {row.lr:.3g}" if row.lr is not None else ""
    return [("★ " if row.pareto else "") + row.config, f"{row.seeds}" + (f" ({', '.join(ended)})" if ended else ""),
            _pm(row.accuracy, row.accuracy_std) + lr, _pm(row.valid_loss, row.valid_loss_std), decisive,
            "-" if math.isnan(row.pointing) else f"{row.pointing:.3f}", _count(row.params),
            "-" if math.isnan(row.time_per_epoch) else f"{row.time_per_epoch:.1f}", versus, row.verdict or "-"]
