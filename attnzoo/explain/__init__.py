"""Explanation: where a trained model looks, and how far to trust it.

- ``cams``: CAMs through pytorch-grad-cam, deletion/insertion curves, ROAD, the randomised model;
- ``metrics``: localisation and faithfulness scores (numpy and torch only); ``boxes``: ``boxes.csv``;
- ``trust``: each map's share of the decision;
- ``figures``: images with their attention maps; ``charts``: plots of numbers;
- ``report``: the score table and ``report.html``; ``page``: the pieces of attnzoo's HTML pages;
- ``stats``: statistics over seeds (mean ± std, the paired interval against the baseline, its verdict, the Pareto
  front), for a sweep's leaderboard and ``compare``;
- ``interpret``, ``show_attention``, ``compare``: what the commands of those names do.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The names of attnzoo 0.1's ``attnzoo.explain`` module, which is ``attnzoo.explain.cams`` now."""
    cams = importlib.import_module(".cams", __name__)
    if hasattr(cams, name):
        return getattr(cams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
