"""The ``attnzoo`` command: a thin typer + rich layer over the Python API.

Heavy imports (torch, timm, fastai) happen inside the commands that need them, so ``--help`` is instant.
A mistake a user can make prints one red line and exits 2; ``--debug`` shows the traceback. A failure
inside training exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import AttnzooError, Interrupted, TrainingFailed, hide_import_noise
from .runs.outputs import printable

app = typer.Typer(
    name="attnzoo",
    help="Trainable attention for image classification: any attention module at any layer of any timm backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state: dict[str, Any] = {"debug": False, "json_out": None}


def _console(stderr: bool = False) -> Any:
    """A rich console that prints every string through ``printable``."""
    from rich.console import Console

    class SafeConsole(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)

    return SafeConsole(stderr=stderr, highlight=False)


def _emit_json(value: Any) -> None:
    """``value`` as JSON on the command's stdout (``_json_stdout``), whatever else was printed meanwhile."""
    from .runs.outputs import strict_json

    out = _state.get("json_out") or sys.stdout
    out.write(json.dumps(strict_json(value), indent=2, default=str, allow_nan=False) + "\n")
    out.flush()


@contextlib.contextmanager
def _json_stdout(argv: list[str]) -> Iterator[None]:
    """With ``--json``, stdout holds the JSON alone: anything else printed while the command runs (a plugin's
    print at import or in ``forward``, even from C) goes to stderr."""
    if "--json" not in argv:
        yield
        return
    out, saved = sys.stdout, None
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None  # not a real stream (captured): Python-level prints are all there is
    if fd is not None:
        out.flush()
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
        _state["json_out"] = os.fdopen(os.dup(saved), "w")
    else:
        _state["json_out"] = out
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = out
        if saved is not None:
            _state["json_out"].close()
            os.dup2(saved, fd)
            os.close(saved)
        _state["json_out"] = None


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"attnzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print attnzoo's version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _print_table(console: Any, title: str, columns: list[str], rows: list[list[Any]],
                 whole: tuple[str, ...] = (), markup: bool = False, records: bool = False) -> None:
    """A rich table on a terminal, whose first column and the ``whole`` ones (names, sites) never wrap mid-word;
    plain tab-separated lines (the title as a ``#`` line) when the output is a pipe or a file, so that
    ``attnzoo list | grep NAME`` sees every name whole. Cells and title are text (a file or class name may hold
    ``[...]``), or rich markup with ``markup=True``, whose caller escapes what is not. ``records``: a table of
    numbers, which folded into a narrow terminal would break every number: there, one block per row instead, a
    line per column."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if not markup:
        title, rows = escape(title), [[escape(str(v)) for v in r] for r in rows]

    if not console.is_terminal:
        def plain(v: Any) -> str:
            return Text.from_markup(printable(str(v))).plain.replace("\t", " ").replace("\n", "; ")

        for line in [f"# {plain(title)}", *("\t".join(map(plain, r)) for r in [columns, *rows])]:
            print(line, file=console.file)  # as it is: rich would expand the tabs
        return
    if records and _table_width(columns, rows) > console.width:
        _print_records(console, title, columns, rows)
        return
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                  min_width=min(len(Text.from_markup(title).plain), console.width))  # a narrow table folds its title
    for i, c in enumerate(columns):
        table.add_column(c, no_wrap=i == 0 or c in whole, overflow="fold")
    for r in rows:
        table.add_row(*[printable(str(v)) for v in r])
    console.print(table)


def _table_width(columns: list[str], rows: list[list[Any]]) -> int:
    """The terminal cells a table needs with no cell folded (rich's padding: one space either side of a column)."""
    from rich.cells import cell_len
    from rich.text import Text

    widths = [max(cell_len(Text.from_markup(str(v)).plain) for v in [c, *(r[i] for r in rows)])
              for i, c in enumerate(columns)]
    return sum(widths) + 2 * (len(widths) - 1)


def _print_records(console: Any, title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table too wide for the terminal as records: each row's first cell in bold, then its other cells, one per
    line, under their column's name."""
    from rich.markup import escape

    label = max(len(c) for c in columns[1:])
    console.print(title)
    for r in rows:
        console.print(f"\n[bold]{printable(str(r[0]))}[/]")
        for c, v in zip(columns[1:], r[1:]):
            console.print(f"  {escape(c):<{label}}  {printable(str(v))}")


# a run by folder or by name: str, not Path, which would fold "local-dir:./x" or "hf-hub:org//name"
RUN_HELP = ("a Hub model repo: hf-hub:ORG/NAME[@REVISION] (downloaded into the Hub cache; offline, a cached one "
            "loads), or local-dir:PATH (a folder read as one)")
RunOption = Annotated[str | None, typer.Option("--run", help=f"Run folder (default: the newest under ./runs), or "
                                                              f"{RUN_HELP}.")]

Threads = Annotated[str, typer.Option(help="Torch CPU threads: a number, or 'auto' for the cores no other job is "
                                           "using (one thread on a busy 2-core machine).")]


def _settings_options(names: Any = None) -> list[Any]:
    """The command's parameters for the fit settings (``train.settings.cli_settings``: one declaration), each a
    typer option with the setting's flag, type, default and help."""
    import inspect

    from .train.settings import cli_settings

    return [inspect.Parameter(s.param, inspect.Parameter.KEYWORD_ONLY, default=s.default,
                              annotation=Annotated[s.type, typer.Option(*s.decls, help=s.help)])
            for s in cli_settings() if names is None or s.name in names]


def _typed(ctx: typer.Context) -> dict[str, Any]:
    """The options typed on the command line, not their defaults (``--resume`` refuses any other setting, even
    one typed at its default value)."""
    return {n: v for n, v in ctx.params.items() if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}


def fit(ctx: typer.Context, **options: Any) -> None:
    """Train BACKBONE with attention ATTN on DATA and write a run folder (or --resume one)."""
    from .train.settings import FitConfig, from_cli

    given = from_cli(_typed(ctx))
    given.setdefault("threads", options["threads"])  # 'auto' unless typed: Python callers leave torch alone
    config = FitConfig.of(**given)  # every check that needs no torch, before torch is imported

    from .runs.folder import SKIPPED
    from .train.distributed import is_main
    from .train.fit import fit as fit_run

    console = _console()
    err = _console(stderr=True)
    example: list[Path] = []  # a validation image, for the hint at the end
    data_warnings: list[str] = []

    def on_data(info: Any, run_dir: Path) -> None:
        from rich.markup import escape

        example[:] = info.valid[:1]
        data_warnings[:] = info.warnings
        counts = info.counts()
        rows = [[escape(c), counts["train"][c], counts["valid"][c]] for c in info.classes]
        rows.append(["[bold]total", len(info.train), len(info.valid)])
        _print_table(console, f"data: {escape(str(info.root))} ({info.layout})", ["class", "train", "valid"], rows,
                     markup=True)
        for note in info.warnings:
            err.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
        if info.skipped:
            shown = escape("; ".join(f"{Path(p).name}: {r}" for p, r in info.skipped[:3]))
            more = f"; and {len(info.skipped) - 3} more" if len(info.skipped) > 3 else ""
            err.print(f"[yellow]warning:[/] skipped {len(info.skipped)} files that cannot be used ({shown}{more}); "
                      f"all listed in {run_dir / SKIPPED}", soft_wrap=True)

    try:
        run_dir = fit_run(config=config, console=err, on_data=on_data)
    except (AttnzooError, KeyboardInterrupt, Interrupted, TrainingFailed):
        raise
    except Exception as e:
        detail = str(e) or ("out of memory: try a lower --bs or --img-size" if isinstance(e, MemoryError) else
                            "(no message)")
        raise TrainingFailed(f"training failed: {type(e).__name__}: {detail}") from e
    if is_main():  # under torchrun / accelerate launch, rank 0 reports
        import shlex

        from rich.markup import escape

        from .runs.folder import RunFolder

        shown = set(data_warnings)
        for note in RunFolder.open(run_dir).record.get("warnings", []):  # what training found (a divergence, ...)
            if note not in shown:
                err.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
        run, image = shlex.quote(str(run_dir)), shlex.quote(str(example[0])) if example else "IMAGE"
        console.print(f"[green]run folder:[/] {escape(str(run_dir))}", soft_wrap=True)
        for what, command in (("see where it looks", f"attnzoo show-attention {image} --run {run}"),
                              ("score its maps", f"attnzoo interpret {run}")):
            console.print(f"next, {what}: {escape(command)}", soft_wrap=True)


def _command_with_settings(function: Any, settings: Any = None, **typer_kwargs: Any) -> None:
    """Register ``function(ctx, ..., **options)`` as a command whose options are its own parameters, then the fit
    settings (``settings``: the names to take, default all)."""
    import inspect

    own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    function.__signature__ = inspect.Signature([*own, *_settings_options(settings)])
    app.command(**typer_kwargs)(function)


_command_with_settings(fit)


def sweep(
    ctx: typer.Context,
    backbone: Annotated[str | None, typer.Option(help="Any timm model name. Required unless --join.")] = None,
    data: Annotated[str | None, typer.Option(help="Image folder (as for fit), or 'demo'. Required unless --join.")]
    = None,
    attn: Annotated[str | None, typer.Option(help="Attention modules to try, a comma list (`attnzoo list`); the "
                                                  "baseline 'none' is always trained too. Required unless --join.")]
    = None,
    at: Annotated[list[str] | None, typer.Option(help="A site set for every module: sites joined by commas; "
                                                      "repeat for several sets. 'auto': each module's default "
                                                      "sites, one level shallower and one deeper. Default: each "
                                                      "module's default sites.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per configuration (0 to N-1).")] = 3,
    lr: Annotated[str | None, typer.Option(help="Learning rate, 'auto', or a range LOW..HIGH that each trial "
                                                "samples on a log scale (then no verdict: the runs differ in more "
                                                "than the seed). Default: fit's.")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Stop hopeless trials after an epoch (Optuna's median "
                                                        "pruner); only with --lr LOW..HIGH.")] = False,
    jobs: Annotated[str, typer.Option(help="Worker processes on this machine, the cores split between them; "
                                           "'auto': two on a machine without a CUDA GPU (each on half the cores: "
                                           "1.3x the trials per minute of one, measured on 2 cores), else one.")]
    = "auto",
    out: Annotated[Path | None, typer.Option(help="The sweep folder (default runs/sweep-<backbone>-<data>): the "
                                                  "study's journal, one run folder per trial, the leaderboard. The "
                                                  "same command continues it.")] = None,
    storage: Annotated[str | None, typer.Option(help="The Optuna storage: an RDB URL (sqlite:///sweep.db, "
                                                     "postgresql://...) or a journal file on a shared disk "
                                                     "(default: a journal in the sweep folder).")] = None,
    study: Annotated[str | None, typer.Option(help="The study's name (default: the sweep folder's).")] = None,
    join: Annotated[str | None, typer.Option(help="Work on an existing sweep (a sweep folder or a storage), "
                                                  "with its own plan.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard as JSON.")] = False,
    **options: Any,
) -> None:
    """Train every module of ATTN at each site set, and the baseline, once per seed (an Optuna study), and rank
    them: mean ± std over seeds, the difference from 'none' paired by seed with its 95% interval and verdict."""
    from rich.markup import escape

    from .runs.sweep import sweep as run_sweep
    from .train.settings import from_cli

    typed = _typed(ctx)
    own = ("backbone", "data", "attn", "at", "seeds", "lr", "jobs", "out", "storage", "study", "join")
    given = {k: typed[k] for k in own if k in typed}
    given.setdefault("jobs", jobs)  # 'auto' unless typed: Python callers train in their own process
    settings = from_cli({k: v for k, v in typed.items() if k not in own})
    if prune:
        given["prune"] = True
    if join is None:
        settings.setdefault("threads", options["threads"])  # 'auto' unless typed, as for fit
    err = _console(stderr=True)

    def on_trial(e: Any) -> None:
        how = (f"accuracy {e.accuracy:.4f}" if e.state == "complete" else f"[red]{e.state}[/]: {escape(e.error or '')}")
        err.print(f"trial {e.done}/{e.total} [bold]{escape(e.config)}[/] seed {e.seed}: {how} "
                  f"({e.fit_seconds:.1f} s)", soft_wrap=True)

    board = run_sweep(**given, **settings, console=err, on_trial=on_trial)
    if as_json:
        _emit_json(board.to_dict())
        return
    _print_leaderboard(_console(), f"leaderboard of {board.folder} ({_counts(board.counts())})", board.rows)
    for row in board.rows:
        for reason in row.errors:
            err.print(f"[yellow]{escape(row.config)}:[/] {escape(reason)}", soft_wrap=True)
    err.print(f"[green]leaderboard:[/] {escape(str(board.files.get('html', board.folder)))}", soft_wrap=True)
    err.print(f"watch it: optuna-dashboard {escape(board.place.shown())}", soft_wrap=True)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials"


def _print_leaderboard(console: Any, title: str, rows: list[Any]) -> None:
    """A leaderboard (``explain.stats``) as a table: the sweep's, and compare's over seeds."""
    from .explain.stats import ROW_HEADERS, row_cells

    _print_table(console, title, ROW_HEADERS, [row_cells(r) for r in rows], whole=("verdict",), records=True)


def _sweep_settings() -> list[str]:
    from .runs.sweep import settings_names

    return settings_names()


_command_with_settings(sweep, _sweep_settings())


def _predict(images: list[Path], run: str | None, top: int, threads: str) -> tuple[Any, list, dict]:
    """The run (given, or the newest under ./runs), its top-k per image and the attention maps."""
    from .runs.folder import latest_run
    from .runs.outputs import existing_files
    from .runs.predict import load_run
    from .train.threads import use_threads

    if top < 1:
        raise AttnzooError(f"--top must be at least 1, got {top}")
    existing_files(images)
    use_threads(threads)
    r = load_run(run if run is not None else latest_run())
    probs, maps = r.predict(images)
    return r, r.top(probs, top), maps


@app.command("show-attention")
def show_attention(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    run: RunOption = None,
    out: Annotated[Path | None, typer.Option(help="Output PNG (one image) or folder (default: next to the run, "
                                                  "attention/<image>.png; ./attention/ for an hf-hub: or local-dir: "
                                                  "run); existing files are never replaced.")]
    = None,
    top: Annotated[int, typer.Option(help="Predictions to show.")] = 3,
    threads: Threads = "auto",
) -> None:
    """Predict IMAGES and write one PNG each: the image, top predictions and every site's attention map."""
    from .explain.show_attention import show_attention as show
    from .runs.folder import latest_run

    run_dir = run if run is not None else latest_run()
    written = show(run_dir, images, out, top, threads)  # bad input fails before the model loads
    cols = ["image", *(f"#{k + 1}" for k in range(len(written[0][1]))), "written"]
    rows = [[p.name, *(f"{c} {pr:.1%}" for c, pr in t), target.name] for p, t, target in written]
    folders = sorted({str(target.parent) for _, _, target in written})
    _print_table(_console(), f"predictions of {run_dir}, figures in {', '.join(folders)}", cols, rows,
                 whole=("written",))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    run: RunOption = None,
    top: Annotated[int, typer.Option(help="Predictions per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    threads: Threads = "auto",
) -> None:
    """Predict the class of IMAGES with a trained run."""
    r, tops, _ = _predict(images, run, top, threads)
    if as_json:
        _emit_json([{"image": str(p), "top": [{"class": c, "prob": round(v, 6)} for c, v in t]}
                          for p, t in zip(images, tops)])
        return
    cols = ["image", *(f"#{k + 1}" for k in range(len(tops[0])))]
    _print_table(_console(), f"predictions ({r.path})", cols,
                            [[p.name, *(f"{c} {v:.1%}" for c, v in t)] for p, t in zip(images, tops)])


@app.command("list")
def list_modules(
    pattern: Annotated[str, typer.Argument(help="Wildcard on names.")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Registered attention modules: kind, summary and options. Plugin problems are listed below the table."""
    import fnmatch

    from rich.markup import escape

    from .model.plugins import plugin_status, qualified_names
    from .model.registry import get_attention, list_attention

    # names a collision took away from the bare name are still usable as dist:name
    qualified = [q for q in qualified_names() if fnmatch.fnmatchcase(q.partition(":")[2], pattern)]
    specs = [get_attention(n) for n in list_attention(pattern) + qualified]
    if as_json:
        _emit_json([s.to_dict() for s in specs])
        return
    console = _console()
    rows = [[escape(str(v)) for v in (s.name, s.kind, s.source, s.summary,
                                      "\n".join(o.describe() for o in s.options.values()) or "-")]
            for s in specs]
    _print_table(console, "attention modules", ["name", "kind", "from", "summary", "options"], rows,
                 whole=("kind", "from"), markup=True)
    for st in plugin_status():
        if st.status != "ok":
            console.print(f"[yellow]plugin {escape(st.dist)} {st.status}:[/] {escape(st.reason)}", soft_wrap=True)


@app.command()
def layers(
    backbone: Annotated[str, typer.Argument(help="A timm model name.")],
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the backbone's).")] = None,
    all_sites: Annotated[bool, typer.Option("--all", help="Every site, not only blocks and feature levels.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Insertable sites of BACKBONE: channels, stride, map size, layout; default taps and gate site marked.

    Layout: NCHW, NHWC (channels last), or NLC tokens on the map's grid (+N prefix tokens such as the class
    token; 'unrolled': in the model's own token order). A gate sees NCHW whatever the layout."""
    from .model.sites import layers as get_layers

    sites = get_layers(backbone, img_size, all=all_sites)
    if as_json:
        _emit_json([s.to_dict() for s in sites])
        return
    rows = []
    for s in sites:
        marks = ", ".join(m for m, on in (("tap", s.default_tap), ("gate", s.default_gate)) if on)
        level = "" if s.level is None else str(s.level)
        rows.append([s.name, s.channels, s.stride, f"{s.size[0]}x{s.size[1]}", s.layout, level, marks])
    _print_table(_console(), f"{backbone}: sites ({'all' if all_sites else 'blocks and feature levels'})",
                            ["site", "channels", "stride", "map", "layout", "level", "default"], rows)


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Plugin distributions found through entry points, with what they provide and their status."""
    from dataclasses import asdict

    from rich.markup import escape

    from .model.plugins import plugin_status

    statuses = plugin_status()
    if as_json:
        _emit_json([asdict(st) for st in statuses])
        return
    rows = []
    for st in statuses:
        color = {"ok": "green", "failed": "red", "tampered": "red", "conflicting": "yellow",
                 "disabled": "dim"}.get(st.status, "white")
        status = f"[{color}]{st.status}[/]" + (f": {escape(st.reason)}" if st.reason else "")
        rows.append([escape(st.dist), escape(st.version), escape(", ".join(st.names)) or "-", status])
    _print_table(_console(), "attention plugins (entry point group attnzoo.attention)",
                 ["distribution", "version", "provides", "status"], rows, markup=True)


@app.command()
def interpret(
    run: Annotated[str, typer.Argument(help=f"Run folder, or {RUN_HELP}.")],
    data: Annotated[Path | None, typer.Option(help="Image folder (default: the data folder recorded in the run; "
                                                   "required for an hf-hub: or local-dir: run).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the plots and report.html (default: the run "
                                                  "folder; required for an hf-hub: or local-dir: run, which is "
                                                  "never written into).")] = None,
    n: Annotated[int, typer.Option(help="Images per figure (attention grid, top losses).")] = 6,
    deletion_images: Annotated[int, typer.Option(help="Validation images for the deletion and insertion "
                                                      "curves.")] = 100,
    cam: Annotated[list[str] | None, typer.Option(help="CAM method(s) from pytorch-grad-cam, repeatable or a comma "
                                                       "list: gradcam, hirescam, gradcam++, xgradcam, layercam, "
                                                       "scorecam, eigencam.")] = None,
    cam_at: Annotated[str, typer.Option(help="Where the CAMs look: 'final' (the final feature level) or 'sites' "
                                             "(each attention site).")] = "final",
    tolerance: Annotated[float, typer.Option(help="Pointing-game tolerance, in pixels of the original image.")]
    = 15.0,
    road_images: Annotated[int, typer.Option(help="Images for ROAD (0: skip; slow: a sparse solve per image).")]
    = 16,
    sanity_images: Annotated[int, typer.Option(help="Images for the sanity check (0: skip).")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print every score as JSON.")] = False,
    threads: Threads = "auto",
) -> None:
    """Explain a trained RUN on its validation images: attention maps and CAMs side by side, and every map scored:
    localisation against boxes.csv, deletion, insertion, ROAD, a sanity check; mistakes; one report.html."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .explain.cams import cam_methods
    from .explain.interpret import interpret_run
    from .explain.report import COLUMNS
    from .train.threads import use_threads

    for name, value in (("--n", n), ("--deletion-images", deletion_images)):
        if value < 1:
            raise AttnzooError(f"{name} must be at least 1, got {value}")
    cams = cam_methods(cam or ["gradcam"])
    use_threads(threads)
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("interpret", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = interpret_run(run, data=data, out=out, n=n, deletion_images=deletion_images, cams=cams,
                               cam_at=cam_at, tolerance=tolerance, road_images=road_images,
                               sanity_images=sanity_images, progress=progress)
    if as_json:
        _emit_json(result.to_dict())
        return
    console.print(f"validation accuracy {result.accuracy:.1%} on {result.n_images} images")
    if result.confused:
        _print_table(console, "most confused (actual -> predicted)", ["actual", "predicted", "images"],
                             [list(c) for c in result.confused])
    for note in result.notes:
        _console(stderr=True).print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    cols = [c for c in COLUMNS if any(v[c.key] == v[c.key] for v in result.table.values())]
    _print_table(console, "every map against every score (arrows: the better direction; see report.html)",
                 ["map", "kind", *[f"{c.label} {'↑' if c.higher else '↓'}" for c in cols], "flags"],
                 [[k, v["kind"], *["-" if v[c.key] != v[c.key] else f"{v[c.key]:.3f}" for c in cols],
                   ", ".join(v["flags"]) or "-"] for k, v in result.table.items()], records=True)
    console.print(f"[green]report:[/] {escape(str(result.files['report']))}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    out: Annotated[Path | None, typer.Option(help="Bar chart PNG, a new file (default: compare.png, or "
                                                  "compare-2.png... when taken).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare RUNS side by side: accuracy, loss, size, speed and localisation scores; writes a bar chart."""
    from rich.markup import escape

    from .explain.compare import compare as compare_runs

    rows, boards, written = compare_runs(runs, out)
    if as_json:
        _emit_json(rows)
        return

    def num(v: Any, digits: int = 3) -> str:
        return "-" if v is None or v != v else f"{v:.{digits}f}"

    console = _console()
    _print_table(console, "runs", ["run", "backbone", "attn", "sites", "accuracy", "valid loss", "params", "s/epoch"],
                         [[r["run"], r["backbone"], r["attn"], ", ".join(r["sites"]) or "-", num(r["accuracy"]),
                           num(r["valid_loss"]), "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M",
                           num(r["time_per_epoch"], 1)] for r in rows], records=True)
    if any(r["best_site"] or r["best_cam"] for r in rows):
        _print_table(console, "pointing game / energy in box of the best attention map and the best CAM "
                              "(`attnzoo interpret` scores a run)",
                     ["run", "best site", "pointing", "energy", "best CAM", "pointing", "energy", "random pointing",
                      "flagged"],
                     [[r["run"], r["best_site"] or "-", num(r["pointing"]), num(r["energy"]), r["best_cam"] or "-",
                       num(r["cam_pointing"]), num(r["cam_energy"]), num(r["random_pointing"]),
                       "; ".join(f"{k}: {', '.join(v)}" for k, v in r["flagged"].items()) or "-"] for r in rows],
                     records=True)
    for board in boards:
        _print_leaderboard(console, "over seeds: runs that differ only in their seed (each against none, paired by "
                                    "seed; `attnzoo sweep` makes such runs)", board)
    console.print(f"[green]chart:[/] {escape(str(written))}")


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check the environment: versions, torchvision's compiled ops, GPU, plugins; a fix for each problem.
    Exits 1 when a check fails."""
    from rich.markup import escape

    from .doctor import FAIL, run_checks

    checks = run_checks()
    if as_json:
        _emit_json([c.to_dict() for c in checks])
    else:
        colors = {"ok": "green", "warn": "yellow", "fail": "red"}
        rows = [[escape(c.name), f"[{colors[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix)]
                for c in checks]
        _print_table(_console(), "attnzoo doctor", ["check", "status", "detail", "fix"], rows, markup=True)
        bad = [c for c in checks if c.status != "ok"]
        _console().print("[green]all checks passed[/]" if not bad else
                         f"{len(bad)} problem(s): see the fix column")
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)


@app.command()
def export(
    run: Annotated[str, typer.Argument(help=f"Run folder, or {RUN_HELP}.")],
    format: Annotated[str, typer.Option(help="onnx (dynamo exporter, checked with onnxruntime), pt2 "
                                             "(torch.export), or hub (the run folder's Hub face: config.json and "
                                             "the model card, for runs older than it).")] = "onnx",
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="Add one attention map output per site.")] = True,
    out: Annotated[Path | None, typer.Option(help="File to write (default: <run name>.<format>); with --format "
                                                  "hub, a new folder for the Hub files (default: the run "
                                                  "folder itself).")] = None,
    threads: Threads = "auto",
) -> None:
    """Export a run for deployment, dynamic batch; checked against PyTorch before it is written. Or, with
    --format hub, make a run folder a Hub model repo (see `attnzoo push`)."""
    from rich.markup import escape

    from .runs.export import export as export_run

    result = export_run(run, out, format=format, maps=maps, threads=threads)
    if result.format == "hub":
        _console().print(f"[green]hub:[/] {escape(str(result.path))}  {', '.join(result.outputs)}", soft_wrap=True)
        return
    _console().print(f"[green]{result.format}:[/] {escape(str(result.path))}  outputs {', '.join(result.outputs)}; "
                     f"max |difference| from PyTorch {result.max_diff:.1e} at batch sizes "
                     f"{', '.join(map(str, result.batches))}")


@app.command()
def push(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub model repo, ORG/NAME or USER/NAME (made when missing).")],
    private: Annotated[bool, typer.Option("--private", help="Make a new repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Push to this branch (made when missing).")] = None,
    license: Annotated[str | None, typer.Option(help="License id for the model card (apache-2.0, mit, "
                                                     "cc-by-4.0, other...); kept for the next push.")] = None,
    add_commit: Annotated[bool, typer.Option("--add-commit", help="Push onto a repo that already holds files, "
                                                                  "as a new commit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Share a finished RUN as the Hugging Face Hub model repo REPO_ID: config.json, model.safetensors, the model
    card (README.md) and the figures, nothing else (never attnzoo.json, checkpoints or data). Needs a token
    (`hf auth login` or HF_TOKEN). Load it anywhere with --run hf-hub:REPO_ID."""
    from .runs.push import push as push_run

    pushed = push_run(run, repo_id, private=private, revision=revision, license=license, add_commit=add_commit)
    if as_json:
        _emit_json(pushed.to_dict())
        return
    console = _console()
    console.print(f"pushed {len(pushed.files)} files: {', '.join(pushed.files)}", soft_wrap=True)
    console.print(f"[green]{pushed.url}[/]", soft_wrap=True)
    console.print(f"load it with: attnzoo predict IMAGE --run hf-hub:{pushed.repo_id}", soft_wrap=True)


def click_command() -> Any:
    """The app as a click command, as ``attnzoo --help`` shows it (the docs' command reference is generated from
    it): its help without type placeholders on flags (``--json <bool>``) and with argument names in capitals
    (``IMAGES...``, not ``{images}...``)."""
    command = typer.main.get_command(app)
    for sub in [command, *getattr(command, "commands", {}).values()]:
        help_option = sub.get_help_option(typer.Context(sub))
        for param in [*sub.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.param_type_name == "argument" and param.metavar is None:  # IMAGES... -> {IMAGE}...
                param.metavar = (param.name.removesuffix("s") if param.nargs != 1 else param.name).upper()
    return command


def _usage_errors() -> tuple[type[Exception], ...]:
    """What the parser raises for a bad command line: typer >= 0.22 raises its own copy of click's exceptions
    (under ``typer.TyperException``), older typers raise click's."""
    classes: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:
        pass
    return tuple(classes)


def _one_line(e: BaseException) -> tuple[str, int]:
    """What to tell the user about ``e``, and the exit code."""
    if isinstance(e, typer.Abort):
        return "aborted", 130
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, (AttnzooError, TrainingFailed)):
        return str(e), 2 if isinstance(e, AttnzooError) else 1
    ctx = getattr(e, "ctx", None)  # a usage error: click's message, and where the help is
    hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return e.format_message().rstrip(".") + hint, e.exit_code


def _run_app(argv: list[str] | None = None) -> None:
    """Run the app, turning errors into one line and an exit code."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    hide_import_noise()
    _state["debug"] = False  # until --debug is parsed, also for a second main() in one process
    try:
        with _json_stdout(sys.argv[1:] if argv is None else argv):
            code = click_command().main(args=argv, prog_name="attnzoo", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Interrupted as e:
        from rich.markup import escape

        _console(stderr=True).print(f"[yellow]interrupted:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(128 + e.signum)
    except (typer.Abort, KeyboardInterrupt, AttnzooError, TrainingFailed, *_usage_errors()) as e:
        caught = e
    if isinstance(caught, _usage_errors()) and not caught.format_message():
        sys.exit(caught.exit_code)  # no arguments at all: typer has printed the help
    err, code = _one_line(caught)
    if _state["debug"]:
        import traceback

        traceback.print_exception(type(caught), caught, caught.__traceback__)
    from rich.markup import escape

    # escaped: messages quote paths and library errors, e.g. gloo's "[/path/pair.cc:561] Connection closed"
    _console(stderr=True).print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a thread a plugin left running does not keep the command alive."""
    try:
        _run_app(argv)
    except SystemExit as e:
        from .model.plugins import manager

        strays = manager.stray_threads()
        if strays:  # a started thread cannot be made a daemon: the only way out without waiting is _exit
            names = ", ".join(repr(t.name) for t in strays)
            _console(stderr=True).print(f"[yellow]warning:[/] not waiting for thread(s) {names} that a plugin "
                                        "started; see 'attnzoo plugins'", soft_wrap=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise


if __name__ == "__main__":
    main()
