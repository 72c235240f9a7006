"""Entry-point discovery of attention modules (group ``attnzoo.attention``).

An entry point names either a module class (registered under the entry point's name; the class is
decorated with ``register_attention`` or carries ``attnzoo_kind`` / ``attnzoo_summary`` attributes)
or a function that registers several modules when called. attnzoo's own modules are declared the
same way in its pyproject, so the built-ins are the first plugin.

Discovery is lazy (the first lookup of a name that is not registered yet, or a listing) and runs
once per process. A plugin that fails to import, breaks the contract or wants another plugin API
version is skipped and reported; it never breaks attnzoo. What a plugin registers as a side effect of
being imported is rolled back: names reach the registry only through discovery, which settles collisions:

- a name registered in this process (``register_attention`` in the user's code) wins over entry points;
- else attnzoo's built-in wins over plugins;
- else a name two plugins provide is ambiguous: the bare name raises an error naming both.

Every provider stays reachable as ``dist:name`` (``attnzoo-timm:timm-cbam``). ``ATTNZOO_RAISE_PLUGIN_ERRORS=1``
re-raises instead, for plugin authors; ``ATTNZOO_DISABLE_PLUGINS=1`` (or a comma list of distribution or
entry point names) turns third-party discovery off.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from . import registry
from .errors import AttnzooError

GROUP = "attnzoo.attention"
HOST = "attnzoo"
IN_PROCESS = "this process"


@dataclass
class PluginStatus:
    dist: str
    version: str
    names: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | failed | conflicting | disabled
    reason: str = ""

    def note(self, status: str, reason: str) -> None:
        """Record a problem; a failure outranks a conflict, and every reason is kept."""
        if self.status in ("ok", "conflicting"):
            self.status = status
        self.reason = f"{self.reason}; {reason}" if self.reason else reason


_status: dict[str, PluginStatus] = {}
#: every provider of each name, by distribution, including the ones that lost a collision
_providers: dict[str, dict[str, registry.AttentionSpec]] = {}
_discovered = False


class PluginContractError(Exception):
    pass


def canonical(dist: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Attnzoo_Timm`` and ``attnzoo-timm`` are one."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _flag(var: str) -> str:
    value = os.environ.get(var, "").strip()
    return "" if value.lower() in ("", "0", "false", "no", "off") else value


def _disabled() -> set[str] | bool:
    value = _flag("ATTNZOO_DISABLE_PLUGINS")
    if value.lower() in ("1", "true", "yes", "on", "all"):
        return True
    return {canonical(v.strip()) for v in value.split(",") if v.strip()}


@contextmanager
def _rolled_back() -> Iterator[None]:
    """Whatever is registered inside is undone at exit (discovery decides what goes in)."""
    saved = dict(registry._registry)
    try:
        with warnings.catch_warnings():  # overwrites here are collisions, which discovery reports itself
            warnings.filterwarnings("ignore", message=r"attention '.*' from .* is overwritten")
            yield
    finally:
        registry._registry.clear()
        registry._registry.update(saved)


def _check_api(ep: metadata.EntryPoint, obj: Any) -> None:
    """``attnzoo_api`` on the object, else ``ATTNZOO_API`` in the entry point's module or the object's own."""
    wanted = getattr(obj, "attnzoo_api", None)
    for module in (sys.modules.get(ep.module), inspect.getmodule(obj)):
        wanted = wanted or getattr(module, "ATTNZOO_API", None)
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
        with _rolled_back():
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
    for name, spec in provided.items():
        if spec.kind not in registry.POSITIONAL:
            raise PluginContractError(f"'{name}' has kind {spec.kind!r}, not gate or readout")
        if not isinstance(spec.summary, str) or not spec.summary.strip():
            raise PluginContractError(f"'{name}' has no summary")
        if ":" in name or not name.strip():
            raise PluginContractError(f"'{name}' is not a valid name (':' is kept for 'dist:name')")
    return {n: replace(s, name=n, source=dist) for n, s in provided.items()}


def _entry_points() -> list[tuple[str, str, metadata.EntryPoint]]:
    found = []
    seen = set()
    for dist in metadata.distributions():
        name = "?"
        try:
            name = dist.metadata["Name"] or "?"
            if canonical(name) in seen:  # the same distribution twice on sys.path: the first wins, as for imports
                continue
            seen.add(canonical(name))
            eps = [ep for ep in dist.entry_points if ep.group == GROUP]
        except Exception as e:  # unreadable metadata: reported when the distribution means to be a plugin
            if GROUP in (dist.read_text("entry_points.txt") or ""):
                _status[name] = PluginStatus(name, "?", status="failed", reason=f"unreadable metadata: {e}")
            continue
        found += [(name, dist.version or "?", ep) for ep in eps]
    # the host first, so its names win collisions; then a stable order
    found.sort(key=lambda t: (t[0] != HOST, canonical(t[0]), t[2].name))
    return found


def _forget() -> None:
    """Take out of the registry what the last discovery put there (in-process registrations stay)."""
    for name, providers in _providers.items():
        if registry._registry.get(name) in providers.values():
            del registry._registry[name]
    _providers.clear()
    _status.clear()


def _settle() -> None:
    """Put each provided name into the registry by the collision rules of the module docstring."""
    for name, providers in _providers.items():
        current = registry._registry.get(name)
        in_process = current is not None and current not in providers.values()
        if in_process:
            winner = None
        elif HOST in providers or len(providers) == 1:
            winner = HOST if HOST in providers else next(iter(providers))
            registry._registry[name] = providers[winner]
        else:
            winner = None
            registry._registry.pop(name, None)
        for dist in providers:
            if dist != winner and dist != HOST:
                others = sorted(set(providers) - {dist}) + ([IN_PROCESS] if in_process else [])
                _status[dist].note("conflicting", f"'{name}' also from {', '.join(others)}; use '{dist}:{name}'")


def discover(refresh: bool = False) -> dict[str, PluginStatus]:
    """Load every entry point once per process; return the status of each distribution."""
    global _discovered
    if _discovered and not refresh:
        return _status
    _discovered = True
    _forget()
    disabled = _disabled()
    raise_errors = bool(_flag("ATTNZOO_RAISE_PLUGIN_ERRORS"))
    eps = _entry_points()
    if not any(dist == HOST for dist, _, _ in eps):  # running from a source tree, not installed
        from . import attention  # noqa: F401  (its modules register on import)
    for dist, version, ep in eps:
        st = _status.setdefault(dist, PluginStatus(dist, version))
        if dist != HOST and (disabled is True or {canonical(dist), canonical(ep.name)} & disabled):
            st.status, st.reason = "disabled", "ATTNZOO_DISABLE_PLUGINS"
            continue
        try:
            with _rolled_back():  # names registered as a side effect of importing do not count
                obj = ep.load()
            _check_api(ep, obj)
            provided = _specs_from(ep, obj, dist)
        except Exception as e:
            if raise_errors:
                _discovered = False
                raise
            why = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            st.note("failed", f"{ep.name} ({ep.value}): {why}")
            continue
        for name, spec in provided.items():
            st.names.append(name)
            _providers.setdefault(name, {})[dist] = spec
    _settle()
    return _status


def resolve_qualified(name: str) -> registry.AttentionSpec | None:
    """``dist:name`` picks one provider; a bare name with several providers is an error naming them."""
    discover()
    if ":" in name:
        dist, _, bare = name.partition(":")
        for d, spec in _providers.get(bare, {}).items():
            if canonical(d) == canonical(dist):
                return replace(spec, name=f"{d}:{bare}")
        return None
    providers = _providers.get(name, {})
    if len(providers) > 1:
        options = ", ".join(f"'{d}:{name}'" for d in sorted(providers))
        raise AttnzooError(
            f"attention '{name}' is provided by {' and '.join(sorted(providers))}; pick one: {options}"
        )
    return None


def qualified_names() -> list[str]:
    """``dist:name`` of every provider the bare name does not give (shadowed or ambiguous), sorted."""
    discover()
    return sorted(
        f"{d}:{name}"
        for name, providers in _providers.items()
        for d, spec in providers.items()
        if registry._registry.get(name) != spec
    )


def plugin_status() -> list[PluginStatus]:
    return sorted(discover().values(), key=lambda s: (s.dist != HOST, canonical(s.dist)))
