"""Entry-point discovery of attention modules (group ``attnzoo.attention``): plugins are guests.

An entry point names either a module class (registered under the entry point's name; the class is
decorated with ``register_attention`` or carries ``attnzoo_kind`` / ``attnzoo_summary`` attributes)
or a function that registers several modules when called. attnzoo's own modules are declared the
same way in its pyproject; they are the host's, not plugins, and load together on the first lookup.

**Import only what is used.** Entry point names are read from the metadata without importing anything.
A name the registry does not hold imports the entry points of that name (a class entry point's name is
its module's name). A function entry point's names cannot be known without calling it, so function
entry points (and every other entry point not loaded yet) are imported when a name is not found that
way, or on a listing (``list_attention``, ``attnzoo list`` / ``plugins`` / ``doctor``). ``dist:name``
imports that distribution only. So ``create_model(..., attn="sagan")`` imports no third-party plugin,
and a name nobody provides (a typo) imports all of them before it is an error.

**Contained imports.** A third-party import (and the call of a function entry point) runs on a daemon thread
with a time limit, ``ATTNZOO_PLUGIN_TIMEOUT`` seconds (default 10: room for a cold import of timm on a slow
disk; torch is already imported, with the built-ins). Meanwhile ``sys.stdout`` is ``sys.stderr``, so
``--json`` output stays clean. Any exception, ``SystemExit`` and ``KeyboardInterrupt`` included, and an
import past its limit make the plugin ``failed``. Registrations made on that thread go to a private record
(``registry.capturing``), never the registry. A non-daemon thread the import leaves running fails the plugin
and is kept in ``PluginManager.stray_threads`` (the CLI then exits without waiting for it). attnzoo's
functions, classes and methods are compared before and after: a plugin that replaced one
(``run.Run.predict``) is ``tampered``, what was replaced is put back when attnzoo had it loaded before, and
its modules are not used. Out of reach: what a plugin does after its time limit, writes to file descriptor
1, ``os._exit``, signals, changes to other libraries, and code that never releases the interpreter.

Collisions are settled by one rule, whatever was imported first:

- a name registered in this process (``register_attention`` in the user's code) wins over entry points;
- else attnzoo's built-in wins over plugins;
- else an entry point of that name wins over a function entry point that registers it too;
- else a name two plugins provide is ambiguous: the bare name raises an error naming both.

Every provider stays reachable as ``dist:name`` (``attnzoo-timm:timm-cbam``). ``ATTNZOO_RAISE_PLUGIN_ERRORS=1``
re-raises instead, for plugin authors; ``ATTNZOO_DISABLE_PLUGINS=1`` (or a comma list of distribution or
entry point names) turns third-party discovery off.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import AttnzooError, first_line
from . import registry

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "attnzoo.attention"
HOST = "attnzoo"
IN_PROCESS = "this process"
DEFAULT_TIMEOUT = 10.0


@dataclass
class PluginStatus:
    dist: str
    version: str
    names: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | failed | conflicting | tampered | disabled
    reason: str = ""


class PluginContractError(Exception):
    pass


class PluginTimeout(Exception):
    pass


class _Failed(Exception):
    """A guest's import failed with ``error`` (None: already recorded). Carried, never raised as itself, so that
    a guest's SystemExit or KeyboardInterrupt does not reach the host's code."""

    def __init__(self, error: BaseException | None):
        super().__init__(error)
        self.error = error


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


def time_limit() -> float:
    """Seconds one plugin import may take: ``ATTNZOO_PLUGIN_TIMEOUT``, default 10."""
    value = os.environ.get("ATTNZOO_PLUGIN_TIMEOUT", "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        limit = float(value)
    except ValueError:
        limit = 0.0
    most = min(threading.TIMEOUT_MAX, 86_400.0)  # a thread cannot wait longer; nor should an import wait a day
    if not 0 < limit <= most:
        raise AttnzooError(f"ATTNZOO_PLUGIN_TIMEOUT must be a number of seconds above 0 and at most {most:g}, "
                           f"got '{value}'")
    return limit


def _check_api(ep: EntryPoint, obj: Any) -> None:
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


def _load(ep: EntryPoint) -> tuple[Any, dict[str, registry.AttentionSpec]]:
    """Import an entry point and call it when it is a function: what the call registers is what it provides."""
    with registry.capturing():  # names registered as a side effect of importing do not count
        obj = ep.load()
    _check_api(ep, obj)
    if inspect.isclass(obj) or not callable(obj):
        return obj, {}
    with registry.capturing() as registered:
        obj()
    return obj, registered


def _specs_from(ep: EntryPoint, obj: Any, registered: dict[str, registry.AttentionSpec],
                dist: str) -> dict[str, registry.AttentionSpec]:
    """What one loaded entry point provides, checked against the module contract."""
    try:
        if inspect.isclass(obj):
            spec = getattr(obj, "__attnzoo_specs__", {}).get(ep.name)
            if spec is None:
                if not hasattr(obj, "attnzoo_kind"):
                    raise PluginContractError(
                        f"class {obj.__name__} is neither registered as '{ep.name}' nor has attnzoo_kind"
                    )
                with registry.capturing() as made:
                    registry.register_attention(
                        ep.name,
                        kind=obj.attnzoo_kind,
                        summary=getattr(obj, "attnzoo_summary", ""),
                        paper=getattr(obj, "attnzoo_paper", ""),
                    )(obj)
                spec = made[ep.name]
            provided = {ep.name: spec}
        elif callable(obj):
            provided = registered
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


# -- what a guest did: attnzoo's own callables before and after its import

_MISSING = object()
#: (owner id, attribute) -> (owner, attribute, label, value)
_Callables = dict[tuple[int, str], tuple[Any, str, str, Any]]


def _own_callables() -> _Callables:
    """attnzoo's module-level callables and the methods of its classes, as loaded now."""
    found: _Callables = {}
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == HOST or modname.startswith(HOST + ".")):
            continue
        prefix = modname.removeprefix(HOST + ".")
        for attr, value in list(vars(module).items()):
            if callable(value):
                found[id(module), attr] = (module, attr, f"{prefix}.{attr}", value)
            if isinstance(value, type) and value.__module__ == modname:
                for name, member in list(vars(value).items()):
                    if isinstance(member, (types.FunctionType, classmethod, staticmethod, property)):
                        found[id(value), name] = (value, name, f"{prefix}.{value.__qualname__}.{name}", member)
    return found


def _origin(value: Any) -> str | None:
    """The file that defines a function, method or class."""
    func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    code = getattr(func, "__code__", None)
    if code is not None:
        return code.co_filename
    if isinstance(value, type):
        return getattr(sys.modules.get(value.__module__), "__file__", None)
    return None


def _tampering(before: _Callables, package: str, loaded: set[str]) -> list[str]:
    """What of attnzoo a guest replaced: changed since ``before`` (put back), or defined in the modules of
    ``package`` that its import brought in (not in ``loaded``): they cover attnzoo modules it loaded itself."""
    changed = set()
    for owner, attr, label, value in before.values():
        if vars(owner).get(attr, _MISSING) is not value:
            changed.add(label)
            setattr(owner, attr, value)
    guest_files = {
        getattr(m, "__file__", None)
        for name, m in list(sys.modules.items())
        if (name == package or name.startswith(package + ".")) and name not in loaded
    } - {None}
    for _, _, label, value in _own_callables().values():
        if _origin(value) in guest_files:
            changed.add(label)
    return sorted(changed)


@dataclass
class _Visit:
    """What one contained import did."""

    value: Any = None
    error: BaseException | None = None
    finished: bool = False
    threads: list[threading.Thread] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)


def _contained(label: str, package: str, fn: Callable[[], Any], limit: float) -> _Visit:
    """Run a guest's ``fn`` on a daemon thread for at most ``limit`` seconds, stdout sent to stderr."""
    visit = _Visit()

    def run() -> None:
        try:
            visit.value = fn()
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: a guest ends nothing of its host
            visit.error = e

    threads = set(threading.enumerate())
    before, loaded = _own_callables(), set(sys.modules)
    # threads the guest starts inherit daemon=True from this one unless it asks otherwise
    thread = threading.Thread(target=run, name=f"attnzoo plugin import {label}", daemon=True)
    with redirect_stdout(sys.stderr if sys.stderr is not None else io.StringIO()):
        thread.start()
        thread.join(limit)
    visit.finished = not thread.is_alive()
    visit.threads = [t for t in threading.enumerate() if t not in threads and t is not thread and not t.daemon]
    visit.tampered = _tampering(before, package, loaded)
    return visit


@dataclass
class _Entry:
    dist: str
    ep: EntryPoint
    disabled: bool = False
    loaded: bool = False


@dataclass
class _Dist:
    name: str
    version: str
    entries: list[_Entry] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)
    blocked: bool = False  # its modules are not used (time limit, stray threads, tampering)

    @property
    def disabled(self) -> bool:
        return any(e.disabled for e in self.entries)


def _read_entry_points() -> dict[str, _Dist]:
    """Every distribution with entry points in the group, from metadata only: nothing is imported."""
    from importlib import metadata

    dists: dict[str, _Dist] = {}
    seen = set()
    disabled = _disabled()
    for dist in metadata.distributions():
        name = "?"
        try:
            name = dist.metadata["Name"] or "?"
            if canonical(name) in seen:  # the same distribution twice on sys.path: the first wins, as for imports
                continue
            seen.add(canonical(name))
            eps = sorted((ep for ep in dist.entry_points if ep.group == GROUP), key=lambda ep: ep.name)
        except Exception as e:  # unreadable metadata: reported when the distribution means to be a plugin
            if GROUP in (dist.read_text("entry_points.txt") or ""):
                dists[name] = _Dist(name, "?", failures=[f"unreadable metadata: {e}"])
            continue
        if eps:
            off = [name != HOST and (disabled is True or bool({canonical(name), canonical(ep.name)} & disabled))
                   for ep in eps]
            dists[name] = _Dist(name, dist.version or "?", [_Entry(name, ep, o) for ep, o in zip(eps, off)])
    return dict(sorted(dists.items(), key=lambda kv: (kv[0] != HOST, canonical(kv[0]))))


class PluginManager:
    """Owns the plugin state, as pluggy's ``PluginManager`` does: the distributions and their entry points
    (read from metadata), what each provides, what failed, was disabled or tampered, and the threads plugins
    left running. It is the registry's finder: it puts what provides a name into the store."""

    def __init__(self) -> None:
        self._strays: list[threading.Thread] = []
        self._clear()

    def _clear(self) -> None:
        self._dists: dict[str, _Dist] | None = None
        self._providers: dict[str, dict[str, registry.AttentionSpec]] = {}  # name -> dist -> spec
        self._by_own_name: dict[str, set[str]] = {}  # name -> dists whose entry point of that name provides it
        self._placed: dict[str, registry.AttentionSpec] = {}  # what this manager put into the registry

    # -- the registry's finder

    def find(self, name: str) -> registry.AttentionSpec | None:
        """The spec for ``name``, importing only what may provide it; an ambiguous bare name is an error."""
        dists = self._scan()
        if ":" in name:
            return self._qualified(name)
        if name not in registry._registry:
            self._load_all(e for d in dists.values() for e in d.entries if e.ep.name == name)
        if name not in registry._registry and not self._by_own_name.get(name):
            self._load_all(e for d in dists.values() for e in d.entries)
        spec = registry._registry.get(name)
        top = self._top(name)
        if spec is None and len(top) > 1:
            options = ", ".join(f"'{d}:{name}'" for d in top)
            raise AttnzooError(f"attention '{name}' is provided by {' and '.join(top)}; pick one: {options}")
        if spec is None:  # a plugin that would provide it failed: say why, not "unknown"
            for d in dists.values():
                if any(e.ep.name == name for e in d.entries) and (d.failures or d.tampered):
                    why = "; ".join(d.failures) or f"it modified attnzoo ({', '.join(d.tampered)})"
                    raise AttnzooError(f"attention '{name}' comes from the plugin {d.name}, which failed to load: "
                                       f"{why} (see 'attnzoo plugins')")
        return spec

    def find_all(self) -> None:
        self._load_all(e for d in self._scan().values() for e in d.entries)

    # -- what the CLI and doctor show

    def status(self) -> list[PluginStatus]:
        self.find_all()
        conflicts: dict[str, list[str]] = {}
        for name, providers in self._providers.items():
            winner, in_process = self._winner(name)
            for dist in providers:
                if dist not in (winner, HOST):
                    others = sorted(set(providers) - {dist}) + ([IN_PROCESS] if in_process else [])
                    conflicts.setdefault(dist, []).append(
                        f"'{name}' also from {', '.join(others)}; use '{dist}:{name}'")
        out = []
        for d in self._scan().values():
            st = PluginStatus(d.name, d.version, list(d.names))
            if d.disabled:
                st.status, st.reason = "disabled", "ATTNZOO_DISABLE_PLUGINS"
            else:
                touched = [f"modified attnzoo: {', '.join(d.tampered)}; its modules are not used"] if d.tampered else []
                reasons = touched + d.failures + conflicts.get(d.name, [])
                st.status = ("tampered" if d.tampered else "failed" if d.failures
                             else "conflicting" if d.name in conflicts else "ok")
                st.reason = "; ".join(reasons)
            out.append(st)
        return out

    def qualified_names(self) -> list[str]:
        """``dist:name`` of every provider the bare name does not give (shadowed or ambiguous), sorted."""
        self.find_all()
        return sorted(
            f"{d}:{name}"
            for name, providers in self._providers.items()
            for d, spec in providers.items()
            if registry._registry.get(name) != spec
        )

    def stray_threads(self) -> list[threading.Thread]:
        """Non-daemon threads that plugin imports started and that still run."""
        return [t for t in self._strays if t.is_alive()]

    def refresh(self) -> None:
        """Forget what was discovered (in-process registrations stay); metadata is read again on the next lookup."""
        for name, spec in self._placed.items():
            if registry._registry.get(name) == spec:
                del registry._registry[name]
        self._clear()

    # -- loading

    def _scan(self) -> dict[str, _Dist]:
        if self._dists is None:
            self._dists = _read_entry_points()
            if HOST not in self._dists:  # running from a source tree, not installed
                from .. import attention  # noqa: F401  (its modules register on import)
        if HOST in self._dists:  # the host's modules are not guests: all of them on the first lookup
            self._load_all(self._dists[HOST].entries)
        return self._dists

    def _load_all(self, entries: Any) -> None:
        for entry in list(entries):
            self._load(entry)

    def _load(self, entry: _Entry) -> None:
        assert self._dists is not None
        d = self._dists[entry.dist]
        if entry.loaded or entry.disabled or d.blocked:
            return
        host = d.name == HOST
        limit = 0.0 if host else time_limit()  # a bad ATTNZOO_PLUGIN_TIMEOUT is the user's error, before any import
        entry.loaded = True
        ep = entry.ep
        try:
            obj, registered = _load(ep) if host else self._visit(d, entry, limit)
            provided = _specs_from(ep, obj, registered, d.name)
        except _Failed as failed:
            error = failed.error
        except Exception as e:  # the host's import errors, and contract errors
            error = e
        else:
            error = None
        if error is not None:
            if _flag("ATTNZOO_RAISE_PLUGIN_ERRORS"):
                raise error
            d.failures.append(f"{ep.name} ({ep.value}): {first_line(error, named=True, limit=10_000)}")
        if error is not None or d.blocked:
            return
        for name, spec in provided.items():
            d.names.append(name)
            self._providers.setdefault(name, {})[d.name] = spec
            if name == ep.name:
                self._by_own_name.setdefault(name, set()).add(d.name)
            self._settle(name)

    def _visit(self, d: _Dist, entry: _Entry, limit: float) -> tuple[Any, dict[str, registry.AttentionSpec]]:
        """Import a third-party entry point, contained; what it did wrong is recorded, and raised as ``_Failed``."""
        ep = entry.ep
        visit = _contained(ep.name, ep.module.partition(".")[0], lambda: _load(ep), limit)
        if visit.threads:
            self._strays += visit.threads
            names = ", ".join(repr(t.name) for t in visit.threads)
            self._block(d, f"{ep.name} ({ep.value}): started non-daemon thread(s) {names} at import, which keep "
                           "the process alive")
        if visit.tampered:
            d.tampered += [t for t in visit.tampered if t not in d.tampered]
            self._block(d)
        if not visit.finished:
            self._block(d)
            raise _Failed(PluginTimeout(f"import took longer than {limit:g}s (ATTNZOO_PLUGIN_TIMEOUT)"))
        if visit.error is not None or d.blocked:
            raise _Failed(visit.error)
        return visit.value

    def _block(self, d: _Dist, reason: str = "") -> None:
        """Take a distribution out: none of its modules is used, and its other entry points are not imported."""
        d.blocked = True
        if reason:
            d.failures.append(reason)
        d.names.clear()
        for name, providers in self._providers.items():
            if providers.pop(d.name, None) is not None:
                self._by_own_name.get(name, set()).discard(d.name)
                self._settle(name)

    # -- collisions

    def _top(self, name: str) -> list[str]:
        """The providers of ``name`` of the highest rank: the host, else entry points of that name, else all."""
        providers = self._providers.get(name, {})
        if HOST in providers:
            return [HOST]
        own = [d for d in providers if d in self._by_own_name.get(name, ())]
        return sorted(own or providers)

    def _winner(self, name: str) -> tuple[str | None, bool]:
        """Which provider the bare name gives, and whether a registration in this process overrides them all."""
        providers = self._providers.get(name, {})
        current = registry._registry.get(name)
        if current is not None and current != self._placed.get(name) and current not in providers.values():
            return None, True
        top = self._top(name)
        return (top[0] if len(top) == 1 else None), False

    def _settle(self, name: str) -> None:
        winner, in_process = self._winner(name)
        if in_process:
            return
        if winner is None:
            if registry._registry.get(name) == self._placed.pop(name, None):
                registry._registry.pop(name, None)
            return
        registry._registry[name] = self._placed[name] = self._providers[name][winner]

    def _qualified(self, name: str) -> registry.AttentionSpec | None:
        """``dist:name`` imports that distribution only and gives its provider of ``name``."""
        assert self._dists is not None
        dist, _, bare = name.partition(":")
        for d in self._dists.values():
            if canonical(d.name) == canonical(dist):
                self._load_all(d.entries)
                spec = self._providers.get(bare, {}).get(d.name)
                return replace(spec, name=f"{d.name}:{bare}") if spec is not None else None
        return None


manager = PluginManager()
registry.set_finder(manager)


def plugin_status() -> list[PluginStatus]:
    """Every plugin distribution (all imported, each within its time limit), the host first."""
    return manager.status()


def qualified_names() -> list[str]:
    return manager.qualified_names()


def refresh() -> None:
    """Forget discovered plugins, e.g. after installing or removing one in a running process."""
    manager.refresh()
