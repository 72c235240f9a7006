"""``attnzoo doctor``: the environment checked before anything heavy, with a fix for every problem found.

Each check imports or probes one thing and never lets an exception out: a broken install is what it is
looking for. The best-known breakage is a torchvision built for another torch, whose compiled operators
then fail to load (``operator torchvision::nms does not exist``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from typing import Any

from .errors import first_line

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _why(e: BaseException) -> str:
    return first_line(e, named=True, limit=200)


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", OK if ok else FAIL, f"{v.major}.{v.minor}.{v.micro}",
                 "" if ok else "attnzoo needs Python 3.10 or newer")


def check_import(module: str, dist: str | None = None, required: bool = True, purpose: str = "") -> Check:
    dist = dist or module
    try:
        importlib.import_module(module)
    except Exception as e:
        status = FAIL if required else WARN
        fix = f"pip install {dist}" if isinstance(e, ModuleNotFoundError) else \
            f"reinstall it: pip install --force-reinstall {dist}"
        if purpose:
            fix += f" (needed {purpose})"
        return Check(dist, status, f"cannot import: {_why(e)}", fix)
    return Check(dist, OK, _version(dist) or "installed")


def check_torchvision_ops() -> Check:
    """torchvision's compiled operators load and run (they fail when torchvision was built for another torch)."""
    torch_v, tv_v = _version("torch"), _version("torchvision")
    fix = (f"torchvision {tv_v} does not match torch {torch_v}: install them together so pip picks matching "
           f"builds, e.g. pip install --upgrade torch torchvision (never pin one without the other)")
    try:
        import torch
        import torchvision

        torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    except Exception as e:
        return Check("torchvision ops", FAIL, _why(e), fix)
    return Check("torchvision ops", OK, f"compiled operators load (torch {torch_v}, torchvision {tv_v})")


def check_requirement(dist: str, on: str) -> Check:
    """The installed ``on`` satisfies what ``dist`` declares it needs."""
    name = f"{dist} needs {on}"
    try:
        from packaging.requirements import Requirement
    except Exception:
        return Check(name, WARN, "cannot check (the 'packaging' package is missing)", "pip install packaging")
    have = _version(on)
    if have is None or _version(dist) is None:
        return Check(name, WARN, f"{dist if _version(dist) is None else on} is not installed",
                     f"pip install {dist if _version(dist) is None else on}")
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() == on.lower() and not req.marker:
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                return Check(name, FAIL, f"{dist} {_version(dist)} needs {on}{req.specifier}, found {have}",
                             f"pip install '{on}{req.specifier}' (or a {dist} release that supports {on} {have})")
            return Check(name, OK, f"{on} {have} satisfies {req.specifier or 'any version'}")
    return Check(name, OK, f"{on} {have} (no constraint declared)")


def check_accelerators() -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("accelerator", FAIL, f"torch does not import: {_why(e)}", "pip install torch")]
    out = []
    built = torch.version.cuda
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16: fp16 mixed precision"
        out.append(Check("CUDA", OK, f"{len(names)} GPU(s): {', '.join(names)}; CUDA {built}; {bf16}"))
    elif built:
        out.append(Check("CUDA", OK, f"torch is built for CUDA {built} but sees no GPU: training runs on the CPU",
                         ""))
    else:
        out.append(Check("CUDA", OK, "CPU-only torch build: training runs on the CPU"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(Check("MPS", OK, "Apple GPU available"))
    out.append(Check("CPU threads", OK, f"{torch.get_num_threads()} threads for torch"))
    return out


def check_plugins() -> list[Check]:
    try:
        from .model.plugins import plugin_status

        statuses = plugin_status()
    except Exception as e:
        return [Check("plugins", FAIL, f"plugin discovery failed: {_why(e)}",
                      "set ATTNZOO_DISABLE_PLUGINS=1 to run without plugins, and report this")]
    out = []
    for st in statuses:
        if st.status == "ok":
            out.append(Check(f"plugin {st.dist}", OK, f"{st.version}: {', '.join(st.names) or 'nothing'}"))
        elif st.status == "disabled":
            out.append(Check(f"plugin {st.dist}", OK, "disabled"))
        elif st.status == "tampered":  # it changed attnzoo itself: results of this process may not be attnzoo's
            out.append(Check(f"plugin {st.dist}", FAIL, f"{st.status}: {st.reason}",
                             f"pip uninstall {st.dist} (or ATTNZOO_DISABLE_PLUGINS={st.dist}), and tell its authors"))
        else:
            fix = (f"pip install --upgrade {st.dist}, or pip uninstall {st.dist}" if st.status == "failed"
                   else "use the qualified name dist:name to pick one")
            out.append(Check(f"plugin {st.dist}", WARN, f"{st.status}: {st.reason}", fix))
    return out


def check_cache() -> Check:
    import os

    from .train.demo import demo_root

    root = demo_root()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return Check("demo cache", WARN, f"{existing} is not writable",
                     "set ATTNZOO_CACHE to a writable folder (only needed for --data demo)")
    return Check("demo cache", OK, f"{root}{'' if root.exists() else ' (made on first use)'}")


CHECKS: list[Callable[[], Check | list[Check]]] = [
    check_python,
    lambda: check_import("torch"),
    lambda: check_import("torchvision"),
    check_torchvision_ops,
    lambda: check_import("timm"),
    lambda: check_import("fastai"),
    lambda: check_requirement("fastai", "torch"),
    lambda: check_requirement("timm", "torch"),
    lambda: check_import("safetensors"),
    lambda: check_import("PIL", "pillow"),
    lambda: check_import("accelerate", required=False, purpose="for torchrun / accelerate launch"),
    check_accelerators,
    check_plugins,
    check_cache,
]


def run_checks() -> list[Check]:
    out: list[Check] = []
    for check in CHECKS:
        try:
            result: Any = check()
        except Exception as e:  # a check itself must never take the doctor down
            result = Check(getattr(check, "__name__", "check"), FAIL, f"the check failed: {_why(e)}")
        out.extend(result if isinstance(result, list) else [result])
    return out
