"""How many CPU threads torch uses: the cores nobody else is using, never more.

torch starts one OpenMP thread per core. On a machine shared with other jobs an OpenMP barrier waits for a
thread the kernel has descheduled, and every parallel op stalls: on the 2-core development machine, with one
other busy process, two threads ran a training step 3.4x slower than one; on the quiet machine two threads were
1.9x faster than one (``benchmarks/threads.py``). So ``"auto"`` takes the cores that are idle when the command
starts, less one per DataLoader worker process (each runs on a core of its own), and a fit follows the machine
while it runs (``callbacks.FollowIdleCores``): a job that starts beside it takes a thread away, one that ends
gives it back. Idle is measured, not inferred from the 1-minute load average, which still counts a job that
ended a minute ago: the CPU time the kernel reports (``/proc/stat``) less this process's own (``CpuMeter``);
elsewhere the load average. This file does not import torch until a count is applied.
"""

from __future__ import annotations

import math
import os
import time

from ..errors import AttnzooError

AUTO = "auto"
SAMPLE_SECONDS = 0.25
# a core another job keeps busy a third of the time already makes an OpenMP barrier wait on it: count it as taken
TAKEN_FROM = 0.3


class CpuMeter:
    """How many cores other processes keep busy: the kernel's CPU time counters (``/proc/stat``, every process)
    less this process's own CPU time (``time.process_time``, all its threads), over the time since the last
    reading. Reading it costs no sleep, so a running fit reads it between batches; ``others`` is None where
    there are no counters."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 4:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle, time.process_time(), time.monotonic()  # user..steal (guest is in user)

    def others(self) -> float | None:
        """Cores busy with other processes since the last call (or since the meter was made)."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0] or now[3] <= last[3]:
            return None
        busy = (os.cpu_count() or 1) * (1 - (now[1] - last[1]) / (now[0] - last[0]))
        own = (now[2] - last[2]) / (now[3] - last[3])
        return max(0.0, busy - own)


def _busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores busy with other processes over ``seconds`` (this one sleeps meanwhile)."""
    meter = CpuMeter()
    time.sleep(seconds)
    return meter.others()


def free_cores(others: float, cpus: int | None = None) -> int:
    """The CPUs this process may use (at least 1) that ``others`` busy cores leave free."""
    cpus = cpus or cpu_budget()
    return max(1, min(cpus, cpus - math.floor(others + 1 - TAKEN_FROM)))


def idle_cores() -> int:
    """CPUs this process may use that nobody is using now (at least 1)."""
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # neither: assume a quiet machine
            busy = 0.0
    return free_cores(busy)


def check_threads(threads: int | str | None, label: str = "--threads") -> int | str | None:
    """``None`` (leave torch as it is), ``"auto"``, or a whole number from 1 to the CPUs this process may use.
    ``label``: the option checked (also the sweep's ``--jobs``, processes bounded the same way)."""
    if threads is None or threads == AUTO:
        return threads
    if isinstance(threads, str):
        try:
            threads = int(threads)
        except ValueError:
            raise AttnzooError(f"{label} takes a number or 'auto', got '{threads}'") from None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise AttnzooError(f"{label} takes a number or 'auto', got {threads!r}")
    cpus = cpu_budget()
    if not 1 <= threads <= cpus:
        raise AttnzooError(f"{label} must be from 1 to {cpus} (the CPUs this process may use), got {threads}")
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
