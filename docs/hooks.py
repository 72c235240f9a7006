"""The docs' generated parts, and the MkDocs hook that puts them into the pages.

A page names what it shows with a marker, an HTML comment on a line of its own or inside a sentence:

    <!-- attnzoo:cli -->                         every command: usage, arguments, options (the typer app)
    <!-- attnzoo:modules -->                     every attention module: kind, source, summary, options, paper
    <!-- attnzoo:settings -->                    every fit setting (the one declaration, ``FitConfig``)
    <!-- attnzoo:tests tests/test_hostile.py --> how many test cases a test file holds (parametrized ones counted)
    <!-- attnzoo:len tests/badfiles.py KINDS --> how many items a list in a file holds

``render(markdown)`` replaces them; the build calls it for every page (``on_page_markdown``) and
``tests/test_docs.py`` calls the same functions, so a table in the docs is what the code says at build time.
Figures carry a line saying where they were measured (``MEASURED``); the tests check its versions.

Heavy imports (attnzoo, typer, timm through the plugins) happen inside the generators.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*attnzoo:([a-z]+)((?:\s+[^\s>]+)*)\s*-->")

# The one shape of the line under a figure or a table of measurements, e.g.
#   *Measured on 2 CPU cores (AMD EPYC, x86_64), no GPU, with torch 2.14.1, timm 1.0.31, attnzoo 0.1.0.*
# and, for a figure that was not re-run with the versions installed now:
#   *Measured on ..., with torch 2.15.0, attnzoo 0.1.0 (older: not re-run since attnzoo 0.1's reorganisation).*
MEASURED = re.compile(
    r"^\*Measured on (?P<machine>.+?), with (?P<versions>[a-z][\w.-]* [0-9][\w.+]*(?:, [a-z][\w.-]* [0-9][\w.+]*)*)"
    r"(?: \(older: (?P<older>[^)]+)\))?\.\*$")


def measured_versions(line: str) -> tuple[dict[str, str], str | None] | None:
    """``({package: version}, why it is older or None)`` of a measured line, or None if ``line`` is not one."""
    m = MEASURED.match(line.strip())
    if m is None:
        return None
    versions = dict(item.rsplit(" ", 1) for item in m["versions"].split(", "))
    return versions, m["older"]


def _text(text: Any) -> str:
    """Plain text as markdown: ``<``, ``>``, ``*`` and ``_`` escaped outside code spans (a summary's ``<l, g>`` is
    not an HTML tag, ``2**32`` is no emphasis)."""
    parts = str(text).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([\\*_])", r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: Any) -> str:
    """Table-cell markdown: one line, no bare pipe (a pipe inside a code span is the table's business already)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(p.replace("|", "\\|") if i % 2 == 0 else p for i, p in enumerate(parts))


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text: Any) -> str:
    text = str(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def cli_reference() -> str:
    """Every command of the typer app, as ``attnzoo COMMAND --help`` shows it, in one markdown section each."""
    import typer

    from attnzoo.cli import click_command

    group = click_command()
    root = typer.Context(group, info_name="attnzoo")
    out = [f"### `attnzoo`\n\n{_text(group.help)}\n\nUsage: `attnzoo [OPTIONS] COMMAND [ARGS]...`\n",
           _options(group, root)]
    for name, command in group.commands.items():
        ctx = typer.Context(command, info_name=name, parent=root)
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        usage = " ".join(["attnzoo", name, "[OPTIONS]", *(_argument(p) for p in arguments)])
        out.append(f"### `attnzoo {name}`\n\n{_text(command.help.strip())}\n\nUsage: `{usage}`\n")
        if arguments:
            out.append(_table(["argument", "help"], [[_code(_argument(p)), _text(p.help or "")] for p in arguments])
                       + "\n")
        out.append(_options(command, ctx))
    return "\n".join(out)


def _argument(param: Any) -> str:
    name = (param.metavar or param.name.upper()).strip("{}") + ("..." if param.nargs == -1 else "")
    return name if param.required else f"[{name}]"


def _options(command: Any, ctx: Any) -> str:
    rows = []
    for p in command.params:
        if p.param_type_name != "option":
            continue
        flag = getattr(p, "is_flag", False)
        if flag and p.secondary_opts:
            default = _code((p.opts if p.default else p.secondary_opts)[0])
        elif flag:
            default = "on" if p.default else "off"
        elif p.default is None or p.default == []:
            default = ""
        else:
            default = _code(p.default)
        repeatable = " Repeatable." if p.multiple and "repeatable" not in (p.help or "").lower() else ""
        rows.append([_code(p.get_help_record(ctx)[0]), default, _text(p.help or "") + repeatable])
    return _table(["option", "default", "help"], rows) + "\n"


def module_table() -> str:
    """Every registered attention module (built-ins and installed plugins) with its options, a table per source."""
    import attnzoo

    by_source: dict[str, list[list[str]]] = {}
    for name in attnzoo.list_attention():
        spec = attnzoo.get_attention(name)
        options = "<br>".join(_code(o.describe()) for o in spec.options.values()) or "none"
        paper = f" ([paper]({spec.paper}))" if spec.paper.startswith("http") else (
            f" ({_text(spec.paper)})" if spec.paper else "")
        by_source.setdefault(spec.source, []).append([_code(name), spec.kind, _text(spec.summary) + paper, options])
    out = []
    for source, rows in sorted(by_source.items(), key=lambda item: (item[0] != "attnzoo", item[0])):
        what = "built in" if source == "attnzoo" else "plugin"
        out.append(f"**`{source}`** ({what}, {len(rows)} module{'s' if len(rows) > 1 else ''})\n\n"
                   + _table(["name", "kind", "what it does", "options (`--attn-arg KEY=VALUE`)"], rows))
    return "\n\n".join(out)


def settings_table() -> str:
    """Every fit setting: its name in Python, its option on the command line, its defaults and help."""
    from dataclasses import fields

    from attnzoo.train.settings import DEFAULTS, FitConfig, cli_settings

    on_cli = {s.name: s for s in cli_settings()}
    rows = []
    for f in fields(FitConfig):
        cli = on_cli.get(f.name)
        option = _code(cli.decls[0].replace("/", " / ")) if cli else "Python only"
        differs = cli is not None and cli.default is not None and cli.default != DEFAULTS[f.name]
        rows.append([_code(f.name), option, _code(repr(DEFAULTS[f.name])), _code(cli.default) if differs else "",
                     "yes" if f.metadata["on_resume"] else "", _text(f.metadata["help"])])
    return _table(["setting", "option", "default", "command-line default, where different", "with `--resume`",
                   "what it is"], rows)


def count_tests(path: str) -> int:
    """The test cases in a test file, as pytest collects them: each ``test_*`` function once per parametrized case
    (a literal list of cases, or a top-level list or dict of the file named there, counts its items; any other
    expression counts as one case)."""
    tree = ast.parse((ROOT / path).read_text())
    named = _literals(tree)
    total = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            cases = 1
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize") and len(deco.args) > 1:
                    cases *= _items(deco.args[1], named)
            total += cases
    return total


def _literals(tree: ast.Module) -> dict[str, int]:
    """Top-level names bound to a literal list, tuple, set or dict, and how many items each holds."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(node.value, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                    out[target.id] = len(node.value.keys if isinstance(node.value, ast.Dict) else node.value.elts)
    return out


def _items(cases: ast.expr, named: dict[str, int]) -> int:
    if isinstance(cases, (ast.List, ast.Tuple, ast.Set)):
        return len(cases.elts)
    if isinstance(cases, ast.Call) and isinstance(cases.func, ast.Attribute) and not cases.args:
        cases = cases.func.value  # FORGED.values(), FORGED.items()
    return named.get(cases.id, 1) if isinstance(cases, ast.Name) else 1


def list_length(path: str, name: str) -> int:
    """The items of a list, tuple or dict assigned to ``name`` at the top of a file."""
    named = _literals(ast.parse((ROOT / path).read_text()))
    if name not in named:
        raise ValueError(f"no literal list or dict {name} in {path}")
    return named[name]


GENERATORS: dict[str, Callable[..., Any]] = {
    "cli": cli_reference, "modules": module_table, "settings": settings_table, "tests": count_tests,
    "len": list_length,
}


def render(markdown: str) -> str:
    """``markdown`` with every marker replaced by what its generator gives now; an unknown marker is an error."""
    def replace(m: re.Match) -> str:
        kind, args = m[1], m[2].split()
        if kind not in GENERATORS:
            raise ValueError(f"unknown docs marker {m[0]!r}; known: {', '.join(GENERATORS)}")
        return str(GENERATORS[kind](*args))

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return render(markdown)
