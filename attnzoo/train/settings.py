"""``FitConfig``: every setting of a training run, declared once and checked in one place.

Each setting is a field declared with ``setting(...)``: its default, its help, its command-line option. The
``attnzoo fit`` options are generated from these declarations (``cli_settings``), ``attnzoo.fit(...)`` takes
them as keywords, the run's ``request`` in ``attnzoo.json`` is their dict (``--resume`` rebuilds the config from
it), and the docs' settings table is generated from them: adding a setting is one edit here.

This file imports neither torch nor timm: a mistake is reported before the slow imports start. Only the checks
that need timm (the backbone name, the sites, the module's options) come later, in ``fit``.
"""

from __future__ import annotations

import math
import numbers
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AttnzooError
from ..runs.outputs import check_writable
from .threads import check_threads, cpu_budget

MAX_EPOCHS = 10_000
MIN_IMG_SIZE = 16
MAX_IMG_SIZE = 4096
MAX_BS = 65_536
# a batch of bs images of img_size² pixels: 2**27 float32 RGB pixels is 1.5 GiB for the input alone, and a
# backbone's activations take tens of times more (32 images of 2048², or 8 of 4096²)
MAX_BATCH_PIXELS = 2**27
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_LR = 10.0


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, cli: type | Any = None,
            cli_default: Any = MISSING, on_resume: bool = False, requested: bool = True, on_cli: bool = True,
            default_factory: Any = MISSING) -> Any:
    """A fit setting: a dataclass field whose metadata says how the command line spells it.

    ``flag``: the option (default ``--`` + the name with dashes); a ``--x/--no-x`` pair for booleans unless the
    flag is given. ``cli``: the option's type when it differs from the field's (``--attn-arg`` takes a list of
    ``KEY=VALUE``). ``cli_default``: the option's default when it differs from Python's. ``on_resume``: may be
    given with ``--resume``. ``requested``: part of the run's ``request`` (not where the run goes).
    ``on_cli``: an option of ``attnzoo fit``."""
    meta = dict(help=help, flag=flag, cli=cli, cli_default=cli_default, on_resume=on_resume, requested=requested,
                on_cli=on_cli)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def whole_number(value: Any, label: str, low: int, high: int, why: str = "") -> int:
    """``value`` as an int when it is a whole number in ``[low, high]``, else one line naming ``label``; ``why``
    says where the upper bound comes from. Also the sweep's own settings (``--seeds``, ``--jobs``)."""
    if not _whole_number(value):
        raise AttnzooError(f"{label} must be a whole number, got {value!r}")
    if value < low:
        raise AttnzooError(f"{label} must be at least {low}, got {value}")
    if value > high:
        raise AttnzooError(f"{label} must be at most {high}{f' ({why})' if why else ''}, got {value}")
    return int(value)


@dataclass(frozen=True)
class FitConfig:
    """What ``fit`` trains, and where the run folder goes. Constructing one checks every value.

    Settings (``None`` means the default):
    """

    backbone: str | None = setting(None, "Any timm model name, e.g. resnet18, vgg16_bn, convnext_tiny. Required "
                                         "unless --resume.")
    attn: str | None = setting(None, "Attention module (`attnzoo list`), or 'none' for the baseline. Required "
                                     "unless --resume.")
    data: str | None = setting(None, "Image folder (train/ + valid/, Intel seg_train/, or class folders), or "
                                     "'demo' for the built-in synthetic set. Required unless --resume.")
    at: Any = setting(None, "Site(s) from `attnzoo layers BACKBONE`, or feature-level indices (-2 = the level "
                            "before the last). Repeatable.", cli=list[str] | None)
    attn_options: dict[str, Any] = setting(
        help="Module option KEY=VALUE (see `attnzoo list`). Repeatable, once per key.", flag="--attn-arg",
        cli=list[str] | None, cli_default=None, default_factory=dict)
    epochs: int = setting(5, "Epochs (after the frozen ones when pretrained).")
    # 1e-2 with Adam's one-cycle, from scratch and fine-tuning alike: the docs' "Defaults that learn"
    lr: float | str = setting(1e-2, "Learning rate, or 'auto' for fastai's lr_find.", cli=str)
    bs: int = setting(32, "Batch size, per process under torchrun / accelerate launch.")
    img_size: int | None = setting(None, f"Images are resized to this, {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (default: "
                                         "the backbone's; 64 for demo).")
    pretrained: bool = setting(True, "Start from timm's pretrained weights.")
    weights: str | None = setting(None, "Local backbone weights (.safetensors/.pth state dict).", cli=Path | None)
    valid_pct: float = setting(0.2, "Validation share when the folder has no valid/ split.")
    freeze_epochs: int = setting(1, "Epochs with the pretrained body frozen, before the rest.")
    seed: int = setting(0, "Random seed (data split, init, order), 0 to 2**32-1.")
    in_chans: int | None = setting(None, "Image channels: 1 reads every image as grey (one-channel data: X-ray, "
                                         "depth); 3 (default) as RGB. timm adapts a pretrained first conv.")
    drop_rate: float | None = setting(None, "Dropout before the classifier (timm's drop_rate).", flag="--drop")
    drop_path_rate: float | None = setting(None, "Stochastic depth (timm's drop_path_rate), for the backbones "
                                                 "that have it.", flag="--drop-path")
    num_workers: int | None = setting(None, "DataLoader workers, at most the CPU count (default: 0 on CPU, up to 8 "
                                            "on GPU).", flag="--workers", on_resume=True)
    threads: int | str | None = setting(
        None, "Torch CPU threads: a number, or 'auto' for the cores no other job is using, measured again every "
              "epoch (one thread on a busy 2-core machine).", cli=str, cli_default="auto", on_resume=True)
    out: str | None = setting(None, "Run folder (default runs/<backbone>-<attn>-<time>); a new or empty folder.",
                              cli=Path | None, requested=False)
    checkpoints: bool = setting(True, "Keep checkpoints/last and checkpoints/best up to date after every epoch "
                                      "(needed for --resume).")
    resume: str | None = setting(None, "Continue an interrupted run folder from its last checkpoint, with its own "
                                       "settings.", cli=Path | None, on_resume=True, requested=False)
    sync_bn: bool = setting(False, "Under torchrun / accelerate launch on GPUs: batch norm statistics over all "
                                   "processes.", flag="--sync-bn")
    compile: bool = setting(False, "torch.compile the model (pays off on GPUs for long runs; see the "
                                   "benchmarks).", flag="--compile")
    plots: bool = setting(True, "Draw the run folder's plots (learning curves, confusion matrix, top losses, "
                                "attention) when training ends; a sweep's many runs may go without.")
    runs_dir: str = setting("runs", "The folder under which default run folders are made.", requested=False,
                            on_cli=False)

    @classmethod
    def of(cls, **given: Any) -> FitConfig:
        """A config from the settings a caller gave (``attnzoo.fit``'s keywords, the options typed on the command
        line, by setting name): unlike the constructor, this also refuses a setting given with ``resume`` at its
        default value, and names what a new run is missing."""
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("resume") is not None:
            _leave_out(given)
        else:  # here the baseline is asked for by name ('none'), never by leaving --attn out
            missing = [flag(n) for n in REQUIRED if n not in given]
            if missing:
                raise AttnzooError(f"fit needs {', '.join(missing)} (or --resume RUN)")
        return cls(**given)

    @classmethod
    def from_request(cls, request: Mapping[str, Any], **overrides: Any) -> FitConfig:
        """The config of a run from its ``request`` (also of runs written before some settings existed)."""
        known = {f.name for f in fields(cls) if f.metadata["requested"]}
        return cls(**{**{k: v for k, v in request.items() if k in known}, **overrides})

    def timm_kwargs(self) -> dict[str, Any]:
        """The settings that are timm's ``create_model`` keywords, where set."""
        return {k: getattr(self, k) for k in TIMM_KEYWORDS if getattr(self, k) is not None}

    def request(self) -> dict[str, Any]:
        """The settings as JSON-ready data, without where the run goes: what ``--resume`` reuses."""
        requested = {f.name for f in fields(self) if f.metadata["requested"]}
        return {k: v for k, v in asdict(self).items() if k in requested}

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
        else:
            missing = [flag(n) for n in REQUIRED if n != "attn" and getattr(self, n) is None]  # attn None: baseline
            if missing:
                raise AttnzooError(f"fit needs {', '.join(missing)} (or --resume RUN)")
        if self.data == "":
            raise AttnzooError("--data is empty: give an image folder, or 'demo'")
        if self.attn == "none":
            set_("attn", None)
        if isinstance(self.at, (list, tuple)) and not self.at:
            set_("at", None)
        if not isinstance(self.attn_options, Mapping):
            raise AttnzooError(f"attn_options must be a mapping of option names to values, got {self.attn_options!r}")
        set_("attn_options", dict(self.attn_options))
        if self.attn is None and (self.attn_options or self.at is not None):
            raise AttnzooError("--at and --attn-arg need an attention module (got --attn none)")

        for name in ("pretrained", "checkpoints", "sync_bn", "compile", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise AttnzooError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._whole("epochs", 1, MAX_EPOCHS)
        self._whole("freeze_epochs", 0, MAX_EPOCHS)
        self._whole("bs", 1, MAX_BS)
        self._whole("seed", 0, MAX_SEED, "seeds are 32-bit: 0 to 2**32 - 1")
        if self.img_size is not None:
            self._whole("img_size", MIN_IMG_SIZE, MAX_IMG_SIZE, "larger images do not fit a training batch in memory")
            check_batch_pixels(self.bs, self.img_size)
        if self.num_workers is not None:
            cpus = cpu_budget()
            if _whole_number(self.num_workers) and self.num_workers < 0:
                raise AttnzooError(f"workers must be 0 or more, got {self.num_workers}")
            self._whole("num_workers", 0, cpus, "the CPUs this process may use", label="workers")
        set_("threads", check_threads(self.threads))
        if self.in_chans is not None:
            self._whole("in_chans", 1, 3)
            if self.in_chans == 2:
                raise AttnzooError("in_chans must be 1 (grey) or 3 (RGB): images have no 2-channel reading")
        for name in ("drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)
                                      or not 0 <= value < 1):
                raise AttnzooError(f"{flag(name)} must be a number from 0 up to (not including) 1, got {value!r}")
        if not isinstance(self.valid_pct, numbers.Real) or not 0 < self.valid_pct < 1:
            raise AttnzooError(f"valid_pct must be between 0 and 1, got {self.valid_pct!r}")
        set_("valid_pct", float(self.valid_pct))
        set_("lr", _learning_rate(self.lr))
        self._check_paths()

    def _whole(self, name: str, low: int, high: int, why: str = "", label: str = "") -> None:
        object.__setattr__(self, name, whole_number(getattr(self, name), label or name, low, high, why))

    def _check_paths(self) -> None:
        if self.weights is not None and not Path(self.weights).is_file():
            raise AttnzooError(f"weights file not found: {self.weights}")
        if self.resume is None:  # resume reads and writes its own folder, checked when it is read
            target, what = (self.out, "--out") if self.out is not None else (self.runs_dir, "runs folder")
            check_writable(Path(target), what)


REQUIRED = ("backbone", "attn", "data")  # of a new run
TIMM_KEYWORDS = ("in_chans", "drop_rate", "drop_path_rate")


@dataclass(frozen=True)
class CliSetting:
    """How ``attnzoo fit`` spells a setting: the parameter name, its option(s), type, default and help."""

    name: str  # the FitConfig field
    param: str  # the command function's parameter (the option without dashes)
    decls: tuple[str, ...]
    type: Any
    default: Any
    help: str


def flag(name: str) -> str:
    """The command-line option of a setting."""
    f = _FIELDS[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def cli_settings() -> list[CliSetting]:
    """The options of ``attnzoo fit``, one per setting, in declaration order."""
    hints = typing.get_type_hints(FitConfig)
    out = []
    for f in fields(FitConfig):
        meta = f.metadata
        if not meta["on_cli"]:
            continue
        option = flag(f.name)
        kind = meta["cli"] if meta["cli"] is not None else hints[f.name]
        default = meta["cli_default"] if meta["cli_default"] is not MISSING else _default(f)
        decls = (option,) if meta["flag"] or kind is not bool else (f"{option}/--no-{option[2:]}",)
        out.append(CliSetting(f.name, option[2:].replace("-", "_"), decls, kind, default, meta["help"]))
    return out


#: settings that name local files: a published command shows a placeholder ('demo' is no file)
LOCAL_PATHS = {"data": "DATA", "weights": "WEIGHTS"}


def fit_command(request: Mapping[str, Any]) -> list[str]:
    """The ``attnzoo fit`` command line that asks for a run's ``request`` again (for its model card): the
    settings that differ from the defaults, local paths as placeholders (``LOCAL_PATHS``), and nothing of the
    machine it ran on (workers, threads)."""
    args = ["attnzoo", "fit"]
    for f in fields(FitConfig):
        meta, value = f.metadata, request.get(f.name)
        if f.name == "attn" and value is None:
            value = "none"  # the baseline is asked for by name on the command line
        if not (meta["on_cli"] and meta["requested"]) or meta["on_resume"] or value is None:
            continue
        if value == DEFAULTS[f.name] and f.name not in REQUIRED:
            continue
        if f.name in LOCAL_PATHS and value != "demo":
            value = LOCAL_PATHS[f.name]
        option = flag(f.name)
        if isinstance(value, bool):
            args.append(option if value else f"--no-{option[2:]}")
        elif isinstance(value, Mapping):
            args += [x for k, v in value.items() for x in (option, f"{k}={v}")]
        elif isinstance(value, (list, tuple)):
            args += [x for v in value for x in (option, str(v))]
        else:
            args += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def from_cli(values: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line values by parameter name -> settings by name (``--attn-arg`` parsed into a dict)."""
    by_param = {s.param: s.name for s in cli_settings()}
    out = {by_param[p]: v for p, v in values.items() if p in by_param}
    if "attn_options" in out:
        out["attn_options"] = parse_attn_args(out["attn_options"])
    return out


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


def check_batch_pixels(bs: int, img_size: int) -> None:
    pixels = bs * img_size**2
    if pixels > MAX_BATCH_PIXELS:
        raise AttnzooError(
            f"bs x img_size² = {bs} x {img_size}² = {pixels / 1e6:.0f}M pixels per batch is over "
            f"the {MAX_BATCH_PIXELS / 1e6:.0f}M that fit in memory (the input batch alone would take "
            f"{pixels * 12 / 2**30:.1f} GiB, the activations tens of times more); lower bs or img_size")


def _leave_out(names: Iterable[str]) -> None:
    extra = [n for n in names if n in _FIELDS and not _FIELDS[n].metadata["on_resume"]]
    if extra:
        raise AttnzooError(f"--resume continues a run with its own settings; leave out "
                           f"{', '.join(flag(n) for n in extra)}")


def _default(f: Field) -> Any:
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


_FIELDS: dict[str, Field] = {f.name: f for f in fields(FitConfig)}
DEFAULTS: dict[str, Any] = {f.name: _default(f) for f in fields(FitConfig)}
FitConfig.__doc__ = (FitConfig.__doc__ or "") + "".join(
    f"\n    - ``{f.name}`` ({flag(f.name) if f.metadata['on_cli'] else 'Python only'}, default "
    f"``{DEFAULTS[f.name]!r}``): {f.metadata['help']}" for f in fields(FitConfig))
