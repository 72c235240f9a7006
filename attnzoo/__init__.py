"""attnzoo: trainable attention for image classification, at named layers of any timm backbone.

Imports are lazy: ``import attnzoo`` loads neither torch nor fastai until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import plugins as _plugins  # noqa: F401  (installs the entry-point finder into the registry)
from .errors import AttnzooError, SiteError, UnknownNameError
from .registry import (
    PLUGIN_API_VERSION,
    create_attention,
    get_attention,
    is_attention,
    list_attention,
    register_attention,
)

__version__ = "0.1.0"

_LAZY = {
    "create_model": "model",
    "layers": "model",
    "AttentionModel": "model",
    "report_map": "maps",
    "attention_learner": "learner",
    "fit": "learner",
    "FitConfig": "config",
    "load_run": "run",
    "Run": "run",
    "export": "deploy",
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'attnzoo' has no attribute '{name}'")
