"""How many CPU cores this process may use.

``os.cpu_count()`` counts the machine's cores; a process pinned with ``taskset`` or a container's cpuset may run on
fewer. Timing "at the core count" or sizing thread pools on the machine's count would then oversubscribe the cores
it has (threads contending for one core time far slower than one thread).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def timed_thread_counts(threads: int) -> list[int]:
    """The thread counts the in-model check profiles at: ``--threads`` first, then the cores this process may use
    when that differs."""
    return list(dict.fromkeys([threads, available_cores()]))
