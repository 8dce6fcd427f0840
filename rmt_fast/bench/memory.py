"""Resident memory of a process on the CPU: current, peak, and the peak of one phase.

Linux keeps a process's peak resident set size (``VmHWM`` in ``/proc/<pid>/status``) and lets
the process restart it from the current size (writing ``5`` to ``/proc/self/clear_refs``). With
the heap's free pages handed back first (``malloc_trim``), the peak of a phase measured this way
is that phase's own, not one inherited from earlier work in the same process. Elsewhere (no
``/proc``) the functions fall back to ``resource.getrusage``'s lifetime peak and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource


def _status_mib(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib(pid: int | str = "self") -> float:
    """Current resident set size of a process in MiB (0.0 where it cannot be read)."""
    value = _status_mib("VmRSS", pid)
    return value if value is not None else 0.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB since it started or since the last
    :func:`reset_peak_rss` that returned True."""
    value = _status_mib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim_heap() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``;
    a no-op on other C libraries), so that memory freed earlier leaves the resident set."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def reset_peak_rss() -> bool:
    """Trim the heap and restart the kernel's peak-RSS counter from the current RSS. Returns
    False where the counter cannot be reset (no ``/proc``): :func:`peak_rss_mib` is then the
    lifetime peak."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
