"""The run folder: what ``fit`` writes and ``load_run`` reads. JSON and safetensors only, never a pickle.

    runs/<name>/attnzoo.json       config, classes, preprocessing, versions, metrics, skipped files
    runs/<name>/model.safetensors  the weights
    runs/<name>/history.csv        one row per epoch
    runs/<name>/skipped.txt        the files training left out: tab-separated path and reason, CSV quoting
    runs/<name>/*.png              plots

``RunFolder`` owns it: it claims a folder for a new run (an exclusive create, so two runs started together
never share one), reads ``attnzoo.json`` against one schema (``RunConfig``), and writes every file to a
temporary name that is renamed into place (a crash never leaves half a file; the mode follows the umask).

Loading needs neither fastai nor torchvision: preprocessing is PIL + torch, as in training (squash
resize, then the backbone's normalisation).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..train.data import RUN_MARKER
from ..errors import AttnzooError
from ..model.create import AttentionModel, create_model
from .outputs import write_temporary

CONFIG = RUN_MARKER  # attnzoo.json: data.py, which must not import torch, keeps the name
WEIGHTS = "model.safetensors"
HISTORY = "history.csv"
SKIPPED = "skipped.txt"
CLAIM = ".attnzoo-claim"  # exists only while a new run folder is claimed and its attnzoo.json not yet written
TRAINING = ".attnzoo-training"  # "host pid" of the process training in the folder, while it does
FORMAT_VERSION = 1
# temporary files in a run folder: attnzoo's ".NAME.XXXXXXXX.tmp" (the shape tempfile.mkstemp gave them before
# too), and ".tmpXXXXXX", where safetensors writes a file before renaming it onto attnzoo's
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)`` then rename: a crash never leaves a half-written file behind; the file gets the
    mode the user's umask gives (``outputs.write_temporary``)."""
    tmp = write_temporary(Path(path), write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    """Text as UTF-8; file names that are not UTF-8 (surrogate escapes) keep their original bytes."""
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], dialect: str = "excel") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, dialect=dialect, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


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


class _Strict(BaseModel):
    # strict: "32" is not an image size and 1 is not True; extra: a newer attnzoo's fields are kept, not refused
    model_config = ConfigDict(strict=True, extra="allow")


class SkippedFile(_Strict):
    path: str
    reason: str


class Metrics(_Strict):
    per_epoch: list[dict[str, Any]] = Field(default_factory=list)
    final: dict[str, Any] = Field(default_factory=dict)


class RunConfig(_Strict):
    """``attnzoo.json``: every field attnzoo reads, with its type; ``load_run`` and ``--resume`` check it."""

    format: int = Field(FORMAT_VERSION, ge=1)
    status: Literal["training", "interrupted", "failed", "done"] | None = None
    backbone: str = Field(min_length=1)
    attn: str | None = None
    attn_options: dict[str, Any] = Field(default_factory=dict)
    sites: list[str] = Field(default_factory=list)
    classes: list[str] = Field(min_length=1)
    img_size: int = Field(ge=1)
    mean: list[Finite] = Field(min_length=3, max_length=3)
    std: list[Positive] = Field(min_length=3, max_length=3)
    seed: int | None = None
    pretrained: bool | None = None
    weights: str | None = None
    data: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    best: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    skipped: list[SkippedFile] = Field(default_factory=list)
    error: str | None = None
    resume: str | None = None
    distributed: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None
    faithfulness: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)


def check_config(config: Any, where: str | os.PathLike = CONFIG) -> dict[str, Any]:
    """``config`` if it is a valid ``attnzoo.json``, else one ``AttnzooError`` line naming the field and the problem."""
    if not isinstance(config, dict):
        raise AttnzooError(f"{where}: must hold a JSON object, not {json.dumps(config)[:40]}")
    fmt = config.get("format", FORMAT_VERSION)
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise AttnzooError(f"{where}: written by a newer attnzoo (format {fmt}; this one reads {FORMAT_VERSION}): "
                           "upgrade attnzoo")
    try:
        RunConfig.model_validate(config)
    except ValidationError as e:
        first = e.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"])
        problem = "missing" if first["type"] == "missing" else (
            f"{first['msg'][0].lower()}{first['msg'][1:]}, got {json.dumps(first['input'], default=str)[:60]}")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise AttnzooError(f"{where}: {field_name}: {problem}{more}") from None
    if len(set(config["classes"])) != len(config["classes"]):
        raise AttnzooError(f"{where}: classes: a class is named twice")
    return config


# --- the run folder -----------------------------------------------------------------------------------------------

class RunFolder:
    """One run folder: claims it for a new run, reads ``attnzoo.json`` against ``RunConfig``, writes each file
    atomically. attnzoo writes only into a folder it claimed (a new run) or one holding a run (``--resume``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._claimed = False  # holding CLAIM: attnzoo.json is not written yet
        self._created = False  # this process made the folder
        self._locked = False  # holding TRAINING
        self._parents: list[Path] = []  # folders above it that claiming made

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # claiming -----------------------------------------------------------------------------------------------------

    @classmethod
    def claim(cls, path: str | os.PathLike) -> RunFolder:
        """The folder for a new run: ``path``, created, or an existing empty folder. Of two runs claiming one
        folder at once, exactly one gets it; the other gets an ``AttnzooError``."""
        folder = cls(path)
        if folder.path.exists() and not folder.path.is_dir():
            raise AttnzooError(f"{folder.path} is a file, not a folder; choose another folder")
        if folder._take(new_only=False):
            return folder
        if (folder.path / CLAIM).exists() and len(os.listdir(folder.path)) == 1:
            raise AttnzooError(f"{folder.path} is being claimed by another attnzoo fit; choose another folder "
                               f"(if none is running, delete {folder.path / CLAIM})")
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

    def _take(self, new_only: bool) -> bool:
        """Claim: create the folder (``new_only``: it must not exist), then ``CLAIM`` in it exclusively, then
        check that nothing else is there. Claim first, check second: a run that checks while another holds the
        claim fails to take it, and one that takes it after a run started finds that run's files."""
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
            try:
                os.close(os.open(self.path / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                return False
            self._claimed = True
            if any(name != CLAIM for name in os.listdir(self.path)):
                self._created = False  # someone else's files: the folder is not ours to remove
                self.release()
                return False
            return True
        except OSError as e:
            raise AttnzooError(f"cannot create the run folder {self.path}: {e.strerror or e}") from None

    def lock(self) -> None:
        """Only one process trains in a run folder at a time (a second ``--resume`` of a run, or one of a run still
        training, is refused): ``TRAINING`` holds this host and pid while it trains. A lock left by a process of
        this host that is gone (killed) is stale and taken over; one from another host is trusted."""
        me = f"{socket.gethostname()} {os.getpid()}"
        lock = self.path / TRAINING
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                host, pid = ([*lock.read_text(errors="replace").split(), "?", "0"])[:2]
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    lock.unlink(missing_ok=True)  # its process is gone: a killed run's lock
                    continue
                raise AttnzooError(f"another attnzoo fit (pid {pid} on {host}) is training in {self.path}; wait for "
                                   f"it to end (if none is running, delete {lock})") from None
            except OSError as e:
                raise AttnzooError(f"cannot write in the run folder {self.path}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._locked = True
            return
        raise AttnzooError(f"cannot take {lock}: another process keeps taking it")

    def unlock(self) -> None:
        """Training in this folder has ended (done, failed or interrupted)."""
        if self._locked:
            self._locked = False
            (self.path / TRAINING).unlink(missing_ok=True)

    def release(self) -> None:
        """Give up a claim whose run never wrote its ``attnzoo.json`` (it failed first): the claim goes, and the
        folder with it when this process made it and nothing else is in it. No-op once the run has started."""
        if not self._claimed:
            return
        self._claimed = False
        (self.path / CLAIM).unlink(missing_ok=True)
        if self._created:
            for folder in (self.path, *self._parents):
                try:
                    folder.rmdir()
                except OSError:
                    break  # something else was written there: keep it

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporary files a killed attnzoo left (``.NAME.XXXXXXXX.tmp``, and safetensors'
        ``.tmpXXXXXX``) in the run folder and ``checkpoints/``, and nothing else."""
        removed = []
        for folder in (self.path, self.path / "checkpoints"):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    # reading ------------------------------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """``attnzoo.json``, checked against ``RunConfig``: any problem is one ``AttnzooError`` line."""
        path = self.path / CONFIG
        if not path.is_file():
            raise AttnzooError(f"not a run folder (no {CONFIG}): {self.path}")
        try:
            config = json.loads(path.read_bytes())
        except ValueError as e:  # not JSON, or not UTF-8
            raise AttnzooError(f"{path} is not valid JSON: {e}") from None
        return check_config(config, path)

    def read_skipped(self) -> list[tuple[str, str]]:
        """``skipped.txt`` as (path, reason) rows."""
        with open(self.path / SKIPPED, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return [(row[0], row[1]) for row in list(csv.reader(f, dialect="excel-tab"))[1:]]

    # writing ------------------------------------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        """(Re)write ``attnzoo.json`` with the format version and package versions. The first one marks the
        folder as taken, so the claim goes."""
        config = {"format": FORMAT_VERSION, **config, "versions": versions()}
        _write_text(self.path / CONFIG, json.dumps(config, indent=2, default=str))  # ASCII: \udcXX for non-UTF-8
        if self._claimed:
            self._claimed = False
            (self.path / CLAIM).unlink(missing_ok=True)

    def update_config(self, **entries: Any) -> dict[str, Any]:
        """Set top-level entries of ``attnzoo.json`` (what a later command adds, as ``interpret``'s scores),
        keeping the rest as it is, the versions of the training included."""
        config = check_config({**self.read_config(), **entries}, self.path / CONFIG)
        _write_text(self.path / CONFIG, json.dumps(config, indent=2, default=str))
        return config

    def write_weights(self, model: torch.nn.Module) -> None:
        from safetensors.torch import save_model

        _atomic_write(self.path / WEIGHTS, lambda tmp: save_model(model, str(tmp)))

    def write_history(self, rows: Sequence[dict[str, float]]) -> None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        _write_text(self.path / HISTORY, _csv_text(keys, ([row.get(k, "") for k in keys] for row in rows)))

    def write_skipped(self, skipped: Iterable[tuple[Any, str]]) -> None:
        """The files training left out: tab-separated, quoted where a name holds a tab, newline or quote."""
        _write_text(self.path / SKIPPED, _csv_text(["path", "reason"], ((str(p), r) for p, r in skipped),
                                                   dialect="excel-tab"))

    def save(self, model: torch.nn.Module, config: dict[str, Any], history: Iterable[dict[str, float]] = ()) -> Path:
        """Weights, history and ``attnzoo.json`` (last: a run whose config says done has its weights)."""
        history = list(history)
        config = dict(config)
        config["metrics"] = dict(config.get("metrics") or {})
        config["metrics"]["per_epoch"] = history
        if history:
            config["metrics"]["final"] = {k: v for k, v in history[-1].items() if k not in ("epoch", "time")}
        self.write_weights(model)
        if history:
            self.write_history(history)
        self.write_config(config)
        return self.path

    def mark_failed(self, config: dict[str, Any], reason: str, resume: str | None = None) -> None:
        """``status: failed`` with the reason and, when the run can go on, the command that resumes it."""
        self.write_config({**config, "status": "failed", "error": reason, "resume": resume})


def save_run(path: str | os.PathLike, model: AttentionModel, config: dict[str, Any],
             history: Iterable[dict[str, float]] = ()) -> Path:
    """Write the run folder (atomically, file by file)."""
    return RunFolder(path).save(model, config, history)


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """(Re)write ``attnzoo.json`` atomically, with the format version and package versions."""
    RunFolder(path).write_config(config)


def latest_run(root: str | os.PathLike = "runs") -> Path:
    """The newest run folder under ``root``."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{CONFIG}") if (p.parent / WEIGHTS).is_file()] if root.is_dir() else []
    if not runs:
        raise AttnzooError(f"no run folder under {root}/ (train one with `attnzoo fit`, or pass --run DIR)")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)
