"""kvtool.export.pages: reclaiming a memory-mapped checkpoint's pages keeps the data and lowers RssFile."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kvtool.export.pages import mapped_ranges, page_out, paging_out

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and MADV_PAGEOUT are Linux's")


def test_mapped_ranges_reads_only_the_named_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    maps = (f"7f0000000000-7f0000100000 rw-p 00000000 fe:00 11 {a}\n"
            f"7f0000200000-7f0000300000 r--p 00000000 fe:00 12 {b}\n"
            "7f0000400000-7f0000500000 rw-p 00000000 00:00 0 \n"
            f"7f0000600000-7f0000700000 r--s 00100000 fe:00 11 {a}\n")
    assert mapped_ranges([a], maps) == [(0x7F0000000000, 0x7F0000100000), (0x7F0000600000, 0x7F0000700000)]
    assert mapped_ranges([tmp_path / "c"], maps) == []


def _rss_file() -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@linux_only
def test_page_out_drops_resident_pages_and_keeps_the_data_and_a_private_write(tmp_path):
    path = tmp_path / "w.bin"
    ref = np.random.default_rng(0).standard_normal(16 << 20 >> 2).astype(np.float32)  # 16 MiB
    ref.tofile(path)
    m = np.memmap(path, dtype=np.float32, mode="c")  # private copy-on-write, as torch maps safetensors
    m[123] = 42.0  # one written (private) page: must survive
    before = _rss_file()
    assert float(np.abs(m - ref)[124:].max()) == 0.0  # touches every page
    touched = _rss_file()
    if page_out([path]) == 0:
        pytest.skip("kernel without MADV_PAGEOUT")
    after = _rss_file()
    assert touched - before > 12 << 20, (before, touched)
    assert touched - after > 12 << 20, (touched, after)
    assert m[123] == 42.0
    assert np.array_equal(np.delete(np.asarray(m), 123), np.delete(ref, 123))
    del m


@linux_only
def test_paging_out_reclaims_at_exit_unless_asked_to_keep(tmp_path, monkeypatch):
    with paging_out([]):
        pass
    path = tmp_path / "w.bin"
    np.ones(16 << 20 >> 2, np.float32).tofile(path)
    m = np.memmap(path, dtype=np.float32, mode="r")
    if page_out([path]) == 0:
        pytest.skip("kernel without MADV_PAGEOUT")
    drops = {}
    for keep in ("1", ""):
        monkeypatch.setenv("KVTOOL_EXPORT_KEEP_PAGES", keep)
        with paging_out([path], interval_s=60):
            assert float(m.sum()) == m.size
            inside = _rss_file()
        drops[keep] = inside - _rss_file()
    assert drops["1"] < 4 << 20 and drops[""] > 12 << 20, drops
    del m
