"""The docs cannot go stale: every code block in docs/*.md and README.md runs here, the generated tables name every
command, module and setting, every figure states the versions it was measured with (checked against the installed
ones unless marked older), and the site builds strictly (slow; CI also builds it before the tests).

A Python block runs as written, in a fresh folder, unless an HTML comment right above it gives cheap stand-ins
(and ``slow`` there marks the block's test slow: ``.ci/run`` runs those too):

    <!-- test: "resnet50" -> "test_resnet", "runs/my-run" -> "{run}" -->

Each OLD must appear in the block. ``{run}`` is a trained run folder (the session's ``tiny_run``), ``{folder}`` an
image folder (``tiny_folder``), ``{image}`` one of its validation images. A shell block's ``attnzoo`` command lines
(also after ``torchrun ... -m attnzoo`` and ``accelerate launch ... -m attnzoo``) are parsed by the real command, so a
wrong command or option fails; the cheap ones also run. Any other program must be in ``OTHER_PROGRAMS``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
STAND_IN = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')
SHELL = {"bash", "sh", "shell", "console"}

# Programs the docs may show besides attnzoo, and what the test checks of them.
OTHER_PROGRAMS = {
    "pip": "installs: only `pip install -e ...` of this repository's own folders",
    "pytest": "the test command itself",
    "grep": "filters attnzoo's plain-text output",
    "accelerate": "`accelerate config` (its launches are parsed as attnzoo commands)",
    "python": "`python benchmarks/<script>.py`: the script must exist",
    "hf": "`hf auth login`, huggingface_hub's own login (a token for `attnzoo push`)",
    "optuna-dashboard": "opens a sweep's study: its argument must be a study storage attnzoo names",
}


@cache
def hooks() -> types.ModuleType:
    """docs/hooks.py, the generators the site build uses."""
    spec = importlib.util.spec_from_file_location("attnzoo_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    stand_ins: list[tuple[str, str]] = field(default_factory=list)
    slow: bool = False

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, and its indented blocks (language ``shell``: only the README has them)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            indent, fence, lang = m.groups()
            end = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == fence)
            text = "\n".join(line[len(indent):] for line in lines[i + 1 : end])
            above = _comments_above(lines, i)
            stand_ins = [pair for c in above for pair in STAND_IN.findall(c)]
            slow = any(re.search(r"\bslow\b", STAND_IN.sub("", c)) for c in above)
            blocks.append(Block(page, i + 1, lang or "(none)", text, stand_ins, slow))
            i = end + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(Block(page, i + 1, "shell", "\n".join(line[4:] for line in lines[i:end])))
            i = end
        else:
            i += 1
    return blocks


def _comments_above(lines: list[str], fence: int) -> list[str]:
    """The ``<!-- test: ... -->`` comments right above line ``fence``."""
    out, k = [], fence - 1
    while k >= 0 and lines[k].strip().startswith("<!-- test:"):
        out.append(lines[k])
        k -= 1
    return out


BLOCKS = [b for page in PAGES for b in code_blocks(page)]


def of(*langs: str) -> list:
    return [pytest.param(b, id=str(b), marks=[pytest.mark.slow] if b.slow else []) for b in BLOCKS if b.lang in langs]


def test_every_code_block_is_of_a_kind_this_file_runs():
    unknown = [f"{b}: {b.lang}" for b in BLOCKS if b.lang not in {"python", "csv", "toml", "shell", *SHELL}]
    assert not unknown, f"code blocks no test runs (give them a language this file knows): {unknown}"


# --- Python ---------------------------------------------------------------------------------------------------

@pytest.fixture
def scratch_registry():
    """Modules a block registers are gone after it (every module is found first: the plugin manager finds each one
    once, so one found and then dropped would be lost)."""
    import attnzoo
    from attnzoo.model import registry

    attnzoo.list_attention()
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.mark.parametrize("block", of("python"))
def test_python_block_runs(block, tmp_path, monkeypatch, request, scratch_registry):
    code = block.text
    for old, new in ((json.loads(f'"{a}"'), json.loads(f'"{b}"')) for a, b in block.stand_ins):
        assert old in code, f"{block}: the stand-in for {old!r} no longer matches the block"
        if "{run}" in new:
            new = new.replace("{run}", str(request.getfixturevalue("tiny_run")))
        if "{folder}" in new or "{image}" in new:
            folder = request.getfixturevalue("tiny_folder")
            image = sorted((folder / "valid").rglob("*.png"))[0]
            new = new.replace("{folder}", str(folder)).replace("{image}", str(image))
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    # a module of its own, so that classes the block defines pickle (check_attention pickles the module it checks)
    module = types.ModuleType(f"docs_block_{block.page.stem}_{block.line}".replace("-", "_"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(block), "exec"), module.__dict__)


# --- shell ----------------------------------------------------------------------------------------------------

def command_lines(block: Block) -> list[tuple[str, list[str]]]:
    """Each command of a shell block, as (the line, its words): continuation lines joined, comments dropped,
    pipelines and lists split, leading ``NAME=value`` assignments dropped."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    out = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word in {"|", "||", "&&", ";", "&"}:
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    out.append((line, words))
                words = []
            else:
                words.append(word)
    return out


def attnzoo_args(words: list[str]) -> list[str] | None:
    """The arguments given to attnzoo by a command line (also through ``python -m``, torchrun or accelerate)."""
    if words[0] == "attnzoo":
        return words[1:]
    for k in range(len(words) - 1):
        if words[k] == "-m" and words[k + 1] == "attnzoo":
            if words[0] in ("torchrun", "python") or words[:2] == ["accelerate", "launch"]:
                return words[k + 2:]
    return None


def parse(args: list[str]) -> None:
    """Parse a command line with attnzoo's click command: an unknown command, option or wrong value type raises."""
    from attnzoo.cli import click_command

    group = click_command()
    at = next((k for k, a in enumerate(args) if not a.startswith("-")), len(args))
    ctx = group.make_context("attnzoo", args[: at + 1], resilient_parsing=False)
    name, command, _ = group.resolve_command(ctx, args[at : at + 1])
    command.make_context(name, args[at + 1 :], parent=ctx, resilient_parsing=False)


def cheap(args: list[str]) -> bool:
    """Commands that take a second or two: these run, the others are parsed."""
    if args[:1] in (["--help"], ["--version"]) or "--help" in args:
        return True
    name = next((a for a in args if not a.startswith("-")), None)
    return name in ("list", "plugins", "doctor") or (name == "layers" and args[-1].startswith("test_"))


def check_other(block: Block, line: str, words: list[str]) -> None:
    program = words[0]
    assert program in OTHER_PROGRAMS, f"{block}: '{line}' runs {program}, which no test checks (OTHER_PROGRAMS)"
    if program == "pip":
        assert words[1:3] == ["install", "-e"], f"{block}: {line}"
        for target in words[2:]:
            if target != "-e":
                assert (ROOT / target.split("[")[0].strip("\"'")).is_dir(), f"{block}: {line}: no folder {target}"
    elif program == "python":
        assert (ROOT / words[1]).is_file() and words[1].startswith("benchmarks/"), f"{block}: {line}"
    elif program == "accelerate":
        assert words[1:] == ["config"], f"{block}: {line}"
    elif program == "hf":
        assert words[1:] == ["auth", "login"], f"{block}: {line}"
    elif program == "optuna-dashboard":
        from attnzoo.runs.folder import JOURNAL

        assert len(words) == 2 and (words[1].endswith("/" + JOURNAL) or "://" in words[1]), f"{block}: {line}"


@pytest.mark.parametrize("block", of("shell", *SHELL))
def test_shell_block_commands_parse_and_the_cheap_ones_run(block, capsys, monkeypatch, tmp_path):
    from attnzoo.cli import main

    monkeypatch.chdir(tmp_path)
    commands = command_lines(block)
    assert commands, f"{block}: an empty shell block"
    for line, words in commands:
        args = attnzoo_args(words)
        if args is None:
            check_other(block, line, words)
            continue
        if not cheap(args):
            try:
                parse(args)
            except Exception as e:
                pytest.fail(f"{block}: '{line}' does not parse: {type(e).__name__}: {e}")
            continue
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        out, err = capsys.readouterr()
        assert e.value.code == 0, f"{block}: '{line}' exited {e.value.code}: {err[-400:]}"
        if "--json" in args:
            json.loads(out)


# --- other blocks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", of("csv"))
def test_csv_blocks_are_boxes_files_attnzoo_reads(block, tmp_path):
    from attnzoo.explain.boxes import read_boxes

    (tmp_path / "boxes.csv").write_text(block.text + "\n")
    assert read_boxes(tmp_path), f"{block}: no box read"


@pytest.mark.parametrize("block", of("toml"))
def test_toml_blocks_declare_the_bundled_plugins_entry_points_as_they_are(block):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    shown = tomllib.loads(block.text)["project"]["entry-points"]["attnzoo.attention"]
    declared = {}
    for pyproject in (ROOT / "plugins").glob("*/pyproject.toml"):
        declared.update(tomllib.loads(pyproject.read_text())["project"]["entry-points"]["attnzoo.attention"])
    assert shown and all(declared.get(name) == target for name, target in shown.items()), (block, declared)


# --- generated tables -----------------------------------------------------------------------------------------

def test_the_command_reference_names_every_command_and_option():
    from attnzoo.cli import click_command

    reference = hooks().cli_reference()
    for name, command in click_command().commands.items():
        assert f"### `attnzoo {name}`" in reference
        for param in command.params:
            if param.param_type_name == "option":
                assert all(opt in reference for opt in param.opts), (name, param.opts)
    assert "`--top <int>` | `3`" in reference  # show-attention and predict take --top


def test_the_module_table_names_every_registered_module_with_the_bundled_plugins():
    import attnzoo

    table = hooks().module_table()
    names = attnzoo.list_attention()
    assert {"lpa-pc", "sagan", "simam", "timm-cbam"} <= set(names)
    assert all(f"| `{name}` |" in table for name in names)


def test_the_settings_table_names_every_fit_setting():
    from dataclasses import fields

    from attnzoo.train.settings import FitConfig, cli_settings, flag

    table = hooks().settings_table()
    assert all(f"| `{f.name}` |" in table for f in fields(FitConfig))
    assert all(flag(s.name) in table for s in cli_settings())


def test_every_marker_in_the_pages_renders_and_the_generated_tables_are_used():
    used = set()
    for page in PAGES:
        text = page.read_text()
        used |= {m[1] for m in hooks().MARKER.finditer(text)}
        rendered = hooks().render(text)
        assert "<!-- attnzoo:" not in rendered, page
    assert {"cli", "modules", "settings"} <= used


def test_test_tallies_count_parametrized_cases():
    from badfiles import KINDS

    assert hooks().list_length("tests/badfiles.py", "KINDS") == len(KINDS)
    assert hooks().count_tests("tests/test_run.py") > hooks().list_length("tests/test_run.py", "FORGED")


# --- measured figures -----------------------------------------------------------------------------------------

def installed(package: str) -> str:
    return importlib.metadata.version(package).split("+")[0]


def measured_lines() -> list[tuple[Path, int, str]]:
    return [(page, n, line) for page in PAGES for n, line in enumerate(page.read_text().splitlines(), 1)
            if re.match(r"\W*measured on", line, re.IGNORECASE)]


def test_every_measured_line_has_the_fixed_shape_and_the_installed_versions_or_says_it_is_older():
    lines = measured_lines()
    assert lines
    for page, n, line in lines:
        parsed = hooks().measured_versions(line)
        assert parsed is not None, f"{page.name}:{n}: not the shape of a measured line: {line}"
        versions, older = parsed
        assert {"torch", "attnzoo"} <= set(versions), f"{page.name}:{n}: name torch and attnzoo at least"
        if older is None:
            stale = {p: (v, installed(p)) for p, v in versions.items() if installed(p) != v}
            assert not stale, (f"{page.name}:{n}: measured with {stale} (stated, installed): re-measure, or mark "
                               f"it '(older: ...)'")


def test_every_table_of_measurements_is_under_a_measured_line():
    missing = []
    for page in PAGES:
        since_heading: list[str] = []
        in_fence, in_table = False, False
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if FENCE.match(line):
                in_fence = not in_fence
            if in_fence:
                continue
            if line.startswith("#"):
                since_heading = []
            is_row = line.startswith("|")
            if is_row and not in_table:
                rows = _table_at(lines, n)
                if any(re.search(r"\d", r) for r in rows[2:]) and not any(
                        hooks().MEASURED.match(x.strip()) for x in since_heading):
                    missing.append(f"{page.name}:{n}")
            in_table = is_row
            since_heading.append(line)
    assert not missing, f"tables of numbers without a measured line above them in their section: {missing}"


def _table_at(lines: list[str], n: int) -> list[str]:
    lines = lines[n - 1:]
    return lines[: next((k for k, x in enumerate(lines) if not x.startswith("|")), len(lines))]


# --- links and the build --------------------------------------------------------------------------------------

def test_the_readme_is_short_and_its_links_to_the_docs_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    links = re.findall(r"\]\((?!https?://)([^)#]+)", text)
    assert links and all((ROOT / link).is_file() for link in links), links
    assert {p.name for p in (ROOT / "docs").glob("*.md")} - {Path(link).name for link in links} <= {"index.md"}


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "attnzoo show-attention" in page and "--top" in page
    print(f"mkdocs build --strict: {time.monotonic() - start:.1f} s")
