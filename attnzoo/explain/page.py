"""The pieces of attnzoo's self-contained HTML pages (``report.html``, ``leaderboard.html``): one style sheet,
tables, and figures embedded as data URIs, so that a page is one file that can be mailed or archived."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.lead{font-size:1.08em;color:#444} .note{background:#f6f8fa;border-left:4px solid #4a7bd0;padding:.6em 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .7em;text-align:left} th{background:#f3f3f3}
td:not(:first-child){font-variant-numeric:tabular-nums}
figure{margin:.8em 0} img{max-width:100%;height:auto;border:1px solid #eee}
.wide{overflow-x:auto} table.scores{font-size:.84em} table.scores th{font-weight:600}
table.scores tbody th{white-space:nowrap} tr.baseline{color:#666;font-style:italic}
.flag{background:#c62828;color:#fff;border-radius:3px;padding:0 .4em;margin-right:.3em;font-size:.85em}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.85em} .muted{color:#777;font-size:.9em}
"""


def data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts_table(rows: Sequence[Sequence[Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def figure(path: str | Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="{data_uri(path)}"></figure>'


def page(title: str, body: Sequence[str], footer: str) -> str:
    """A whole page: ``body`` is HTML, ``title`` and ``footer`` are text."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", *[p for p in body if p],
        f'<p class="muted">{html.escape(footer)}</p></body></html>'])
