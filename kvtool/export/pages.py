"""Keep a memory-mapped checkpoint's weight pages out of the exporter's resident set while it converts.

transformers loads safetensors checkpoints memory-mapped: a weight costs no memory until read, and then its
pages stay in the process's resident set (``RssFile``) for as long as the file is mapped — the whole
export. OpenVINO's converted constants share those pages, and NNCF reads every weight once to compress
it, so by the end of the language model's compression every page of the checkpoint is resident (measured
on ``llava-1.5-7b --layers 4``: ``RssFile`` 3.07 GiB of a 4.20 GiB resident set, the checkpoint being
2.60 GiB) although each page is needed only while its weight is being converted or compressed.

``paging_out(files)`` runs a thread that, every ``interval_s``, asks the kernel to reclaim the pages of
the process's mappings of ``files`` (``madvise(MADV_PAGEOUT)``, Linux >= 5.4). The data stay correct:
a clean file page read again is faulted back in from the page cache or the file, and a page the process
wrote (a private copy-on-write page) is never dropped — without swap it stays, with swap it is swapped
out and back, so ``MADV_PAGEOUT`` cannot lose a write (madvise(2)). The cost is re-reading the few pages
still in use. Elsewhere (no ``/proc/self/maps``, or a kernel without ``MADV_PAGEOUT``) it does nothing.
It does not change what is exported, and it does not limit anonymous memory (copies the libraries make).
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path

MADV_PAGEOUT = 21  # <bits/mman-linux.h>: reclaim these pages (Linux 5.4)
_MAPS = Path("/proc/self/maps")


def mapped_ranges(files: list[Path], maps_text: str | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` address ranges of this process's mappings of ``files`` (``/proc/self/maps``, or
    ``maps_text`` in that format: ``start-end perms offset dev inode path``); [] without procfs."""
    if maps_text is None:
        try:
            maps_text = _MAPS.read_text()
        except OSError:
            return []
    wanted = {str(Path(f).resolve()) for f in files}
    ranges = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def page_out(files: list[Path]) -> int:
    """Ask the kernel to reclaim the resident pages of this process's mappings of ``files``; returns the
    bytes of mappings advised (0 when unsupported). Never raises for an unsupported kernel."""
    ranges = mapped_ranges(files)
    if not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for start, end in ranges:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) == 0:
            advised += end - start
        elif ctypes.get_errno() == 22:  # EINVAL: no MADV_PAGEOUT on this kernel
            return 0
    return advised


@contextmanager
def paging_out(files: list[Path], interval_s: float = 0.25):
    """While the block runs, reclaim the resident pages of ``files``' mappings every ``interval_s`` seconds
    (see the module docstring); a no-op where unsupported, when ``files`` is empty, or when the environment
    sets ``KVTOOL_EXPORT_KEEP_PAGES`` (to measure what it saves)."""
    if not files or not _MAPS.exists() or os.environ.get("KVTOOL_EXPORT_KEEP_PAGES"):
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval_s):
            page_out(files)

    thread = threading.Thread(target=loop, name="kvtool-page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        page_out(files)
