"""Entry-point discovery of attention modules (group ``attnzoo.attention``).

An entry point names either a module class (registered under the entry point's name; the class is
decorated with ``register_attention`` or carries ``attnzoo_kind`` / ``attnzoo_summary`` attributes)
or a function that registers several modules when called. attnzoo's own modules are declared the
same way in its pyproject, so the built-ins are the first plugin.

Discovery is lazy (the first lookup of a name that is not registered yet, or a listing) and runs
once per process. A plugin that fails to import, breaks the contract or wants another plugin API
version is skipped and reported; it never breaks attnzoo. ``ATTNZOO_RAISE_PLUGIN_ERRORS=1`` re-raises
instead, for plugin authors; ``ATTNZOO_DISABLE_PLUGINS=1`` (or a comma list of distribution or entry
point names) turns third-party discovery off.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from . import registry
from .errors import AttnzooError

GROUP = "attnzoo.attention"
HOST = "attnzoo"


@dataclass
class PluginStatus:
    dist: str
    version: str
    names: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | failed | conflicting
    reason: str = ""


_status: dict[str, PluginStatus] = {}
#: every provider of each name, by distribution, including the ones that lost a collision
_providers: dict[str, dict[str, registry.AttentionSpec]] = {}
_discovered = False


class PluginContractError(Exception):
    pass


def _disabled() -> set[str] | bool:
    value = os.environ.get("ATTNZOO_DISABLE_PLUGINS", "").strip()
    if value.lower() in ("1", "true", "yes", "all"):
        return True
    return {v.strip() for v in value.split(",") if v.strip()}


def _check_api(ep: metadata.EntryPoint, obj: Any) -> None:
    module = inspect.getmodule(obj)
    wanted = getattr(obj, "attnzoo_api", None) or getattr(module, "ATTNZOO_API", None)
    if not wanted:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        ok = registry.PLUGIN_API_VERSION in SpecifierSet(str(wanted))
    except InvalidSpecifier:
        raise PluginContractError(f"invalid ATTNZOO_API specifier {wanted!r}") from None
    if not ok:
        raise PluginContractError(
            f"needs attnzoo plugin API {wanted}, this attnzoo provides {registry.PLUGIN_API_VERSION}"
        )


def _specs_from(ep: metadata.EntryPoint, obj: Any, dist: str) -> dict[str, registry.AttentionSpec]:
    """What one entry point provides, without leaving anything in the registry."""
    before = dict(registry._registry)
    try:
        if inspect.isclass(obj):
            specs = getattr(obj, "__attnzoo_specs__", {})
            if ep.name in specs:
                spec = specs[ep.name]
            elif hasattr(obj, "attnzoo_kind"):
                registry.register_attention(
                    ep.name,
                    kind=obj.attnzoo_kind,
                    summary=getattr(obj, "attnzoo_summary", ""),
                    paper=getattr(obj, "attnzoo_paper", ""),
                )(obj)
                spec = registry._registry[ep.name]
            else:
                raise PluginContractError(
                    f"class {obj.__name__} is neither registered as '{ep.name}' nor has attnzoo_kind"
                )
            provided = {ep.name: spec}
        elif callable(obj):
            obj()
            provided = {n: s for n, s in registry._registry.items() if before.get(n) is not s}
            if not provided:
                raise PluginContractError(f"{ep.value}() registered nothing")
        else:
            raise PluginContractError(f"{ep.value} is neither a class nor a function")
    except (TypeError, ValueError) as e:  # register_attention's contract checks
        raise PluginContractError(str(e)) from e
    finally:
        registry._registry.clear()
        registry._registry.update(before)
    for name, spec in provided.items():
        if spec.kind not in registry.POSITIONAL:
            raise PluginContractError(f"'{name}' has kind {spec.kind!r}, not gate or readout")
        if not isinstance(spec.summary, str) or not spec.summary.strip():
            raise PluginContractError(f"'{name}' has no summary")
    return {n: replace(s, name=n, source=dist) for n, s in provided.items()}


def _entry_points() -> list[tuple[str, str, metadata.EntryPoint]]:
    found = []
    seen = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "?"
        if name in seen:  # the same distribution twice on sys.path: the first one wins, as for imports
            continue
        seen.add(name)
        for ep in dist.entry_points:
            if ep.group == GROUP:
                found.append((name, dist.version or "?", ep))
    # the host first, so its names win collisions; then a stable order
    found.sort(key=lambda t: (t[0] != HOST, t[0].lower(), t[2].name))
    return found


def discover(refresh: bool = False) -> dict[str, PluginStatus]:
    """Load every entry point once per process; return the status of each distribution."""
    global _discovered
    if _discovered and not refresh:
        return _status
    _discovered = True
    _status.clear()
    _providers.clear()
    disabled = _disabled()
    raise_errors = os.environ.get("ATTNZOO_RAISE_PLUGIN_ERRORS", "") not in ("", "0")
    eps = _entry_points()
    if not any(dist == HOST for dist, _, _ in eps):  # running from a source tree, not installed
        from . import attention  # noqa: F401  (its modules register on import)
    for dist, version, ep in eps:
        if dist != HOST and (disabled is True or (disabled and ({dist, ep.name} & disabled))):
            continue
        st = _status.setdefault(dist, PluginStatus(dist, version))
        try:
            obj = ep.load()
            _check_api(ep, obj)
            provided = _specs_from(ep, obj, dist)
        except Exception as e:
            if raise_errors:
                raise
            st.status = "failed"
            why = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            st.reason = f"{ep.name} ({ep.value}): {why}" if not st.reason else st.reason
            continue
        for name, spec in provided.items():
            st.names.append(name)
            providers = _providers.setdefault(name, {})
            providers[dist] = spec
            if len(providers) == 1:
                registry._registry[name] = spec
            else:
                if HOST not in providers:  # ambiguous among third parties: resolved only by dist:name
                    registry._registry.pop(name, None)
                for d in providers:
                    if d != HOST and _status[d].status == "ok":
                        _status[d].status = "conflicting"
                        _status[d].reason = f"'{name}' also from {', '.join(sorted(set(providers) - {d}))}"
    return _status


def resolve_qualified(name: str) -> registry.AttentionSpec | None:
    """``dist:name`` picks one provider; a bare name with several providers is an error naming them."""
    discover()
    if ":" in name:
        dist, _, bare = name.partition(":")
        spec = _providers.get(bare, {}).get(dist)
        if spec is None:
            return None
        return replace(spec, name=bare)
    providers = _providers.get(name, {})
    if len(providers) > 1:
        options = ", ".join(f"'{d}:{name}'" for d in sorted(providers))
        raise AttnzooError(
            f"attention '{name}' is provided by {' and '.join(sorted(providers))}; pick one: {options}"
        )
    return None


def plugin_status() -> list[PluginStatus]:
    return sorted(discover().values(), key=lambda s: (s.dist != HOST, s.dist.lower()))
