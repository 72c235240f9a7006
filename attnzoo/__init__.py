"""attnzoo: trainable attention for image classification, at named layers of any timm backbone.

The package, by concept (each subpackage's docstring lists its modules):

    attnzoo/attention/  the built-in attention modules, one file each (paper, equations, options)
    attnzoo/model/      registry, plugins, sites, maps, weights, create_model, the conformance kit
    attnzoo/train/      settings (FitConfig), data, demo, learner, callbacks, checkpoints, distributed,
                        threads, fit
    attnzoo/explain/    CAMs, metrics, boxes, trust, figures, charts, report, interpret, show_attention,
                        compare
    attnzoo/runs/       the run folder, outputs (atomic, no clobber), predict (load_run), export, hub (the Hub
                        face, hf-hub:/local-dir: names), card (the model card), push, sweep
    attnzoo/cli.py      the commands, each a thin layer over the function of the module named after it
    attnzoo/doctor.py   the environment checks

Imports are lazy: ``import attnzoo`` loads neither torch nor fastai until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

from .errors import AttnzooError, SiteError, UnknownNameError
from .model import plugins as _plugins  # noqa: F401  (installs the entry-point finder into the registry)
from .model.registry import (
    PLUGIN_API_VERSION,
    create_attention,
    get_attention,
    is_attention,
    list_attention,
    register_attention,
)

__version__ = "0.1.0"

_LAZY = {
    "create_model": "model.create",
    "AttentionModel": "model.create",
    "layers": "model.sites",
    "report_map": "model.maps",
    "attention_learner": "train.learner",
    "fit": "train.fit",
    "FitConfig": "train.settings",
    "load_run": "runs.predict",
    "Run": "runs.predict",
    "export": "runs.export",
    "sweep": "runs.sweep",
}

# Modules of attnzoo 0.1's flat layout, and where their names live now. ``import attnzoo.trust`` still works, with a
# DeprecationWarning naming the new place: a module that moved whole is the same object as the new one (patching
# one patches both); one that was split is a module that looks its names up in the new ones, in order.
MOVED: dict[str, tuple[str, ...]] = {
    "registry": ("model.registry",), "plugins": ("model.plugins",), "sites": ("model.sites",),
    "maps": ("model.maps",), "hub": ("model.weights",), "data": ("train.data",), "demo": ("train.demo",),
    "learner": ("train.learner", "train.callbacks", "train.fit"), "distributed": ("train.distributed",),
    "checkpoint": ("train.checkpoints", "train.callbacks"), "threads": ("train.threads",),
    "config": ("train.settings", "train.threads"), "metrics": ("explain.metrics",), "localize": ("explain.boxes",),
    "trust": ("explain.trust",), "viz": ("explain.figures",), "figures": ("explain.charts",),
    "report": ("explain.report",),
    "interpret": ("explain.interpret", "explain.show_attention", "explain.compare", "explain.report"),
    "run": ("runs.folder", "runs.predict"), "outputs": ("runs.outputs",), "deploy": ("runs.export",),
}

__all__ = [
    "PLUGIN_API_VERSION",
    "AttnzooError",
    "SiteError",
    "UnknownNameError",
    "create_attention",
    "get_attention",
    "is_attention",
    "list_attention",
    "register_attention",
    *_LAZY,
]


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``attnzoo.<old>`` as the module it moved to (the same object, so patching one patches both)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = [f"{__name__}.{m}" for m in MOVED[spec.name.removeprefix(__name__ + ".")]]
        warnings.warn(f"{spec.name} moved to {' and '.join(new)}", DeprecationWarning, stacklevel=2)
        if len(new) == 1:
            module = importlib.import_module(new[0])
            self._spec = module.__spec__  # the import system sets __spec__ to the alias's; put the real one back
            return module
        self._spec = spec
        return _Split(spec.name, new)

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._spec


class _Split(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, modules: list[str]) -> None:
        super().__init__(name)
        self._modules = modules

    def __getattr__(self, attr: str) -> Any:
        for name in self._modules:
            module = importlib.import_module(name)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in MOVED:  # attnzoo.trust as an attribute, after ``import attnzoo``
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'attnzoo' has no attribute '{name}'")
