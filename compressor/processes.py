"""Whether the process that had a pid is still the one running under it, on this host.

psutil's `create_time()` is the boot time plus the process's start, and the boot time it reads moves whenever the
wall clock is stepped (NTP, a VM resumed after a pause). A process recorded before such a step then looks like
another one, so a watchdog or a lease could take a live run for dead and kill it or take over its stage (the likely
cause of a test run's `compressor run` SIGKILLed here). The start itself, counted in clock ticks since boot in
/proc/PID/stat, never changes; where there is no /proc (macOS), psutil's figure is used."""

from __future__ import annotations

import os
from typing import Optional

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = os.path.exists("/proc/self/stat")


def started(pid: int) -> Optional[float]:
    """When process `pid` started, in seconds after boot (elsewhere than Linux: psutil's create_time); None when
    there is no such process or it has exited (a zombie)."""
    if not _PROC:
        return _psutil_started(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces or ')'
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == b"Z" else int(fields[19]) / _TICKS  # fields 3 (state) and 22 (starttime)


def _psutil_started(pid: int) -> Optional[float]:
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None


def same_process(pid: int, start: float) -> bool:
    """True while the process that started at `start` (from `started`) still runs under `pid`."""
    now = started(pid)
    return now is not None and abs(now - start) < 0.02
