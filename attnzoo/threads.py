"""How many CPU threads torch uses: the cores nobody else is using, never more.

torch starts one OpenMP thread per core. On a machine shared with other jobs an OpenMP barrier waits for a
thread the kernel has descheduled, and a parallel op stalls: on the 2-core development machine with one
other busy process, two threads ran a training step 2.3x slower than one (``benchmarks/threads.py``). So
``"auto"`` takes the cores that are idle when the command starts (the CPUs this process may use less the
1-minute load average, at least 1), and less one per DataLoader worker process, which runs on a core of its
own. This file does not import torch until a count is applied.
"""

from __future__ import annotations

import os

from .config import cpu_budget
from .errors import AttnzooError

AUTO = "auto"


def idle_cores() -> int:
    """CPUs this process may use that the load average says are idle now (at least 1)."""
    cpus = cpu_budget()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system: assume a quiet machine
        load = 0.0
    return max(1, min(cpus, cpus - round(load)))


def check_threads(threads: int | str | None) -> int | str | None:
    """``None`` (leave torch as it is), ``"auto"``, or a whole number from 1 to the CPUs this process may use."""
    if threads is None or threads == AUTO:
        return threads
    if isinstance(threads, str):
        try:
            threads = int(threads)
        except ValueError:
            raise AttnzooError(f"--threads takes a number or 'auto', got '{threads}'") from None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise AttnzooError(f"--threads takes a number or 'auto', got {threads!r}")
    cpus = cpu_budget()
    if not 1 <= threads <= cpus:
        raise AttnzooError(f"--threads must be from 1 to {cpus} (the CPUs this process may use), got {threads}")
    return threads


def use_threads(threads: int | str | None, workers: int = 0) -> int | None:
    """Apply ``threads`` to torch (``"auto"``: the idle cores less one per DataLoader worker); returns the count
    in use, or None when ``threads`` is None and torch is left as it is."""
    threads = check_threads(threads)
    if threads is None:
        return None
    n = max(1, idle_cores() - workers) if threads == AUTO else threads
    import torch

    torch.set_num_threads(n)
    return n
