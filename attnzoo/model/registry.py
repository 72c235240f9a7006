"""The attention registry, shaped like timm's ``register_model`` / ``create_model`` / ``list_models``.

An entry is a module class plus what a program needs to know about it: its kind (``gate`` or
``readout``), a one-line summary, and its options (keyword arguments with defaults, types and, for
``Literal`` annotations, the allowed choices) read from the constructor's signature. Importing this
file does not import torch, so ``attnzoo --help`` stays fast.

The registry is a store: it never imports plugins. A name it does not hold is asked of a finder
(``set_finder``; ``attnzoo.model.plugins`` installs its plugin manager), which puts what provides the name
into the store.
"""

from __future__ import annotations

import fnmatch
import inspect
import threading
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import AttnzooError, UnknownNameError

#: Version of the module contract below; plugins may declare the range they support.
PLUGIN_API_VERSION = "1.0"

Kind = Literal["gate", "readout"]
#: Positional constructor arguments the host passes, per kind; everything after them is an option.
POSITIONAL = {"gate": ("channels",), "readout": ("local_channels", "global_channels", "num_classes")}


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    type: type
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def parse(self, value: Any) -> Any:
        """Coerce ``value`` (often a CLI string) to this option's type, or raise AttnzooError."""
        if self.choices is not None:
            for choice in self.choices:
                if value == choice or str(value) == str(choice):
                    return choice
            raise AttnzooError(
                f"option '{self.name}' must be one of {', '.join(map(str, self.choices))}, got '{value}'"
            )
        if isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            return value
        if not isinstance(value, str):
            if self.type is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise AttnzooError(f"option '{self.name}' needs a {self.type.__name__}, got {value!r}")
        try:
            if self.type is bool:
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return self.type(value)
        except ValueError:
            raise AttnzooError(
                f"option '{self.name}' needs a {self.type.__name__}, got '{value}'"
            ) from None

    def describe(self) -> str:
        kind = " | ".join(map(str, self.choices)) if self.choices else self.type.__name__  # spaces: may wrap
        return f"{self.name}={self.default!r} ({kind})"


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    cls: Callable[..., Any]
    kind: Kind
    summary: str
    options: Mapping[str, Option]
    paper: str = ""
    source: str = "attnzoo"
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "paper": self.paper,
            "source": self.source,
            "options": {
                o.name: {"default": o.default, "type": o.type.__name__, "choices": o.choices}
                for o in self.options.values()
            },
        }


_registry: dict[str, AttentionSpec] = {}
#: per thread: while set, registrations go into this dict instead of the registry (see ``capturing``)
_capture = threading.local()


class Finder(Protocol):
    """Supplies the names the store does not hold (``attnzoo.model.plugins.PluginManager``)."""

    def find(self, name: str) -> AttentionSpec | None:
        """Make ``name`` known (it may add entries to the store) and return its spec, or None."""

    def find_all(self) -> None:
        """Make every name known, before a listing."""


_finder: Finder | None = None


def set_finder(finder: Finder | None) -> None:
    global _finder
    _finder = finder


@contextmanager
def capturing() -> Iterator[dict[str, AttentionSpec]]:
    """Registrations made on this thread inside go into the yielded dict, not the registry.

    Plugin discovery imports plugins this way: what a plugin registers as a side effect reaches the
    registry only if discovery puts it there.
    """
    saved = getattr(_capture, "specs", None)
    _capture.specs = {}
    try:
        yield _capture.specs
    finally:
        _capture.specs = saved

#: keyword a gate may accept that the host fills with the site's map size (h, w); never a user option
FEAT_SIZE = "feat_size"


def site_kwargs(spec: AttentionSpec, size: tuple[int, int]) -> dict[str, Any]:
    """What the host adds to a gate's options at a site: ``feat_size`` when the constructor takes it."""
    if spec.kind == "gate" and FEAT_SIZE in inspect.signature(spec.cls).parameters:
        return {FEAT_SIZE: tuple(size)}
    return {}


def _option_type(annotation: Any, default: Any) -> tuple[type, tuple[Any, ...] | None]:
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if isinstance(annotation, type) and annotation is not inspect.Parameter.empty:
        return annotation, None
    return (type(default) if default is not None else str), None


def options_of(cls: Callable[..., Any], kind: Kind) -> dict[str, Option]:
    """The options of a module class: its keyword arguments after the ones the host passes.

    A gate's ``feat_size`` is not an option either: the host passes the site's ``(h, w)`` to gates that take it.
    """
    try:
        hints = typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    params = list(inspect.signature(cls).parameters.values())
    expected = POSITIONAL[kind]
    names = [p.name for p in params[: len(expected)]]
    if tuple(names) != expected:
        raise TypeError(
            f"a {kind} module's constructor must start with ({', '.join(expected)}), got ({', '.join(names)})"
        )
    opts = {}
    for p in params[len(expected):]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (kind == "gate" and p.name == FEAT_SIZE):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"option '{p.name}' of {cls.__name__} needs a default")
        typ, choices = _option_type(hints.get(p.name, inspect.Parameter.empty), p.default)
        opts[p.name] = Option(p.name, p.default, typ, choices)
    return opts


def register_attention(
    name: str,
    *,
    kind: Kind,
    summary: str,
    paper: str = "",
    source: str = "attnzoo",
    **defaults: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an attention module class under ``name`` (a decorator).

    ``defaults`` fix options for this name (``lpa-pc`` and ``lpa-dp`` are one class with two
    defaults); they are removed from the options a user can set.
    """
    if kind not in POSITIONAL:
        raise ValueError(f"kind must be 'gate' or 'readout', got {kind!r}")

    def decorator(cls: Callable[..., Any]) -> Callable[..., Any]:
        options = {k: v for k, v in options_of(cls, kind).items() if k not in defaults}
        spec = AttentionSpec(name, cls, kind, summary, options, paper, source, dict(defaults))
        store = getattr(_capture, "specs", None)
        if store is None:
            store = _registry
            old = _registry.get(name)
            if old is not None and (old.cls is not cls or old.defaults != spec.defaults):
                warnings.warn(
                    f"attention '{name}' from {old.source} is overwritten by {source}", stacklevel=2
                )
        store[name] = spec
        specs = dict(getattr(cls, "__attnzoo_specs__", {}))
        specs[name] = spec
        cls.__attnzoo_specs__ = specs
        return cls

    return decorator


def get_attention(name: str) -> AttentionSpec:
    """The registry entry for ``name``; raises UnknownNameError with the closest names."""
    spec = _registry.get(name)
    if spec is None and _finder is not None:
        spec = _finder.find(name)
    if spec is None:
        raise UnknownNameError("attention module", name, _registry)
    return spec


def is_attention(name: str) -> bool:
    try:
        get_attention(name)
    except UnknownNameError:
        return False
    return True


def list_attention(pattern: str = "*", kind: Kind | None = None) -> list[str]:
    """Registered names matching a shell-style wildcard, sorted; optionally only one kind."""
    if _finder is not None:
        _finder.find_all()
    return sorted(
        n
        for n, s in _registry.items()
        if fnmatch.fnmatchcase(n, pattern) and (kind is None or s.kind == kind)
    )


def parse_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check option names and coerce values (CLI strings included) for module ``name``."""
    spec = get_attention(name)
    parsed = {}
    for key, value in options.items():
        if key not in spec.options:
            if not spec.options:
                raise AttnzooError(f"attention '{name}' takes no options, got '{key}'")
            raise UnknownNameError(f"option of '{name}'", key, spec.options, show_all=True)
        parsed[key] = spec.options[key].parse(value)
    return parsed


def create_attention(name: str, *args: Any, **options: Any) -> Any:
    """Build module ``name``: ``create_attention('sagan', 64)``, ``create_attention('lpa-pc', [64, 128], 256, 10)``;
    the host's arguments by keyword too, as timm's ``create_attn``: ``create_attention('sagan', channels=64)``."""
    spec = get_attention(name)
    structural = {k: options.pop(k) for k in POSITIONAL[spec.kind] if k in options}
    return spec.cls(*args, **structural, **{**spec.defaults, **parse_options(name, options)})
