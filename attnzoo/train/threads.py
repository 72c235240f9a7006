"""How many CPU threads torch uses: the cores nobody else is using, never more.

torch starts one OpenMP thread per core. On a machine shared with other jobs an OpenMP barrier waits for a
thread the kernel has descheduled, and every parallel op stalls: on the 2-core development machine, with one
other busy process, two threads ran a training step 3.4x slower than one; on the quiet machine two threads were
1.9x faster than one (``benchmarks/threads.py``). So ``"auto"`` takes the cores that are idle when the command
starts, less one per DataLoader worker process (each runs on a core of its own). Idle is measured, not
inferred from the 1-minute load average, which still counts a job that ended a minute ago: the CPU time the
kernel reports (``/proc/stat``) over a quarter of a second; elsewhere the load average. This file does not
import torch until a count is applied.
"""

from __future__ import annotations

import os
import time

from ..errors import AttnzooError

AUTO = "auto"
SAMPLE_SECONDS = 0.25


def _busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores busy over ``seconds``, from the kernel's CPU time counters; None where there are none."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already in user

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def idle_cores() -> int:
    """CPUs this process may use that nobody is using now (at least 1)."""
    cpus = cpu_budget()
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # neither: assume a quiet machine
            busy = 0.0
    return max(1, min(cpus, cpus - round(busy)))


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


def cpu_budget() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
