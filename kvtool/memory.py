"""The process's own peak memory, the one figure every kvtool memory number (run stats, eval results,
``bench/`` tables, sweep workers) is taken from.

``peak_rss_bytes()`` reads ``VmHWM`` (the resident-set high-water mark of *this* process) from
``/proc/self/status``. It deliberately does not use ``getrusage(...).ru_maxrss`` where procfs exists: Linux
carries ``ru_maxrss`` from a parent across ``fork`` and ``exec``, so a child of a parent that had reached
1.5 GB reports at least 1.5 GB whatever it used itself (proc(5); ``getrusage(2)``: "the maximum resident set
size ... of the process"). Where there is no procfs (macOS, Windows) it falls back to ``ru_maxrss`` (bytes on
macOS, KiB elsewhere), then to 0. It does nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def vm_hwm_bytes(status_text: str) -> int | None:
    """``VmHWM`` in bytes from the text of a ``/proc/<pid>/status`` file (None when absent, e.g. a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"/proc status VmHWM in unexpected unit {unit!r}; expected kB")
            return int(value) * 1024
    return None


def peak_rss_bytes() -> int:
    """This process's own peak resident set size in bytes (see the module docstring)."""
    try:
        hwm = vm_hwm_bytes(_STATUS.read_text())
    except OSError:
        hwm = None
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return 0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)
