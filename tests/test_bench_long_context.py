"""bench/long_context.py's target evaluation and merge on hand-worked rows (no model runs here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("long_context_bench", BENCH / "long_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name, length, peak, ttft=100.0, decode=10.0):
    return {"name": name, "length": length, "peak_rss_bytes": peak, "ttft_ms": ttft, "decode_ms_per_token": decode}


def test_targets_as_ratios_met_missed_and_not_measured():
    lc = _module()
    base = lc.BASE_TOKENS
    rows = [_row("genai_f16", base, 100), _row("genai_f16", 8192, 300), _row("genai_f16", 2048, 200),
            _row("kvtool_fp16", 2048, 230), _row("kvtool_fp16", 8192, 330, ttft=110.0, decode=12.0),
            _row("kvtool_kc128vt128_2b", base, 100), _row("kvtool_kc128vt128_2b", 8192, 120)]
    got = {(t["target"], t["tokens"]): t for t in lc.targets(rows, 8192)}
    t = got[("KV-attributable memory kvtool_kc128vt128_2b / genai_f16 <= 0.2", 8192)]
    assert abs(t["ratio"] - 20 / 200) < 1e-12 and t["status"] == "met"  # (120-100) / (300-100)
    t = got[("peak RSS kvtool_fp16 / genai_f16 <= 1.1", 8192)]
    assert abs(t["ratio"] - 1.1) < 1e-12 and t["status"] == "met"  # 330 / 300: at the limit is met
    t = got[("peak RSS kvtool_fp16 / genai_f16 <= 1.1", 2048)]
    assert abs(t["ratio"] - 1.15) < 1e-12 and t["status"] == "missed"
    assert got[("TTFT kvtool_fp16 / genai_f16 <= 1.1", 8192)]["status"] == "met"  # 110 / 100
    t = got[("decode kvtool_fp16 / genai_f16 <= 1.0", 8192)]
    assert abs(t["ratio"] - 1.2) < 1e-12 and t["status"] == "missed"
    # no genai_u4 rows: those targets are reported, as not measured
    t = got[("peak RSS kvtool_kc128vt128_2b / genai_u4 <= 1.0", 8192)]
    assert t["ratio"] is None and t["status"] == "not measured"


def test_merge_replaces_rows_and_reevaluates(tmp_path):
    lc = _module()
    run = {"date": "d1", "rounds": 1, "new_tokens": 16, "load_average": {"min": 1.0, "median": 2.0, "max": 3.0}, "failures": []}
    a = {**run, "results": [_row("genai_f16", 2048, 200), _row("kvtool_fp16", 2048, 400)]}
    b = {**run, "date": "d2", "results": [_row("kvtool_fp16", 2048, 210)]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    res = lc.merge([str(pa), str(pb)], 2048)
    assert [r["peak_rss_bytes"] for r in res["results"] if r["name"] == "kvtool_fp16"] == [210]
    t = next(t for t in res["targets"] if t["target"].startswith("peak RSS kvtool_fp16"))
    assert abs(t["ratio"] - 1.05) < 1e-12 and t["status"] == "met"
    assert "| kvtool_fp16 |" in lc.markdown({**res, "cpus": 2, "results": [
        {**r, "prompt_tokens": 1, "rss_after_load_bytes": 0, "kv_bytes": 0, "kv_work_bytes": 0} for r in res["results"]]})
