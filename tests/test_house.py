"""The house rules a newcomer can rely on: short functions, no import cycles, no private names across files, one
home for the run folder's file names, one declaration of the fit settings."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import attnzoo

PACKAGE = Path(attnzoo.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names."""
    if not node.level:
        return node.module or ""
    base = module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_function_is_longer_than_80_lines_and_fit_orchestrates_in_60():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
                if path.name == "fit.py" and node.name == "_train":
                    assert lines <= 60, f"fit's orchestration is {lines} lines"
    assert not long, long


def _module_imports() -> dict[str, set[str]]:
    """attnzoo module -> the attnzoo modules it imports when it is imported (top level, not inside functions)."""
    graph: dict[str, set[str]] = {}
    known = {module_name(p) for p in SOURCES}
    for path in SOURCES:
        deps = graph.setdefault(module_name(path), set())
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                target = resolve(path, node)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in known else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        deps &= known
        deps.discard(module_name(path))
    return graph


def test_the_package_has_no_import_cycles():
    graph = _module_imports()
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(name):], name]))
        if name in done:
            return
        for dep in graph.get(name, ()):
            # a package's __init__ imports its submodules' names lazily; importing a submodule runs the __init__
            visit(dep, [*trail, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_no_private_name_is_imported_from_another_file():
    found = []
    root = PACKAGE.parent
    for path in [*SOURCES, *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and resolve(path, node).startswith("attnzoo"):
                found += [f"{path.name}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


RUN_FOLDER_NAMES = ("attnzoo.json", "model.safetensors", "history.csv", "skipped.txt", ".attnzoo-lock",
                    "last.safetensors", "best.safetensors", "report.html", "confusion_matrix.png", "top_losses.png",
                    "attention_gradcam.png", "leaderboard.csv", "leaderboard.json", "leaderboard.png")


def _literal_strings(tree: ast.AST) -> list[ast.Constant]:
    """The string constants of a module that are values, not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_the_run_folders_file_names_are_spelled_in_one_module():
    homes = {"runs/folder.py", "runs/sweep.py"}  # the run folder's, and the sweep folder's own names
    found = []
    for path in SOURCES:
        where = str(path.relative_to(PACKAGE))
        if where in homes:
            continue
        for node in _literal_strings(ast.parse(path.read_text())):
            found += [f"{where}:{node.lineno}: {name}" for name in RUN_FOLDER_NAMES
                      if node.value == name or node.value.endswith("/" + name)]
    assert not found, found


def test_each_fit_setting_is_one_declaration_that_the_cli_the_api_and_the_schema_follow():
    import typer

    from attnzoo.cli import app
    from attnzoo.runs.folder import Request
    from attnzoo.train.settings import DEFAULTS, FitConfig, cli_settings, flag

    declared = {f.name: f for f in dataclasses.fields(FitConfig)}
    command = typer.main.get_command(app).commands["fit"]
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in p.opts}
    for s in cli_settings():
        option = options[flag(s.name)]
        assert option.help == declared[s.name].metadata["help"]
        meta_default = declared[s.name].metadata["cli_default"]
        assert option.default == (DEFAULTS[s.name] if meta_default is dataclasses.MISSING else meta_default)
    assert {s.name for s in cli_settings()} == {n for n, f in declared.items() if f.metadata["on_cli"]}
    assert set(Request.model_fields) == {n for n, f in declared.items() if f.metadata["requested"]}
    hints = typing.get_type_hints(FitConfig)
    for name in Request.model_fields:
        assert Request.model_fields[name].annotation == typing.Optional[hints[name]]  # noqa: UP045
    assert all(name in (FitConfig.__doc__ or "") for name in declared)  # the docstring lists every setting
    cli_only = {p.name for p in command.params} - {s.param for s in cli_settings()} - {"help"}
    assert not cli_only, f"options of fit not declared in FitConfig: {cli_only}"


def test_old_module_paths_still_import_the_same_objects():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from attnzoo.learner import attention_learner, fit
        from attnzoo.run import RunFolder, load_run
        from attnzoo.trust import decision_shares
    from attnzoo.explain.trust import decision_shares as moved
    from attnzoo.runs.folder import RunFolder as home
    from attnzoo.runs.predict import load_run as loader
    from attnzoo.train.fit import fit as fitter
    from attnzoo.train.learner import attention_learner as learner

    assert (RunFolder, load_run, decision_shares, fit, attention_learner) == (home, loader, moved, fitter, learner)
    with pytest.warns(DeprecationWarning, match="attnzoo.viz moved to attnzoo.explain.figures"):
        import importlib
        import sys

        sys.modules.pop("attnzoo.viz", None)
        importlib.import_module("attnzoo.viz")
