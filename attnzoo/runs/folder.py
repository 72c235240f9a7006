"""The run folder: what ``fit`` writes and every other command reads. This module is its one owner: every
file name below is spelled here and nowhere else, ``attnzoo.json`` is read and written against one schema
(``RunConfig``), and the run's status moves through ``RunFolder``'s lifecycle methods. JSON and safetensors only,
never a pickle; no torch at import (the weights are written through safetensors when a run ends).

    attnzoo.json                  what the run is (backbone, module, sites, classes, preprocessing), how it was
                                  asked for (``request``), how it went (status, metrics, best, maps, warnings)
    model.safetensors             the weights
    history.csv                   one row per epoch
    skipped.txt                   the files training left out: tab-separated path and reason, CSV quoting
    checkpoints/last.safetensors  while training: model, optimiser, random states (``train.checkpoints``)
    checkpoints/best.safetensors  the best epoch's weights, unless they are model.safetensors
    config.json, README.md        the Hub face of a finished run (``runs.hub``)
    *.png, report.html            plots; ``attention/`` show-attention's figures
    .attnzoo-lock                 "host pid start-time" of the process that claimed the folder and trains in it

Every file is written to a temporary name and renamed into place (``outputs.replace``): a crash never leaves
half a file, and the mode follows the umask.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import AttnzooError
from ..train.settings import MAX_IMG_SIZE, MIN_IMG_SIZE, FitConfig
from .outputs import replace, replace_text

CONFIG = "attnzoo.json"
WEIGHTS = "model.safetensors"
HISTORY = "history.csv"
SKIPPED = "skipped.txt"
LOCK = ".attnzoo-lock"
CHECKPOINTS = "checkpoints"
LAST = f"{CHECKPOINTS}/last.safetensors"
BEST = f"{CHECKPOINTS}/best.safetensors"
HUB_CONFIG = "config.json"
MODEL_CARD = "README.md"
REPORT = "report.html"
FIGURES = "attention"  # show-attention's default folder
JOURNAL = "study.journal"  # a sweep folder's Optuna storage (``runs.sweep``): it marks the folder as attnzoo's
TRIALS = "trials"  # a sweep folder's run folders, one per trial
PLOTS = {
    "history": "history.png", "confusion": "confusion_matrix.png", "top_losses": "top_losses.png",
    "attention": "attention.png", "attention_cams": "attention_gradcam.png", "localization": "localization.png",
    "deletion": "deletion.png", "insertion": "insertion.png",
}
# what a Hub model repo made from a run holds (``attnzoo push``): never attnzoo.json (local paths), checkpoints,
# skipped.txt (file names of the data) or the data; the plots are figures attnzoo made
HUB_FILES = (HUB_CONFIG, WEIGHTS, MODEL_CARD, *PLOTS.values())
FORMAT_VERSION = 1
# temporary files in a run folder: attnzoo's ".NAME.XXXXXXXX.tmp" (outputs.write_temporary), and ".tmpXXXXXX",
# where safetensors writes a file before renaming it onto attnzoo's
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")
_MAX_JSON_DEPTH = 64  # attnzoo.json nests a few levels; a forged file thousands deep is refused, not recursed into


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("attnzoo", "torch", "timm", "fastai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- attnzoo.json: one schema -----------------------------------------------------------------------------------

Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Strict(BaseModel):
    """attnzoo's JSON files: strict ("32" is not an image size and 1 is not True), and a newer attnzoo's fields
    kept, not refused."""

    model_config = ConfigDict(strict=True, extra="allow")


class SkippedFile(Strict):
    path: str
    reason: str


class Metrics(Strict):
    per_epoch: list[dict[str, float]] = Field(default_factory=list)  # epoch, losses, metrics, seconds
    final: dict[str, float] = Field(default_factory=dict)


class Best(Strict):
    """The epoch with the best monitored score, and the file holding its weights."""

    epoch: int = Field(ge=1)
    monitor: str
    score: Finite
    weights: Literal["model.safetensors", "checkpoints/best.safetensors"] | None = None


class MapVerdict(Strict):
    """One attention map's record (``explain.trust``): its share of the decision, and with boxes its pointing."""

    share: float | None = None
    pointing: float | None = None
    chance: float | None = None
    flags: list[str] = Field(default_factory=list)


def _request_model() -> type[BaseModel]:
    """The schema of ``request``: the requested settings of ``FitConfig``, with their types (one declaration)."""
    import dataclasses
    import typing

    from pydantic import create_model

    hints = typing.get_type_hints(FitConfig)
    specs: dict[str, Any] = {f.name: (typing.Optional[hints[f.name]], None)  # noqa: UP045 (a runtime type)
                             for f in dataclasses.fields(FitConfig) if f.metadata["requested"]}
    return create_model("Request", __base__=_Lenient, **specs)


class Shared(Strict):
    """Where the run was last pushed (``attnzoo push``): the license and repo its model card names again."""

    repo_id: str
    license: str | None = None
    revision: str | None = None
    url: str | None = None
    commit: str | None = None


class _Lenient(BaseModel):
    # a request holds what FitConfig checks when it is rebuilt; a newer attnzoo's settings are kept
    model_config = ConfigDict(extra="allow")


Request = _request_model()


class RunConfig(Strict):
    """``attnzoo.json``: every field attnzoo writes, with its type; its bounds are ``fit``'s."""

    format: int = Field(FORMAT_VERSION, ge=1)
    status: Literal["training", "interrupted", "failed", "done"] | None = None
    backbone: str = Field(min_length=1)
    attn: str | None = None
    attn_options: dict[str, Any] = Field(default_factory=dict)
    sites: list[str] = Field(default_factory=list)
    classes: list[str] = Field(min_length=1)
    img_size: int = Field(ge=MIN_IMG_SIZE, le=MAX_IMG_SIZE)
    mean: list[Finite] = Field(min_length=1, max_length=3)  # one value per image channel: 3 (RGB) or 1 (grey)
    std: list[Positive] = Field(min_length=1, max_length=3)
    seed: int | None = None
    pretrained: bool | None = None
    weights: str | None = None
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)  # timm keywords the backbone was built with
    threads: int | None = None  # torch's CPU threads when training started
    threads_per_epoch: list[int] = Field(default_factory=list)  # with --threads auto, as they followed the machine
    data: dict[str, Any] | None = None
    request: Request | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    best: Best | dict[str, Any] | None = None  # {} before the first epoch ends
    maps: dict[str, MapVerdict] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    skipped: list[SkippedFile] = Field(default_factory=list)
    error: str | None = None
    resume: str | None = None
    distributed: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None
    faithfulness: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    hub: Shared | None = None


def _depth(value: Any) -> int:
    """How deep ``value`` nests, without recursion (a forged file may nest thousands of levels)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > _MAX_JSON_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def check_config(config: Any, where: str | os.PathLike = CONFIG) -> dict[str, Any]:
    """``config`` if it is a valid ``attnzoo.json``, else one ``AttnzooError`` line naming the field and the problem."""
    fmt = config.get("format", FORMAT_VERSION) if isinstance(config, dict) else None
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise AttnzooError(f"{where}: written by a newer attnzoo (format {fmt}; this one reads {FORMAT_VERSION}): "
                           "upgrade attnzoo")
    check_against(RunConfig, config, where)
    if len(set(config["classes"])) != len(config["classes"]):
        raise AttnzooError(f"{where}: classes: a class is named twice")
    if len(config["mean"]) != len(config["std"]) or len(config["mean"]) not in (1, 3):
        raise AttnzooError(f"{where}: mean and std: one value per image channel, 3 (RGB) or 1 (grey), got "
                           f"{len(config['mean'])} and {len(config['std'])}")
    return config


def check_against(schema: type[BaseModel], config: Any, where: str | os.PathLike) -> dict[str, Any]:
    """``config`` if ``schema`` accepts it (a JSON object, not nested past any use), else one ``AttnzooError``
    line naming the field and the problem: how attnzoo reads every JSON file it wrote."""
    if not isinstance(config, dict):
        raise AttnzooError(f"{where}: must hold a JSON object, not {json.dumps(config)[:40]}")
    if _depth(config) > _MAX_JSON_DEPTH:
        raise AttnzooError(f"{where}: nests deeper than {_MAX_JSON_DEPTH} levels: not a file attnzoo wrote")
    try:
        schema.model_validate(config)
    except ValidationError as e:
        first = e.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"])
        problem = "missing" if first["type"] == "missing" else (
            f"{first['msg'][0].lower()}{first['msg'][1:]}, got {json.dumps(first['input'], default=str)[:60]}")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise AttnzooError(f"{where}: {field_name}: {problem}{more}") from None
    return config


def read_json(path: Path) -> Any:
    """A JSON file attnzoo wrote, or one ``AttnzooError`` line (not JSON, not UTF-8, nested past any use)."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser's stack
        raise AttnzooError(f"{path} is not valid JSON: {str(e) or type(e).__name__}") from None
    except OSError as e:
        raise AttnzooError(f"cannot read {path}: {e.strerror or e}") from None


def recorded_data_root(record: Mapping[str, Any] | None) -> Path | None:
    """The data folder a run's ``attnzoo.json`` records, where it names one absolutely (a relative one is relative
    to a folder the run does not record, and the demo's name is attnzoo's cache): where no output may go."""
    root = ((record or {}).get("data") or {}).get("root")
    return Path(root) if isinstance(root, str) and os.path.isabs(root) else None


def weights_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A safetensors file's header (tensor name -> dtype, shape), read without torch and without the tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return {k: v for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, RecursionError) as e:  # never unpickled: a safetensors file or nothing
        raise AttnzooError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from None


def parameter_count(path: str | os.PathLike) -> int:
    """Parameters in a safetensors file, from its header (normalisation running statistics excluded)."""
    import math

    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(v["shape"]) for k, v in weights_header(path).items() if not k.endswith(skip))


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], dialect: str = "excel") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, dialect=dialect, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs; with ``started`` (``process_started``), whether it is still that
    process and not a new one that got its number."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # no process can have that number
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or process_started(pid) in (None, started)


def process_started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc), or None where that is unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None


# --- the run folder -----------------------------------------------------------------------------------------------

class RunFolder:
    """One run folder: claimed for a new run (or opened to resume one), ``attnzoo.json`` read against
    ``RunConfig``, the run's status moved by ``start`` -> ``failed`` | ``interrupted`` | ``finished``, each file
    written atomically. ``record`` is the run's ``attnzoo.json`` as this process last wrote or read it.

    One exclusive file, ``LOCK`` (this host, pid and process start time), makes a folder this process's: it is
    created when a new run claims the folder (two runs claiming one at once: exactly one gets it) or when a run is
    resumed, and removed when training ends. A lock left by a process of this host that is gone (killed), or whose
    pid a new process has since been given, is stale and taken over; one from another host is trusted."""

    def __init__(self, path: str | os.PathLike, record: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.record: dict[str, Any] = dict(record or {})
        self._locked = False  # holding LOCK
        self._created = False  # this process made the folder
        self._parents: list[Path] = []  # folders above it that claiming made

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # claiming and locking -------------------------------------------------------------------------------------

    @classmethod
    def claim(cls, path: str | os.PathLike) -> RunFolder:
        """The folder for a new run: ``path``, created, or an existing empty folder; locked. Of two runs
        claiming one folder at once, exactly one gets it; the other gets an ``AttnzooError``."""
        folder = cls(path)
        if folder.path.exists() and not folder.path.is_dir():
            raise AttnzooError(f"{folder.path} is a file, not a folder; choose another folder")
        if folder._take(new_only=False):
            return folder
        if (folder.path / LOCK).exists() and not (folder.path / CONFIG).exists():
            raise AttnzooError(f"{folder.path} is being claimed by another attnzoo fit; choose another folder "
                               f"(if none is running, delete {folder.path / LOCK})")
        raise AttnzooError(f"{folder.path} already exists and is not empty; choose another folder "
                           f"(or continue that run with --resume {folder.path})")

    @classmethod
    def claim_new(cls, base: str | os.PathLike) -> RunFolder:
        """A new folder named ``base``, or ``base-2``, ``base-3``... when taken (for default run names)."""
        base, n = Path(base), 1
        while True:
            folder = cls(base if n == 1 else base.with_name(f"{base.name}-{n}"))
            if folder._take(new_only=True):
                return folder
            n += 1

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunFolder:
        """An existing run folder, its ``attnzoo.json`` read."""
        folder = cls(path)
        folder.record = folder.read_config()
        return folder

    def _take(self, new_only: bool) -> bool:
        """Claim: create the folder (``new_only``: it must not exist), then ``LOCK`` in it exclusively, then check
        that nothing else is there. Lock first, check second: a run that checks while another holds the lock
        fails to take it, and one that takes it after a run started finds that run's files."""
        try:
            for attempt in range(3):  # a run that never started may remove runs/ between our two mkdirs
                missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._parents = missing  # made for this run (runs/): removed with it when it never starts
                try:
                    os.mkdir(self.path)
                    self._created = True
                    break
                except FileExistsError:
                    if new_only:
                        return False
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            if not self._create_lock():
                return False
            if any(name != LOCK for name in os.listdir(self.path)):
                self._created = False  # someone else's files: the folder is not ours to remove
                self.release()
                return False
            return True
        except OSError as e:
            raise AttnzooError(f"cannot create the run folder {self.path}: {e.strerror or e}") from None

    def _create_lock(self) -> bool:
        """``LOCK``, created exclusively for this process (claim and resume alike); a killed run's stale lock is
        taken over. False when another process holds it, or keeps taking it."""
        for _ in range(2):
            try:
                fd = os.open(self.path / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if not self._stale_lock():
                    return False
                (self.path / LOCK).unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                started = process_started(os.getpid())
                f.write(f"{socket.gethostname()} {os.getpid()}" + (f" {started}" if started is not None else ""))
            self._locked = True
            return True
        return False

    def lock(self) -> None:
        """Only one process trains in a run folder at a time: a second ``--resume`` of a run, or one of a run still
        training, is refused."""
        lock = self.path / LOCK
        try:
            if self._create_lock():
                return
        except OSError as e:
            raise AttnzooError(f"cannot write in the run folder {self.path}: {e.strerror or e}") from None
        if lock.is_dir() or not lock.is_file():
            kind = "folder" if lock.is_dir() else "special file"
            raise AttnzooError(f"{lock} is not attnzoo's lock file (a {kind}); remove it, then run again")
        host, pid = [*lock.read_text(errors="replace").split(), "?", "0"][:2]
        raise AttnzooError(f"another attnzoo fit (pid {pid[:20]} on {host[:60]}) is training in {self.path}; wait "
                           f"for it to end (if none is running, delete {lock})")

    def _stale_lock(self) -> bool:
        """Whether ``LOCK`` is a killed run's: its process, of this host, is gone or its pid is another's now."""
        try:
            host, pid, started = [*(self.path / LOCK).read_text(errors="replace").split(), "?", "0", ""][:3]
        except OSError:  # none, a folder, unreadable: not a stale lock to take over
            return False
        started = int(started) if started.isdigit() else None  # absent without /proc, and from older locks
        return host == socket.gethostname() and (not pid.isdigit() or not process_alive(int(pid), started))

    def unlock(self) -> None:
        """Training in this folder has ended (done, failed or interrupted)."""
        if self._locked:
            self._locked = False
            (self.path / LOCK).unlink(missing_ok=True)

    def release(self) -> None:
        """Give up a claim whose run never wrote its ``attnzoo.json`` (it failed first): the lock goes, and the
        folder with it when this process made it and nothing else is in it. Only the lock goes once the run has
        started."""
        self.unlock()
        if not self._created or (self.path / CONFIG).exists():
            return
        for folder in (self.path, *self._parents):
            try:
                folder.rmdir()
            except OSError:
                break  # something else was written there: keep it

    def can_resume(self) -> bool:
        """The run left a checkpoint to continue from (``fit(resume=...)``)."""
        return (self.path / LAST).is_file()

    def clear(self) -> None:
        """Empty the folder of a run that left nothing to resume (it stopped before its first checkpoint), so that
        the run can be claimed and started again (a sweep's trial that was killed). Done under the lock: never
        under a run that is still training."""
        self.lock()
        try:
            for p in self.path.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise AttnzooError(f"cannot empty the run folder {self.path}: {e.strerror or e}") from None
        finally:
            self.unlock()

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporary files a killed attnzoo left (``.NAME.XXXXXXXX.tmp``, and safetensors'
        ``.tmpXXXXXX``) in the run folder and ``checkpoints/``, and nothing else."""
        removed = []
        for folder in (self.path, self.path / CHECKPOINTS):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    # reading --------------------------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """``attnzoo.json``, checked against ``RunConfig``: any problem is one ``AttnzooError`` line."""
        path = self.path / CONFIG
        if not path.is_file():
            hint = (f"; it is a sweep folder, whose runs are {self.path / TRIALS}/*"
                    if (self.path / JOURNAL).is_file() else "")
            raise AttnzooError(f"not a run folder (no {CONFIG}): {self.path}{hint}")
        return check_config(read_json(path), path)

    def read_skipped(self) -> list[tuple[str, str]]:
        """``skipped.txt`` as (path, reason) rows."""
        with open(self.path / SKIPPED, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return [(row[0], row[1]) for row in list(csv.reader(f, dialect="excel-tab"))[1:]]

    # the lifecycle --------------------------------------------------------------------------------------------

    def start(self, record: Mapping[str, Any], skipped: Sequence[tuple[Any, str]] = ()) -> None:
        """The run starts: ``attnzoo.json`` with ``status: training`` (and ``skipped.txt``)."""
        if skipped:
            replace_text(self.path / SKIPPED, _csv_text(["path", "reason"], ((str(p), r) for p, r in skipped),
                                                        dialect="excel-tab"))
        self._write({**record, "status": "training"})

    def update(self, **entries: Any) -> dict[str, Any]:
        """Set top-level entries of ``attnzoo.json`` (what a later command adds, as ``interpret``'s scores),
        keeping the rest as it is, the versions of the training included."""
        record = check_config({**self.read_config(), **entries}, self.path / CONFIG)
        replace_text(self.path / CONFIG, json.dumps(record, indent=2, default=str))
        self.record = record
        return record

    def failed(self, reason: str, history: Sequence[Mapping[str, float]] = (), resume: str | None = None,
               **entries: Any) -> None:
        """``status: failed`` with the reason and, when the run can go on, the command that resumes it."""
        self._write({**self.record, **entries, "status": "failed", "error": reason, "resume": resume,
                     "metrics": {"per_epoch": [dict(row) for row in history]}})

    def interrupted(self, reason: str | None, history: Sequence[Mapping[str, float]] = (), model: Any = None,
                    **entries: Any) -> None:
        """``status: interrupted``, with the weights at the interruption when a model is given."""
        record = {**self.record, **entries, "status": "interrupted"}
        if reason is not None:
            record["error"] = reason
        if model is None:
            self._write({**record, "metrics": {"per_epoch": [dict(row) for row in history]}})
        else:
            self._save(model, record, history)

    def finished(self, model: Any, history: Sequence[Mapping[str, float]], **entries: Any) -> None:
        """``status: done``: weights, history, then ``attnzoo.json`` (a run whose record says done has its
        weights). The last checkpoint goes (the model is the finished one), and the best one too when its
        weights are the model's: no weights twice in a run folder."""
        best = dict(entries.pop("best", None) or self.record.get("best") or {})
        if best:
            best["weights"] = WEIGHTS if best.get("epoch") == len(history) else BEST
        self._save(model, {**self.record, **entries, "status": "done", "best": best}, history)
        (self.path / LAST).unlink(missing_ok=True)
        if best.get("weights") == WEIGHTS:
            (self.path / BEST).unlink(missing_ok=True)
        try:
            (self.path / CHECKPOINTS).rmdir()  # when nothing is left in it
        except OSError:
            pass

    def save(self, model: Any, record: Mapping[str, Any], history: Sequence[Mapping[str, float]] = ()) -> Path:
        """Weights, history and ``attnzoo.json`` as they are given (a run made outside ``fit``)."""
        self._save(model, dict(record), history)
        return self.path

    def _save(self, model: Any, record: dict[str, Any], history: Sequence[Mapping[str, float]]) -> None:
        from safetensors.torch import save_model

        history = [dict(row) for row in history]
        record["metrics"] = {**(record.get("metrics") or {}), "per_epoch": history}
        if history:
            record["metrics"]["final"] = {k: v for k, v in history[-1].items() if k not in ("epoch", "time")}
        replace(self.path / WEIGHTS, lambda tmp: save_model(model, str(tmp)))
        if history:
            keys = list(dict.fromkeys(k for row in history for k in row))
            replace_text(self.path / HISTORY, _csv_text(keys, ([row.get(k, "") for k in keys] for row in history)))
        self._write(record)

    def _write(self, record: Mapping[str, Any]) -> None:
        """(Re)write ``attnzoo.json`` with the format version and package versions."""
        self.record = {"format": FORMAT_VERSION, **record, "versions": versions()}
        replace_text(self.path / CONFIG, json.dumps(self.record, indent=2, default=str))  # \udcXX for non-UTF-8


def path_label(name: str | None) -> str:
    """An attention module's name as part of a folder name: a plugin's qualified ``dist:name`` holds no ':'."""
    return (name or "none").replace(":", "_")


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder attnzoo made for a run (it holds ``attnzoo.json``): never read as data."""
    return (Path(path) / CONFIG).is_file()


def is_own_folder(path: str | os.PathLike) -> str | None:
    """What attnzoo made folder ``path`` for, or None: a run (``attnzoo.json``), a run being claimed (only its
    lock, before its ``attnzoo.json``), a sweep (its journal). Never read as data."""
    path = Path(path)
    if is_run_folder(path):
        return "an attnzoo run folder"
    if (path / LOCK).is_file():
        return "an attnzoo run folder being made"
    if (path / JOURNAL).is_file():
        return "an attnzoo sweep folder"
    return None


def latest_run(root: str | os.PathLike = "runs") -> Path:
    """The newest run folder under ``root``."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{CONFIG}") if (p.parent / WEIGHTS).is_file()] if root.is_dir() else []
    if not runs:
        raise AttnzooError(f"no run folder under {root}/ (train one with `attnzoo fit`, or pass --run DIR)")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)
