"""``sweep``: what ``attnzoo sweep`` does. Which attention module, at which sites, helps on this data, and is the
difference more than the seed's? Every configuration (module x site set, and the baseline ``none``) is trained
once per seed with the same settings, and the leaderboard (``explain.stats``) says so over the seeds.

An Optuna study is the unit and its storage the engine. The process that creates the study enqueues the whole
grid of (configuration, seed) trials, then records the sweep's plan in the study; any number of processes (``--jobs``
on one machine, the same command or ``--join`` on others) pop the next waiting trial, which Optuna sets running
atomically, so two processes never get the same one, and train it with an ordinary ``fit`` into the trial's own
run folder, claimed too (a second guard on a shared disk). A worker stops when no trial is waiting: it never
makes a trial of its own. A trial's numbers go into the storage with it, so the leaderboard is read from the
storage alone, wherever the run folders are.

A trial stopped by Ctrl-C goes back into the queue; one whose process was killed is found on the next start (its
process is gone, or on a PostgreSQL storage its heartbeat stopped) and goes back too. Its run folder resumes from
its last checkpoint, or starts again when it has none; a finished run folder is never trained again.

    <sweep>/study.journal                 the Optuna storage, unless --storage names another
    <sweep>/trials/<config>-seed<k>/      one run folder per trial
    <sweep>/leaderboard.{csv,json,png,html}

This file imports neither optuna nor torch at import: a mistake is one line before the slow imports start.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import AttnzooError, Interrupted, TrainingFailed, UnknownNameError, first_line, hide_import_noise
from ..explain.stats import BASELINE
from ..train.settings import DEFAULTS, MAX_LR, FitConfig, cli_settings, whole_number
from ..train.threads import AUTO, check_threads, cpu_budget
from .folder import JOURNAL, TRIALS
from .outputs import strict_json

LEADERBOARD_CSV, LEADERBOARD_JSON = "leaderboard.csv", "leaderboard.json"
LEADERBOARD_PNG, LEADERBOARD_HTML = "leaderboard.png", "leaderboard.html"
PLAN = "attnzoo_sweep"  # the study's user attribute holding the sweep's plan
FORMAT = 1
# the fit settings a sweep spells its own way: the rest are taken as ``attnzoo fit`` takes them
REDEFINED = ("backbone", "attn", "data", "at", "seed", "out", "resume", "lr")
PER_PROCESS = ("threads", "num_workers")  # may differ between the processes of one sweep
MAX_SEEDS = 1000
PLAN_WAIT = 60.0  # seconds a process waits for the one that created the study to enqueue the grid
HEARTBEAT = (60, 180)  # seconds between a PostgreSQL/MySQL trial's heartbeats, and before a silent one is stale


def settings_names() -> list[str]:
    """The fit settings a sweep takes as ``attnzoo fit`` does (a new fit setting reaches the sweep unedited)."""
    return [s.name for s in cli_settings() if s.name not in REDEFINED]


# --- the plan -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A configuration: a module at a site set, or the baseline."""

    name: str
    attn: str | None
    sites: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        from .folder import path_label

        return path_label(self.name)


@dataclass
class Plan:
    """What a sweep trains, as its study records it: every trial is one ``config`` x ``seed``, with ``settings``
    (the fit settings, without the per-process ones). ``lr``: a number, ``auto``, or a (low, high) range the
    trials sample on a log scale."""

    backbone: str
    data: str
    configs: list[Config]
    seeds: list[int]
    lr: float | str | tuple[float, float]
    prune: bool
    settings: dict[str, Any]
    format: int = FORMAT

    @property
    def sampled(self) -> bool:
        return isinstance(self.lr, tuple)

    def config(self, name: str) -> Config:
        return next(c for c in self.configs if c.name == name)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lr"] = list(self.lr) if isinstance(self.lr, tuple) else self.lr
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format", FORMAT) > FORMAT:
            raise AttnzooError(f"the sweep was made by a newer attnzoo (format {data['format']}): upgrade attnzoo")
        lr = data["lr"]
        return cls(data["backbone"], data["data"], [Config(c["name"], c["attn"], tuple(c["sites"]))
                                                    for c in data["configs"]], list(data["seeds"]),
                   tuple(lr) if isinstance(lr, list) else lr, bool(data["prune"]), dict(data["settings"]))

    def fit_config(self, config: Config, seed: int, out: Path, lr: float | str, **per_process: Any) -> FitConfig:
        return FitConfig.of(backbone=self.backbone, attn=config.attn or BASELINE, data=self.data,
                            at=list(config.sites) or None, seed=seed, out=str(out), lr=lr,
                            **{**self.settings, **({} if config.attn else {"attn_options": {}}), **per_process})


@dataclass
class Asked:
    """A sweep command, checked without torch, timm or optuna."""

    modules: list[str]
    at: list[list[str]] | str | None
    plan: Plan  # its configs are resolved later, against the backbone's sites
    out: Path | None  # None: with --join, the sweep's own folder
    storage: str | None
    study: str | None
    join: str | None
    jobs: int | str  # or AUTO, resolved by resolve_jobs
    per_process: dict[str, Any]


def _split(items: str | Sequence[str] | None) -> list[str]:
    if items is None:
        return []
    items = [items] if isinstance(items, str) else list(items)
    return [x.strip() for item in items for x in str(item).split(",") if x.strip()]


def parse_lr(lr: Any) -> float | str | tuple[float, float]:
    """A learning rate (``fit``'s: a number or ``auto``), or a range ``A..B`` to sample on a log scale."""
    if isinstance(lr, (tuple, list)) or (isinstance(lr, str) and ".." in lr):
        parts = lr.split("..") if isinstance(lr, str) else list(lr)
        try:
            low, high = (float(x) for x in parts)
        except (TypeError, ValueError):
            raise AttnzooError(f"--lr takes a number, 'auto', or a range LOW..HIGH such as 1e-3..1e-1, got "
                               f"'{lr}'") from None
        if not (0 < low < high <= MAX_LR):
            raise AttnzooError(f"--lr range {low:g}..{high:g}: need 0 < LOW < HIGH <= {MAX_LR:g}")
        return (low, high)
    return lr if lr is not None else DEFAULTS["lr"]  # checked with the other fit settings


def check(backbone: str | None = None, data: str | None = None, attn: str | Sequence[str] | None = None, *,
          at: str | Sequence[str] | None = None, seeds: int | None = None, lr: Any = None, prune: bool | None = None,
          jobs: int | str | None = None, out: str | os.PathLike | None = None, storage: str | None = None,
          study: str | None = None, join: str | None = None, **settings: Any) -> Asked:
    """Every check of a sweep command that needs neither torch, timm nor optuna, in the order a user reads it."""

    unknown = sorted(set(settings) - set(settings_names()))
    if unknown:
        raise AttnzooError(f"sweep takes no setting {', '.join(unknown)}")
    settings = {k: v for k, v in settings.items() if v is not None}
    per_process = {k: settings.pop(k) for k in PER_PROCESS if k in settings}
    if "threads" in per_process:
        per_process["threads"] = check_threads(per_process["threads"])
    jobs = check_threads(1 if jobs is None else jobs, "--jobs")  # processes, bounded by the cores as threads are
    if jobs != AUTO:
        _share_cores(jobs, per_process)
    if join is not None:
        given = [k for k, v in dict(backbone=backbone, data=data, attn=attn, at=at, seeds=seeds, lr=lr, prune=prune,
                                    storage=storage, **settings).items() if v is not None]
        if given:
            raise AttnzooError(f"--join continues a sweep with its own plan; leave out "
                               f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        return Asked([], None, Plan("", "", [], [], 0.0, False, {}), None if out is None else Path(out), None,
                     study, join, jobs, per_process)
    missing = [f"--{n}" for n, v in (("backbone", backbone), ("data", data), ("attn", attn)) if not v]
    if missing:
        raise AttnzooError(f"sweep needs {', '.join(missing)} (or --join DIR|URL)")
    modules = list(dict.fromkeys(m for m in _split(attn) if m != BASELINE))  # their names: checked in prepare
    n_seeds = whole_number(3 if seeds is None else seeds, "--seeds", 1, MAX_SEEDS)
    lr = parse_lr(lr)
    if prune and not isinstance(lr, tuple):
        raise AttnzooError("--prune needs --lr LOW..HIGH: pruning the seeded grid would bias its means (a pruned "
                           "seed is a low one left out)")
    if data != "demo" and not Path(data).exists():
        raise AttnzooError(f"--data {data}: no such folder")
    data = data if data == "demo" else os.path.abspath(data)
    out = Path(out) if out is not None else Path(DEFAULTS["runs_dir"]) / f"sweep-{backbone}-{Path(data).name}"
    _check_out(out)
    at_sets: list[list[str]] | str | None = "auto" if _split(at) == ["auto"] else (
        [_split(s) for s in ([at] if isinstance(at, str) else at)] if at else None)
    options = dict(settings.pop("attn_options", None) or {})  # for every module of the list
    # every other fit setting checked as fit checks it, on the trial that has them all: the baseline's
    config = FitConfig.of(backbone=backbone, attn=BASELINE, data=data, lr=lr[0] if isinstance(lr, tuple) else lr,
                          out=str(out / TRIALS / "check"), **settings, **per_process)
    request = config.request()
    resolved = {k: request[k] for k in settings_names() if k in request and k not in PER_PROCESS}
    lr = lr if isinstance(lr, tuple) else config.lr
    plan = Plan(backbone, data, [], list(range(n_seeds)), lr, bool(prune), {**resolved, "attn_options": options})
    return Asked(modules, at_sets, plan, out, storage, study, None, jobs, per_process)


def _share_cores(jobs: int, per_process: dict[str, Any]) -> None:
    """Each of ``jobs`` processes on its share of the cores: threads x jobs never exceeds them."""
    threads = per_process.get("threads")
    if jobs > 1 and threads not in (None, AUTO):
        if threads * jobs > cpu_budget():
            raise AttnzooError(f"--threads {threads} x --jobs {jobs} is more threads than the {cpu_budget()} CPUs "
                               f"this process may use; give --threads {cpu_budget() // jobs} or fewer jobs")
    elif jobs > 1:
        per_process["threads"] = cpu_budget() // jobs


def auto_jobs(threads: int | str | None = None) -> int:
    """``--jobs auto`` (the command line's default): one worker where trials train on a CUDA GPU (they would share
    it), else two, each on half the cores (fewer when ``threads`` per worker leave no room). Measured on 2 CPU
    cores: two workers of one thread finish a sweep in 0.77x the time of one worker of two threads
    (``benchmarks/sweep.py jobs``). Each worker holds a whole fit in memory."""
    from ..train.distributed import use_cuda

    if use_cuda():
        return 1
    per_worker = threads if isinstance(threads, int) else 1
    return max(1, min(2, cpu_budget() // per_worker))


def resolve_jobs(asked: Asked) -> Asked:
    """``asked`` with ``--jobs auto`` made a number, the cores shared out (torch is imported here)."""
    if asked.jobs != AUTO:
        return asked
    per_process = dict(asked.per_process)
    jobs = auto_jobs(per_process.get("threads"))
    _share_cores(jobs, per_process)
    return replace(asked, jobs=jobs, per_process=per_process)


def _check_out(out: Path) -> None:
    """The sweep folder is new, empty, or a sweep folder (to continue): never a folder holding other files."""
    if out.exists() and not out.is_dir():
        raise AttnzooError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        names = {p.name for p in out.iterdir() if not p.name.startswith(JOURNAL + ".")}  # the journal's lock files
        ours = {JOURNAL, TRIALS, LEADERBOARD_CSV, LEADERBOARD_JSON, LEADERBOARD_PNG, LEADERBOARD_HTML}
        if names and not names & {JOURNAL, TRIALS} or names - ours:
            raise AttnzooError(f"--out {out} already holds files that are not a sweep's; attnzoo writes a sweep into "
                               f"a new or empty folder, or continues the sweep in one")


# --- the study ----------------------------------------------------------------------------------------------------

def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise AttnzooError("attnzoo sweep needs Optuna: pip install 'attnzoo[sweep]'") from None
    return optuna


@dataclass(frozen=True)
class Place:
    """Where a sweep lives: its storage (a journal file, or an RDB URL), its study's name, the sweep folder."""

    storage: str
    study: str
    folder: Path

    def open(self) -> Any:
        return open_storage(self.storage)

    def shown(self) -> str:
        """The storage as it may be printed: an URL without its password."""
        if "://" not in self.storage:
            return self.storage
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.storage).render_as_string(hide_password=True)
        except Exception:
            return self.storage.split("://")[0] + "://..."


def open_storage(where: str, must_exist: bool = False) -> Any:
    """An Optuna storage: an RDB URL (``sqlite:///x.db``, ``postgresql://...``; trials send heartbeats, and one
    whose heartbeat stops is failed and queued again by any process), or a journal file; one line when it cannot
    be opened."""
    import inspect
    import warnings

    optuna = _optuna()
    if "://" in where:
        interval, grace = HEARTBEAT
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        stale = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else \
            "failed_trial_callback"
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(where, heartbeat_interval=interval, grace_period=grace,
                                                  **{stale: _requeue_stale})
        except Exception as e:
            shown = Place(where, "", Path()).shown()
            raise AttnzooError(f"cannot open the storage {shown}: {first_line(e, limit=200)}") from None
    path = Path(where)
    if must_exist and not path.is_file():
        raise AttnzooError(f"no sweep at {path} (no journal file there)")
    if not path.parent.is_dir():
        raise AttnzooError(f"cannot open the storage {path}: {path.parent} is not a folder")
    from optuna.storages.journal import JournalFileBackend

    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise AttnzooError(f"cannot open the storage {path}: {e.strerror or e}") from None


def _requeue_stale(study: Any, trial: Any) -> None:
    """Optuna failed ``trial`` because its heartbeat stopped (its machine died): it goes back into the queue."""
    study.enqueue_trial(_point(trial), user_attrs={**_grid_attrs(trial), "retry_of": trial.number})


def _point(trial: Any) -> dict[str, Any]:
    """A trial's fixed parameters: its configuration and seed, and its learning rate once sampled."""
    return {**{k: trial.user_attrs[k] for k in ("config", "seed")},
            **{k: v for k, v in trial.params.items() if k == "lr"}}


def _grid_attrs(trial: Any) -> dict[str, Any]:
    return {k: trial.user_attrs[k] for k in ("config", "seed")}


def _study_names(storage: Any) -> list[str]:
    optuna = _optuna()
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if PLAN in s.user_attrs]


def prepare(asked: Asked) -> tuple[Place, Plan]:
    """The sweep's place and plan: joined, or continued (the same command again), or created, its grid enqueued
    by the one process that creates the study."""
    _optuna()  # installed, before anything is written
    if asked.join is not None:
        return _join(asked)
    out = asked.out or Path()
    storage = open_storage(asked.storage) if asked.storage is not None else None  # a bad URL: before torch
    plan = replace(asked.plan, configs=resolve_configs(asked))
    where = asked.storage or str(out / JOURNAL)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        storage = open_storage(where)
    place = Place(where, asked.study or out.name, out.absolute())
    optuna = _optuna()
    try:
        study = optuna.create_study(storage=storage, study_name=place.study, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        saved = _wait_for_plan(storage, place.study)
        _same_plan(saved, plan, place)
        return place, saved
    for seed in plan.seeds:  # seed by seed: a sweep stopped early has whole pairs to compare
        for config in plan.configs:
            point = {"config": config.name, "seed": seed}
            study.enqueue_trial(point, user_attrs=point)
    study.set_user_attr("folder", str(place.folder))
    study.set_user_attr(PLAN, plan.to_json())  # last: the others wait for it, then find the grid enqueued
    return place, plan


def _join(asked: Asked) -> tuple[Place, Plan]:
    join = asked.join or ""
    where = str(Path(join) / JOURNAL) if "://" not in join and Path(join).is_dir() else join
    storage = open_storage(where, must_exist="://" not in where)
    names = _study_names(storage)
    if asked.study is not None and asked.study not in names:
        raise UnknownNameError(f"sweep in {join}", asked.study, names, show_all=True)
    if asked.study is None and len(names) != 1:
        raise AttnzooError(f"{join} holds {len(names)} sweeps ({', '.join(names) or 'none'}): name one with --study")
    name = asked.study or names[0]
    study = _optuna().load_study(study_name=name, storage=storage)
    default = Path(join) if "://" not in join and Path(join).is_dir() else Path(study.user_attrs.get("folder", "."))
    folder = asked.out if asked.out is not None else default
    return Place(where, name, folder.absolute()), Plan.from_json(study.user_attrs[PLAN])


def _wait_for_plan(storage: Any, name: str) -> Plan:
    """The plan of a study another process created: it records it once its grid is enqueued."""
    optuna = _optuna()
    deadline = time.monotonic() + PLAN_WAIT
    while True:
        attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
        if PLAN in attrs:
            return Plan.from_json(attrs[PLAN])
        if time.monotonic() > deadline:
            raise AttnzooError(f"the study '{name}' has no sweep plan: the process that created it stopped before "
                               "enqueuing its trials; delete it (optuna delete-study) or give another --out/--study")
        time.sleep(0.5)


def _same_plan(saved: Plan, plan: Plan, place: Place) -> None:
    """The same command continues its sweep; a different one is a mistake, said in one line."""
    a, b = saved.to_json(), plan.to_json()
    for key in ("backbone", "data", "seeds", "lr", "prune", "configs"):
        if a[key] != b[key]:
            name = {"configs": "attn/at", "seeds": "seeds"}.get(key, key)
            raise AttnzooError(f"{place.folder} holds a sweep with other --{name} (there: {_brief(a[key])}; here: "
                               f"{_brief(b[key])}); continue it with --join {place.folder}, or give a new --out")
    for key in sorted(set(a["settings"]) | set(b["settings"])):
        if a["settings"].get(key) != b["settings"].get(key):
            raise AttnzooError(f"{place.folder} holds a sweep with {key}={a['settings'].get(key)!r}, not "
                               f"{b['settings'].get(key)!r}; continue it with --join {place.folder}, or give a new "
                               "--out")


def _brief(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ", ".join(c["name"] for c in value)
    return json.dumps(value)[:80]


def resolve_configs(asked: Asked) -> list[Config]:
    """The baseline, then each module at each of its site sets, site names resolved against the backbone: its
    default sites, the sets of ``--at``, or with ``auto`` the defaults and the same one level shallower and one
    deeper."""
    from ..explain.stats import config_name
    from ..model.registry import get_attention, parse_options
    from ..model.sites import check_backbone, default_img_size, introspect, resolve_sites

    plan = asked.plan
    for module in asked.modules:
        parse_options(module, plan.settings["attn_options"])  # an unknown module or option: one line
    check_backbone(plan.backbone)
    img_size = plan.settings.get("img_size") or (64 if plan.data == "demo" else default_img_size(plan.backbone))
    info = introspect(plan.backbone, img_size)
    configs = [Config(BASELINE, None)]
    for module in asked.modules:
        kind = get_attention(module).kind
        if asked.at == "auto":
            sets = _auto_sets(info, kind)
        else:
            sets = [resolve_sites(info, s, kind) for s in asked.at] if asked.at else [resolve_sites(info, None, kind)]
        for sites in dict.fromkeys(tuple(s) for s in sets if s):
            configs.append(Config(config_name(module, sites), module, sites))
    return configs


def _auto_sets(info: Any, kind: str) -> list[list[str]]:
    """A module's default sites, and the same moved one feature level shallower and one deeper; a set that
    cannot move (it holds the first or the last level) loses its end site instead. Sets a module cannot take are
    left out."""
    from ..model.sites import resolve_sites

    defaults = resolve_sites(info, None, kind)
    level = {s.name: s.level for s in info.sites if s.level is not None and s.level >= 1}  # 0: the stem
    by_level = {v: k for k, v in level.items()}

    def moved(step: int) -> list[str]:
        if all(n in level for n in defaults):
            shifted = [by_level.get(level[n] + step) for n in defaults]
            if all(shifted):
                return [s for s in shifted if s]
        return defaults[:-1] if step < 0 else defaults[1:]

    out = []
    for sites in (defaults, moved(-1), moved(1)):
        with contextlib.suppress(AttnzooError):
            out.append(resolve_sites(info, sites, kind) if sites else [])
    return out


# --- the workers --------------------------------------------------------------------------------------------------

@dataclass
class TrialEvent:
    """A trial has ended in this process: what ``on_trial`` is told."""

    number: int
    config: str
    seed: int
    state: str  # complete | failed | pruned
    accuracy: float | None
    error: str | None
    fit_seconds: float  # training (``fit``), whole
    sweep_seconds: float  # this process's own work on the trial, outside ``fit``
    done: int  # grid points that have ended, over every process
    total: int


def _me() -> dict[str, Any]:
    from .folder import process_started

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_started(os.getpid())}


def _one_line(e: BaseException) -> str:
    return first_line(e, named=not isinstance(e, (AttnzooError, TrainingFailed)))


class Worker:
    """One process's share of a sweep: it takes waiting trials, one at a time, until none is left."""

    def __init__(self, place: Place, per_process: Mapping[str, Any], console: Any = None) -> None:
        self.place, self.per_process, self.console = place, dict(per_process), console
        self.storage = place.open()
        self.study_id = self.storage.get_study_id_from_name(place.study)
        attrs = self.storage.get_study_user_attrs(self.study_id)
        self.plan = Plan.from_json(attrs[PLAN])
        optuna = _optuna()
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1) if self.plan.prune else None
        self.study = optuna.load_study(study_name=place.study, storage=self.storage, pruner=pruner,
                                       sampler=optuna.samplers.TPESampler() if self.plan.sampled else None)

    def loop(self, on_trial: Callable[[TrialEvent], None] | None = None) -> None:
        """Trials until none is waiting, after giving back those of processes that are gone (when this one
        starts, and again before it stops: a process that died meanwhile leaves no trial behind)."""
        self.recover()
        while True:
            started = time.perf_counter()
            taken = self.take()
            if taken is None:  # before stopping: trials a process that died meanwhile left behind
                self.recover()
                taken = self.take()
            if taken is None:
                return
            event = self.run(*taken, started)
            if on_trial is not None:
                on_trial(event)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def take(self) -> tuple[Any, int] | None:
        """The next waiting trial (those going back into the queue first: they have a checkpoint), set running
        by the storage for this process alone; None when no trial is waiting."""
        optuna = _optuna()
        waiting = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        for t in sorted(waiting, key=lambda t: ("retry_of" not in t.user_attrs, t.number)):
            trial_id = self._trial_id(t.number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING):
                    self.storage.set_trial_user_attr(trial_id, "worker", _me())
                    return optuna.Trial(self.study, trial_id), trial_id
        return None

    def give_back(self, number: int, why: str) -> bool:
        """Fail a running trial that cannot end here (interrupted, or its process is gone) and queue it again;
        when two processes try at once, one does. The retry continues the trial's run folder."""
        optuna = _optuna()
        trial_id = self._trial_id(number)
        try:
            self.storage.set_trial_user_attr(trial_id, "error", why)
            if not self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        frozen = self.storage.get_trial(trial_id)
        self.study.enqueue_trial(_point(frozen), user_attrs={**_grid_attrs(frozen), "retry_of": number})
        return True

    def recover(self) -> None:
        """Trials left running by a process that is gone go back into the queue: on this host, a process that no
        longer runs; on an RDB storage, any process whose heartbeat stopped (``fail_stale_trials``)."""
        optuna = _optuna()
        from .folder import process_alive

        if self._heartbeat_interval():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker") or {}
            if owner.get("host") == socket.gethostname() and not process_alive(owner["pid"], owner.get("started")):
                self.give_back(t.number, f"its process (pid {owner['pid']}) stopped")

    def run(self, trial: Any, trial_id: int, started: float) -> TrialEvent:
        """Train one trial into its run folder and tell the study how it ended."""
        optuna = _optuna()
        plan = self.plan
        config, seed = plan.config(trial.user_attrs["config"]), trial.user_attrs["seed"]
        trial.suggest_categorical("config", [c.name for c in plan.configs])  # the parameters, for the dashboard
        trial.suggest_categorical("seed", plan.seeds)
        lr = trial.suggest_float("lr", *plan.lr, log=True) if isinstance(plan.lr, tuple) else plan.lr
        run_dir = self.place.folder / TRIALS / f"{config.folder}-seed{seed}"
        trial.set_user_attr("run", str(run_dir))
        reporter = _pruning(trial) if plan.prune else None
        state, value, error, fit_seconds = "complete", None, None, 0.0
        try:
            fit_config = plan.fit_config(config, seed, run_dir, lr, **self.per_process)
            with self._heartbeat(trial_id):
                fit_start = time.perf_counter()
                try:
                    path = train_trial(run_dir, fit_config, self.console, [reporter] if reporter else [])
                finally:
                    fit_seconds = time.perf_counter() - fit_start
            value = self._record(trial, path)
        except (Interrupted, KeyboardInterrupt) as e:
            self.give_back(trial.number, f"interrupted: {_one_line(e)}")
            raise
        except Exception as e:
            state = "pruned" if reporter is not None and reporter.stopped else "failed"
            error = _one_line(e)
            trial.set_user_attr("error", error)
        trial.set_user_attr("seconds", {"fit": fit_seconds, "sweep": time.perf_counter() - started - fit_seconds})
        states = {"complete": optuna.trial.TrialState.COMPLETE, "failed": optuna.trial.TrialState.FAIL,
                  "pruned": optuna.trial.TrialState.PRUNED}
        self.study.tell(trial, value if state == "complete" else None, state=states[state])
        done = sum(r["state"] != "pending" for r in trial_results(self.study, plan))
        return TrialEvent(trial.number, config.name, seed, state, value, error, fit_seconds,
                          time.perf_counter() - started - fit_seconds, done, len(plan.configs) * len(plan.seeds))

    def _record(self, trial: Any, path: Path) -> float:
        """A finished run's numbers into the study (the leaderboard reads them there); its accuracy."""
        from ..explain.compare import run_result

        result = strict_json(run_result(path))
        trial.set_user_attr("result", {k: result[k] for k in RESULT_KEYS})
        if result["accuracy"] is None:
            raise TrainingFailed(f"{path} records no validation accuracy")
        return float(result["accuracy"])

    def _heartbeat_interval(self) -> int | None:
        return self.storage.get_heartbeat_interval() if hasattr(self.storage, "get_heartbeat_interval") else None

    @contextlib.contextmanager
    def _heartbeat(self, trial_id: int) -> Iterator[None]:
        """On an RDB storage, the trial's heartbeat while it trains: a trial whose heartbeat stops is stale."""
        interval = self._heartbeat_interval()
        if not interval:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # a missed beat is not a failed trial
                    self.storage.record_heartbeat(trial_id)
                stop.wait(interval)

        thread = threading.Thread(target=beat, name="attnzoo-sweep-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


RESULT_KEYS = ("accuracy", "valid_loss", "map", "share", "pointing", "params", "time_per_epoch", "epochs")


def _pruning(trial: Any) -> Any:
    """The fastai callback that reports each epoch's validation accuracy to the trial and stops a run Optuna's
    pruner finds hopeless."""
    from ..train.callbacks import ReportEpochs

    def report(epoch: int, accuracy: float) -> str | None:
        trial.report(accuracy, epoch)
        if trial.should_prune():
            return f"pruned after epoch {epoch} (accuracy {accuracy:.4f}, below the median of earlier trials)"
        return None

    return ReportEpochs(report)


def train_trial(run_dir: Path, config: FitConfig, console: Any, callbacks: Sequence[Any]) -> Path:
    """A trial's run folder, trained: a finished one as it is (never trained twice); one with a checkpoint
    resumed from it; one that stopped before its first checkpoint emptied and started again."""
    from ..train.fit import fit
    from .folder import RunFolder, is_run_folder

    if is_run_folder(run_dir):
        folder = RunFolder.open(run_dir)
        if folder.record.get("status") == "done":
            return run_dir
        if folder.can_resume():
            resume = FitConfig.of(resume=str(run_dir), threads=config.threads, num_workers=config.num_workers)
            return fit(config=resume, console=console, callbacks=callbacks)
    if run_dir.is_dir():
        RunFolder(run_dir).clear()
    return fit(config=config, console=console, callbacks=callbacks)


def work(place: Place, per_process: Mapping[str, Any]) -> None:
    """A ``--jobs`` process: a quiet worker (the parent shows the progress); one line and an exit code when it
    fails."""
    import sys

    from rich.console import Console

    hide_import_noise()
    _optuna().logging.set_verbosity(_optuna().logging.WARNING)
    try:
        Worker(place, per_process, Console(quiet=True)).loop()
    except (KeyboardInterrupt, Interrupted):
        sys.exit(130)
    except Exception as e:
        print(f"error: sweep worker {os.getpid()}: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def run_jobs(place: Place, jobs: int, per_process: Mapping[str, Any],
             on_trial: Callable[[TrialEvent], None] | None = None) -> None:
    """``jobs`` worker processes on the sweep's storage, each on its share of the cores; this one reports the
    trials as they end and waits for the workers. Ctrl-C reaches them too (each stops after its batch and gives its
    trial back); a SIGTERM to this process is passed on to them."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")  # not fork: torch's threads do not survive a fork
    procs = [context.Process(target=work, args=(place, dict(per_process)), name=f"attnzoo-sweep-{i + 1}")
             for i in range(jobs)]
    terminated: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        terminated.append(signum)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM stays as it is
        signal.signal(signal.SIGTERM, pass_on)
    try:
        for p in procs:
            p.start()
        study = _optuna().load_study(study_name=place.study, storage=place.open())
        plan, reported = Plan.from_json(study.user_attrs[PLAN]), set()
        while any(p.is_alive() for p in procs):
            _report_new(study, plan, reported, on_trial)
            time.sleep(1.0)
        _report_new(study, plan, reported, on_trial)
    finally:
        for p in procs:
            p.join()
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise Interrupted("SIGTERM", terminated[0], place.folder)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, 130)]
    if failed:
        raise TrainingFailed(f"{len(failed)} of {jobs} sweep workers failed (see their lines above)")


def _report_new(study: Any, plan: Plan, reported: set[int], on_trial: Callable[[TrialEvent], None] | None) -> None:
    """Trials that ended since the last look, told to ``on_trial`` (for ``--jobs``: the workers are quiet)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    finished = [t for t in trials if t.state.is_finished() and t.number not in reported]
    reported.update(t.number for t in finished)
    if not finished or on_trial is None:
        return
    told = sorted((t for t in finished if t.number not in retried),  # a trial given back ends again later
                  key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
    ended = sum(r["state"] != "pending" for r in trial_results(study, plan))  # after all of them: count up to it
    for i, t in enumerate(told):
        done = max(1, ended - len(told) + i + 1)
        seconds = t.user_attrs.get("seconds") or {}
        state = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, "failed")
        on_trial(TrialEvent(t.number, t.user_attrs.get("config", "?"), t.user_attrs.get("seed", -1), state,
                            t.value, t.user_attrs.get("error"), seconds.get("fit", 0.0), seconds.get("sweep", 0.0),
                            done, len(plan.configs) * len(plan.seeds)))


# --- the leaderboard ----------------------------------------------------------------------------------------------

_STATES = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned"}  # waiting and running: pending


def trial_results(study: Any, plan: Plan) -> list[dict[str, Any]]:
    """One result per trial of the grid (``stats.leaderboard``'s input), from the storage alone: the latest
    trial of each (configuration, seed), a trial given back being followed by its retry."""
    latest: dict[tuple[str, int], Any] = {}
    for t in study.get_trials(deepcopy=False):
        key = (t.user_attrs.get("config"), t.user_attrs.get("seed"))
        if key[0] is not None and (key not in latest or t.number > latest[key].number):
            latest[key] = t
    out = []
    for seed in plan.seeds:
        for c in plan.configs:
            t = latest.get((c.name, seed))
            state = _STATES.get(t.state.name, "pending") if t is not None else "pending"
            result = dict(config=c.name, seed=seed, state=state, trial=None if t is None else t.number,
                          run=None if t is None else t.user_attrs.get("run"),
                          lr=None if t is None else t.params.get("lr"),
                          error=t.user_attrs.get("error") if t is not None and state != "complete" else None)
            if state == "complete":
                result.update(t.user_attrs.get("result") or {})
            out.append(result)
    return out


@dataclass
class Leaderboard:
    """A sweep's results: one ``stats.Row`` per configuration (best mean accuracy first), every trial's result,
    and the files written."""

    place: Place
    plan: Plan
    rows: list[Any]
    trials: list[dict[str, Any]]
    files: dict[str, Path]

    @property
    def folder(self) -> Path:
        return self.place.folder

    def counts(self) -> dict[str, int]:
        states = [t["state"] for t in self.trials]
        return {s: states.count(s) for s in ("complete", "failed", "pruned", "pending")}

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (NaN is null): what leaderboard.json holds."""
        from ..explain.stats import LEVEL

        return strict_json(dict(
            study=self.place.study, storage=self.place.shown(), folder=str(self.folder), backbone=self.plan.backbone,
            data=self.plan.data, seeds=self.plan.seeds, lr=self.plan.to_json()["lr"], settings=self.plan.settings,
            baseline=BASELINE, level=LEVEL, paired=not self.plan.sampled, counts=self.counts(),
            rows=[r.to_dict() for r in self.rows], trials=self.trials,
            files={k: str(v) for k, v in self.files.items()}))


def read_leaderboard(place: Place) -> Leaderboard:
    """The leaderboard as the storage has it now."""
    from ..explain.stats import leaderboard

    study = _optuna().load_study(study_name=place.study, storage=place.open())
    plan = Plan.from_json(study.user_attrs[PLAN])
    trials = trial_results(study, plan)
    return Leaderboard(place, plan, leaderboard(trials, paired=not plan.sampled), trials, {})


def write_leaderboard(place: Place) -> Leaderboard:
    """leaderboard.csv, .json, .png and .html in the sweep folder, each written whole (``outputs.replace``); not
    over a leaderboard another process wrote with more trials ended (it saw more)."""
    from ..explain import figures
    from ..explain.charts import leaderboard_figure
    from ..explain.stats import ROW_HEADERS, row_cells
    from .outputs import replace_text

    board = read_leaderboard(place)
    folder = place.folder
    folder.mkdir(parents=True, exist_ok=True)
    ended = sum(v for k, v in board.counts().items() if k != "pending")
    previous = folder / LEADERBOARD_JSON
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        counts = json.loads(previous.read_text())["counts"]
        if sum(v for k, v in counts.items() if k != "pending") > ended:
            board.files = {k: folder / name for k, name in _FILES.items()}
            return board
    rows = [r.to_dict() for r in board.rows]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows[0].keys() if rows else [])
    writer.writerows([" | ".join(v) if isinstance(v, list) else "" if v is None else v for v in r.values()]
                     for r in rows)
    board.files = {"csv": replace_text(folder / LEADERBOARD_CSV, buf.getvalue())}
    board.files["png"] = figures.save_figure(leaderboard_figure(board.rows, paired=not board.plan.sampled),
                                             folder / LEADERBOARD_PNG)
    board.files["html"] = replace_text(folder / LEADERBOARD_HTML, _html(board, ROW_HEADERS, row_cells))
    board.files["json"] = replace_text(previous, json.dumps(board.to_dict(), indent=2, default=str))
    return board


_FILES = {"csv": LEADERBOARD_CSV, "png": LEADERBOARD_PNG, "html": LEADERBOARD_HTML, "json": LEADERBOARD_JSON}


def _html(board: Leaderboard, headers: Sequence[str], cells: Callable[[Any], list[str]]) -> str:
    """leaderboard.html: the table, the chart, how to read them, and every trial."""
    import html

    from ..explain.page import facts_table, figure, page, table

    plan, counts = board.plan, board.counts()
    facts = [["backbone", plan.backbone], ["data", plan.data], ["seeds", ", ".join(map(str, plan.seeds))],
             ["learning rate", board.to_dict()["lr"]],
             ["settings", ", ".join(f"{k}={v}" for k, v in sorted(plan.settings.items()))],
             ["trials", ", ".join(f"{v} {k}" for k, v in counts.items() if v)], ["study", board.place.study],
             ["storage", board.place.shown()]]
    how = ("<p>Each configuration was trained once per seed with the same settings and data split as the baseline "
           "<i>none</i>. <b>accuracy</b> and <b>valid loss</b>: mean ± sample standard deviation over the seeds "
           "(<i>seeds</i> is how many runs each mean has). <b>vs none</b>: the mean difference in accuracy, seed "
           "by seed, with its 95% t-interval; the <b>verdict</b> is read off that interval: <i>better</i> when all "
           "of it is above 0, <i>worse</i> when all of it is below, <i>no evidence</i> otherwise (or with fewer "
           "than two pairs). <b>map</b>: the attention map with the largest share of the decision, with its "
           "share and, when the data has boxes.csv, its pointing game. ★: on the Pareto front of accuracy against "
           "parameters.</p>" if not plan.sampled else
           "<p>The learning rate was sampled per trial, so the runs of a configuration differ in more than their "
           "seed: each row gives the mean over its trials and the best trial's learning rate, and no verdict "
           "against <i>none</i>.</p>")
    trials = [[t["config"], t["seed"], t["state"], "" if t.get("accuracy") is None else f"{t['accuracy']:.4f}",
               "" if t.get("lr") is None else f"{t['lr']:.3g}", t.get("run") or "", t.get("error") or ""]
              for t in board.trials]
    return page(f"Sweep leaderboard: {board.place.study}", [
        facts_table(facts), "<h2>Leaderboard</h2>", how, table(headers, [cells(r) for r in board.rows]),
        figure(board.files.get("png"), "leaderboard chart"), "<h2>Trials</h2>",
        table(["config", "seed", "state", "accuracy", "lr", "run folder", "error"], trials),
        f"<p>Open the study: <code>optuna-dashboard {html.escape(board.place.shown())}</code></p>",
    ], "Written by attnzoo sweep.")


# --- the command --------------------------------------------------------------------------------------------------

def sweep(backbone: str | None = None, data: str | None = None, attn: str | Sequence[str] | None = None, *,
          at: str | Sequence[str] | None = None, seeds: int | None = None, lr: Any = None, prune: bool | None = None,
          jobs: int | None = None, out: str | os.PathLike | None = None, storage: str | None = None,
          study: str | None = None, join: str | None = None, console: Any = None,
          on_trial: Callable[[TrialEvent], None] | None = None, **settings: Any) -> Leaderboard:
    """Train every configuration (each module of ``attn`` at each site set of ``at``, and the baseline ``none``)
    once per seed (``seeds``: 0 to seeds-1, default 3), and write the leaderboard; what ``attnzoo sweep`` does.

    ``at``: site sets (a list of sets, each a list or a comma string), or ``"auto"`` (each module's default sites,
    one level shallower, one deeper); default: each module's default sites. ``lr``: a learning rate, ``"auto"``,
    or a range ``"1e-3..1e-1"`` each trial samples (log scale; then ``prune`` may stop hopeless trials).
    ``settings``: the fit settings (``settings_names()``), the same for every trial. ``out``: the sweep folder
    (default runs/sweep-<backbone>-<data>); ``storage``: an RDB URL or a journal file (default: a journal in the
    sweep folder); ``study``: the study's name. Run the same call again, in any number of processes, to continue
    or share the sweep; ``join``: a sweep folder or storage to work on, with its own plan. ``jobs``: worker
    processes here, each on its share of the cores (default 1: trials train in this process; ``"auto"``, the
    command line's default: see ``auto_jobs``). ``on_trial(event)``: after each trial ends.
    """
    asked = check(backbone, data, attn, at=at, seeds=seeds, lr=lr, prune=prune, jobs=jobs, out=out,
                  storage=storage, study=study, join=join, **settings)
    place, _ = prepare(asked)
    asked = resolve_jobs(asked)
    try:
        if asked.jobs > 1:
            if console is not None:  # the workers are quiet: say what to expect
                console.print(f"{asked.jobs} worker processes, {asked.per_process.get('threads')} thread(s) each: a "
                              f"line as each trial ends (--jobs 1 shows every epoch)", soft_wrap=True)
            run_jobs(place, asked.jobs, asked.per_process, on_trial)
        else:
            Worker(place, asked.per_process, console).loop(on_trial)
    except (Interrupted, KeyboardInterrupt) as e:
        import signal

        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(f"{signal.Signals(signum).name}: the sweep stopped, its trial in progress goes back into "
                          f"the queue; run the same command (or attnzoo sweep --join {place.folder}) to continue",
                          signum, place.folder) from None
    return write_leaderboard(place)
