"""The model: attention modules inserted at named sites of a timm backbone.

- ``registry``: the attention registry (``register_attention``, ``create_attention``, ``list_attention``), the
  options of each module;
- ``plugins``: entry-point discovery, the one manager of third-party modules (guests: contained, timed);
- ``sites``: the sites of a backbone, the layout of each (NCHW, NHWC, tokens), ``layers``;
- ``maps``: ``report_map``, the one mechanism every module reports its attention map through;
- ``weights``: the backbone with timm's pretrained weights or a local file;
- ``create``: ``create_model`` and ``AttentionModel``;
- ``kit``: ``check_attention``, the conformance checks every module must pass (``attnzoo.testing``).

Importing this package imports none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {  # what the old attnzoo.model module offered, from where it lives now
    "create_model": "create", "AttentionModel": "create", "SiteModule": "create", "preprocessing_cfg": "create",
    "layers": "sites", "resolve_sites": "sites", "default_img_size": "sites", "introspect": "sites",
    "to_map": "sites", "from_map": "sites", "check_backbone": "sites", "Site": "sites", "BackboneInfo": "sites",
    "MapRecorder": "maps", "as_spatial": "maps", "report_map": "maps",
    "load_weights_file": "weights",
}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
