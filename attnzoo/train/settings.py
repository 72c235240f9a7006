"""``FitConfig``: every setting of a training run, checked in one place.

``attnzoo fit`` and ``attnzoo.fit(...)`` both build one, so a Python user gets the same checks as the command
line; the run's ``request`` in ``attnzoo.json`` is its dict, and ``--resume`` rebuilds it from there. This file
imports neither torch nor timm: a mistake is reported before the slow imports start. Only the checks that need
timm (the backbone name, the sites, the module's options) come later, in ``learner._fit``.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AttnzooError
from .threads import check_threads, cpu_budget

MAX_EPOCHS = 10_000
MAX_IMG_SIZE = 4096
MAX_BS = 65_536
# a batch of bs images of img_size² pixels: 2**27 float32 RGB pixels is 1.5 GiB for the input alone, and a
# backbone's activations take tens of times more (32 images of 2048², or 8 of 4096²)
MAX_BATCH_PIXELS = 2**27
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_LR = 10.0
# what resume may change: the run's own settings come from its attnzoo.json
RESUME_MAY_SET = ("resume", "num_workers", "threads")
# what a run's request does not hold: where the run goes
NOT_REQUESTED = ("out", "runs_dir", "resume")


def flag(name: str) -> str:
    """The command-line option of a setting."""
    return {"num_workers": "--workers", "attn_options": "--attn-arg"}.get(name, "--" + name.replace("_", "-"))


def parse_attn_args(items: Iterable[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as a dict; a key given twice is a mistake, not last-wins."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise AttnzooError(f"--attn-arg takes KEY=VALUE, got '{item}'")
        if key in out:
            raise AttnzooError(f"--attn-arg {key} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def _leave_out(names: Iterable[str]) -> None:
    extra = [n for n in names if n not in RESUME_MAY_SET]
    if extra:
        raise AttnzooError(f"--resume continues a run with its own settings; leave out "
                           f"{', '.join(flag(n) for n in extra)}")


@dataclass(frozen=True)
class FitConfig:
    """What ``fit`` trains, and where the run folder goes. Constructing one checks every value.

    ``attn``: a module name, or None / ``"none"`` for the baseline. ``lr``: a number or ``"auto"`` (fastai's
    ``lr_find``). ``img_size``: default the backbone's (64 for ``data="demo"``). ``num_workers``: DataLoader
    workers, default 0 on CPU and up to 8 on GPU. ``threads``: torch's CPU threads, a number or ``"auto"`` (the
    idle cores: ``attnzoo.threads``); None leaves torch's setting alone. ``out``: the run folder (default
    ``runs_dir/<name>-<time>``). ``resume``: an interrupted run folder to continue with its own settings; only
    ``num_workers`` and ``threads`` may be given with it.
    """

    backbone: str | None = None
    attn: str | None = None
    data: str = "demo"
    at: Any = None
    attn_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    lr: float | str = 1e-2  # with Adam's one-cycle, from scratch and fine-tuning alike: README "Defaults that learn"
    bs: int = 32
    img_size: int | None = None
    pretrained: bool = True
    weights: str | None = None
    valid_pct: float = 0.2
    seed: int = 0
    freeze_epochs: int = 1
    num_workers: int | None = None
    threads: int | str | None = None
    checkpoints: bool = True
    sync_bn: bool = False
    compile: bool = False
    out: str | None = None
    runs_dir: str = "runs"
    resume: str | None = None

    @classmethod
    def of(cls, **given: Any) -> FitConfig:
        """A config from the settings a caller gave (``attnzoo.fit``'s keywords, the options typed on the command
        line): unlike the constructor, this also refuses a setting given with ``resume`` at its default value."""
        if given.get("resume") is not None:
            _leave_out(given)
        return cls(**given)

    @classmethod
    def from_request(cls, request: Mapping[str, Any], **overrides: Any) -> FitConfig:
        """The config of a run from its ``request`` (also of runs written before some settings existed)."""
        known = {f.name for f in fields(cls)} - set(NOT_REQUESTED)
        return cls(**{**{k: v for k, v in request.items() if k in known}, **overrides})

    def request(self) -> dict[str, Any]:
        """The settings as JSON-ready data, without where the run goes: what ``--resume`` reuses."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_REQUESTED}

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("backbone", "attn", "data", "weights", "out", "runs_dir", "resume"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise AttnzooError(f"{name} must be a string, got {value!r}")
                set_(name, os.fspath(value))
        if self.resume is not None:
            _leave_out(f.name for f in fields(self) if getattr(self, f.name) != _default(f))
        elif self.backbone is None:
            raise AttnzooError("fit needs --backbone (or --resume RUN)")
        if self.attn == "none":
            set_("attn", None)
        if isinstance(self.at, (list, tuple)) and not self.at:
            set_("at", None)
        if not isinstance(self.attn_options, Mapping):
            raise AttnzooError(f"attn_options must be a mapping of option names to values, got {self.attn_options!r}")
        set_("attn_options", dict(self.attn_options))
        if self.attn is None and (self.attn_options or self.at is not None):
            raise AttnzooError("--at and --attn-arg need an attention module (got --attn none)")

        for name in ("pretrained", "checkpoints", "sync_bn", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise AttnzooError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._whole("epochs", 1, MAX_EPOCHS)
        self._whole("freeze_epochs", 0, MAX_EPOCHS)
        self._whole("bs", 1, MAX_BS)
        self._whole("seed", 0, MAX_SEED, "seeds are 32-bit: 0 to 2**32 - 1")
        if self.img_size is not None:
            self._whole("img_size", 16, MAX_IMG_SIZE, "larger images do not fit a training batch in memory")
            pixels = self.bs * self.img_size**2
            if pixels > MAX_BATCH_PIXELS:
                raise AttnzooError(
                    f"bs x img_size² = {self.bs} x {self.img_size}² = {pixels / 1e6:.0f}M pixels per batch is over "
                    f"the {MAX_BATCH_PIXELS / 1e6:.0f}M that fit in memory (the input batch alone would take "
                    f"{pixels * 12 / 2**30:.1f} GiB, the activations tens of times more); lower bs or img_size")
        if self.num_workers is not None:
            cpus = cpu_budget()
            if _whole_number(self.num_workers) and self.num_workers < 0:
                raise AttnzooError(f"workers must be 0 or more, got {self.num_workers}")
            self._whole("num_workers", 0, cpus, "the CPUs this process may use", label="workers")
        set_("threads", check_threads(self.threads))
        if not isinstance(self.valid_pct, numbers.Real) or not 0 < self.valid_pct < 1:
            raise AttnzooError(f"valid_pct must be between 0 and 1, got {self.valid_pct!r}")
        set_("valid_pct", float(self.valid_pct))
        set_("lr", _learning_rate(self.lr))
        self._check_paths()

    def _whole(self, name: str, low: int, high: int, why: str = "", label: str = "") -> None:
        """``name`` must be a whole number in ``[low, high]``; ``why`` says where the upper bound comes from."""
        label, value = label or name, getattr(self, name)
        if not _whole_number(value):
            raise AttnzooError(f"{label} must be a whole number, got {value!r}")
        if value < low:
            raise AttnzooError(f"{label} must be at least {low}, got {value}")
        if value > high:
            raise AttnzooError(f"{label} must be at most {high}{f' ({why})' if why else ''}, got {value}")
        object.__setattr__(self, name, int(value))

    def _check_paths(self) -> None:
        if self.weights is not None and not Path(self.weights).is_file():
            raise AttnzooError(f"weights file not found: {self.weights}")
        if self.resume is None:  # resume reads and writes its own folder, checked when it is read
            target, what = (self.out, "--out") if self.out is not None else (self.runs_dir, "runs folder")
            _check_writable(Path(target), what)


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _whole_number(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _learning_rate(lr: Any) -> float | str:
    if lr == "auto":
        return "auto"
    if isinstance(lr, str):
        try:
            lr = float(lr)
        except ValueError:
            raise AttnzooError(f"--lr takes a number or 'auto', got '{lr}'") from None
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise AttnzooError(f"--lr takes a number or 'auto', got {lr!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise AttnzooError(f"lr must be a positive number, got {lr}")
    if lr > MAX_LR:
        raise AttnzooError(f"lr must be at most {MAX_LR:g}, got {lr:g}")
    return float(lr)


def _check_writable(path: Path, what: str) -> None:
    """A folder can be made at ``path``: its nearest existing parent is a folder this process can write in.

    Tried, not inferred from permission bits: root passes ``os.access`` on read-only places such as /proc."""
    parent = path.absolute()
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        if parent == path.absolute():
            return  # an existing file at --out: the run folder's own check says so
        raise AttnzooError(f"{what} {path} cannot be made: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnzoo-write-test-", dir=parent))
    except OSError as e:
        raise AttnzooError(f"{what} {path} cannot be made: cannot write in {parent} "
                           f"({e.strerror or type(e).__name__})") from None


DEFAULTS: dict[str, Any] = {f.name: _default(f) for f in fields(FitConfig)}
