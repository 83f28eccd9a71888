"""Benchmark: `kvtool export` wall time, peak memory and graph sizes at wbits 16/8/4/3, both backends.

Builds a mid-size random LLaVA-1.5-style checkpoint with ``kvtool.models.make_tiny_model`` (default 8 layers,
hidden 2048, intermediate 5632, 16 heads — a quarter of LLaVA-1.5-7B's decoder), then runs one
``kvtool export`` per (backend, wbits) in its own subprocess; peak RSS is that child's own high-water mark
(``kvtool.memory.peak_rss_bytes``: VmHWM, written by the child at exit — not ``os.wait4``'s ``ru_maxrss``,
which Linux carries over from this parent, and the parent builds the 1.67 GB checkpoint in-process). Reports
wall and CPU seconds, peak RSS, the language model's weight bytes on disk (and the ratio to the fp16 export)
and each graph's size and weight format.

Run:  python bench/export.py [--hidden 2048 --layers 8] [--backends openvino,onnx] [--wbits 16,8,4,3]
                             [--workdir /tmp/kvtool-bench-export] [--json out.json]

Side by side with optimum-cli on a real-shape checkpoint (``kvtool models make``), one export at a time:

      python bench/export.py --vs-optimum llava-1.5-7b --shape-layers 4 --wbits 4,8 [--json out.json]
      python bench/export.py --vs-optimum llava-1.5-7b --shape-layers 4 \
          --rows kvtool:int4,optimum-cli:int4,kvtool:int8,optimum-cli:int8,kvtool:int4-awq,optimum-cli:int4-awq

runs ``kvtool export --wbits N`` (OpenVINO, stateful default; ``kvtool-onnx``: ``--backend onnx``) and
``optimum-cli export openvino --task image-text-to-text --weight-format intN`` (``int4-awq``: ``--awq`` on
both, data-free) on the same fp16 checkpoint, each under ``/usr/bin/time -v``, and reports peak RSS (the
child's maximum resident set, and its ratio to the checkpoint's bytes), wall and CPU seconds and output
size; ``--json`` is rewritten after every row. ``--optimum-cli PATH`` runs the optimum-cli rows with that
executable (e.g. a separate venv's, when this one's transformers is newer than optimum-intel's exporter
allows); the JSON records its path and its environment's transformers/optimum-intel/nncf/openvino/torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the child: `kvtool ...` that writes its own peak RSS (bytes) to $KVTOOL_PEAK_FILE when it exits
CHILD = ("import atexit, os, sys\n"
         "from kvtool.memory import peak_rss_bytes\n"
         "atexit.register(lambda: open(os.environ['KVTOOL_PEAK_FILE'], 'w').write(str(peak_rss_bytes())))\n"
         "from kvtool.cli import main\n"
         "sys.argv[0] = 'kvtool'\n"
         "main()\n")


def run_export(model: Path, out: Path, backend: str, wbits: int, extra: list[str]) -> dict:
    """One export in a child process: wall seconds, peak RSS (MiB) and the command's JSON result."""
    if out.exists():
        shutil.rmtree(out)
    peak_file = out.with_name(out.name + ".peak")
    cmd = [sys.executable, "-c", CHILD, "export", str(model), "-o", str(out), "--backend", backend,
           "--wbits", str(wbits), "--json", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", KVTOOL_PEAK_FILE=str(peak_file))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"export {backend} w{wbits} failed: {' '.join(cmd)}")
    res = json.loads(stdout[stdout.index("{"):])
    return {"backend": backend, "wbits": wbits, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # robust to other jobs on a shared machine
            "peak_rss_mib": round(int(peak_file.read_text()) / 2**20), "graphs": res["graphs"]}


def timed(cmd: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall, user+sys CPU seconds and peak RSS of the command."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **(extra_env or {}))
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    fields = dict(line.strip().rsplit(": ", 1) for line in res.stderr.splitlines() if ": " in line)
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gib": round(int(fields["Maximum resident set size (kbytes)"]) / 2**20, 2)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


ROW_TOOLS = ("kvtool", "kvtool-keep-pages", "kvtool-onnx", "optimum-cli")
ROW_FORMATS = ("int4", "int8", "int4-awq")


def parse_rows(spec: str) -> list[tuple[str, str]]:
    """``tool:format,...`` (tools ``ROW_TOOLS``, formats ``ROW_FORMATS``) -> [(tool, format)]."""
    rows = []
    for item in spec.split(","):
        tool, _, fmt = item.strip().partition(":")
        if tool not in ROW_TOOLS or fmt not in ROW_FORMATS:
            raise SystemExit(f"--rows {item!r}: expected TOOL:FORMAT with TOOL in {', '.join(ROW_TOOLS)} and "
                             f"FORMAT in {', '.join(ROW_FORMATS)}")
        rows.append((tool, fmt))
    return rows


def row_command(tool: str, fmt: str, model: Path, out: Path,
                optimum_cli: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Command line and extra environment of one --vs-optimum row. ``int4-awq`` is data-free AWQ on both
    sides (NNCF's, no calibration data: the hub is offline here); ``kvtool-keep-pages`` is kvtool with the
    checkpoint's pages left resident (``KVTOOL_EXPORT_KEEP_PAGES``), to measure what reclaiming them saves.
    ``optimum_cli``: the optimum-cli executable of the optimum-cli rows (default: the one on ``PATH``), e.g.
    another virtual environment's when this one's transformers is too new for optimum-intel's exporter."""
    bits, awq = fmt[3], fmt.endswith("-awq")
    if tool.startswith("kvtool"):
        backend = "onnx" if tool == "kvtool-onnx" else "openvino"
        cmd = [sys.executable, "-m", "kvtool.cli", "export", str(model), "-o", str(out), "--wbits", bits,
               "--backend", backend, *(["--awq"] if awq else [])]
        return cmd, ({"KVTOOL_EXPORT_KEEP_PAGES": "1"} if tool == "kvtool-keep-pages" else {})
    cmd = [optimum_cli or shutil.which("optimum-cli") or "optimum-cli", "export", "openvino", "--model", str(model),
           "--task", "image-text-to-text", "--weight-format", f"int{bits}", *(["--awq"] if awq else []), str(out)]
    return cmd, {}


ANCHOR_PACKAGES = ("transformers", "optimum", "optimum-intel", "nncf", "openvino", "torch")


def anchor_versions(optimum_cli: str | None) -> dict[str, str]:
    """Package versions of the environment that ``optimum_cli`` runs in (the ``python`` beside it; this
    interpreter's when it is ``None``): {package: version, or "-" when not installed}. Raises SystemExit
    naming the path when ``optimum_cli`` is not an executable file."""
    python = sys.executable
    if optimum_cli is not None:
        exe = Path(optimum_cli)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise SystemExit(f"--optimum-cli {optimum_cli}: expected an executable optimum-cli file")
        if (exe.parent / "python").exists():
            python = str(exe.parent / "python")
    code = ("import importlib.metadata as m, json\n"
            "def v(p):\n    try:\n        return m.version(p)\n    except m.PackageNotFoundError:\n        return '-'\n"
            f"print(json.dumps({{p: v(p) for p in {list(ANCHOR_PACKAGES)!r}}}))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def vs_optimum(args) -> None:
    """kvtool export vs optimum-cli export openvino on one real-shape checkpoint, one process at a time."""
    from kvtool.models.real_shapes import make_real_shape_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.vs_optimum}-l{args.shape_layers or 'all'}"
    if not (model / "model.safetensors.index.json").exists():
        make_real_shape_model(args.vs_optimum, model, layers=args.shape_layers)
    ckpt = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    anchor = anchor_versions(args.optimum_cli)
    spec = args.rows or ",".join(f"{t}:int{w}" for w in args.wbits.split(",") for t in ("kvtool", "optimum-cli"))
    rows = []
    for tool, fmt in parse_rows(spec):
        out = work / f"{tool}-{fmt}"
        if out.exists():
            shutil.rmtree(out)
        cmd, env = row_command(tool, fmt, model, out, args.optimum_cli)
        row = {"tool": tool, "format": fmt, **timed(cmd, env), "output_gib": round(dir_bytes(out) / 2**30, 3)}
        row["rss_vs_checkpoint"] = round(row["peak_rss_gib"] * 2**30 / ckpt, 2)
        rows.append(row)
        print(f"{tool:<18} {fmt:<9} peak {row['peak_rss_gib']:>6.2f} GiB ({row['rss_vs_checkpoint']:.2f}x ckpt)  "
              f"wall {row['wall_s']:>7.1f} s  cpu {row['cpu_s']:>7.1f} s  output {row['output_gib']:.3f} GiB",
              flush=True)
        if not args.keep:
            shutil.rmtree(out)
        if args.json_out:  # after every row: a long run interrupted keeps what it measured
            result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "loadavg_1min": os.getloadavg()[0]},
                      "model": {"shape": args.vs_optimum, "layers": args.shape_layers, "checkpoint_bytes": ckpt},
                      "optimum_cli": {"path": args.optimum_cli or shutil.which("optimum-cli"), "versions": anchor},
                      "rows": rows}
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


def lm_weight_bytes(row: dict, out: Path) -> int:
    """Bytes of the language model's weight file (.bin for OpenVINO, .onnx.data for ONNX)."""
    g = next(g for g in row["graphs"] if g["role"] == "language_model")
    path = out / g["file"]
    data = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return data.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--backends", default="openvino,onnx")
    ap.add_argument("--wbits", default="16,8,4,3")
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-export")
    ap.add_argument("--keep", action="store_true", help="Keep the exports (default: delete each after measuring).")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--vs-optimum", metavar="SHAPE", help="Compare with optimum-cli on this real-shape checkpoint "
                    "(llava-1.5-7b, qwen2-vl-2b, ...; see `kvtool ls models`).")
    ap.add_argument("--shape-layers", type=int, help="Decoder layers of the --vs-optimum checkpoint (default: all).")
    ap.add_argument("--rows", help="--vs-optimum rows, TOOL:FORMAT,... (tools: " + ", ".join(ROW_TOOLS) + "; formats: "
                    + ", ".join(ROW_FORMATS) + "; default: kvtool and optimum-cli at each --wbits).")
    ap.add_argument("--optimum-cli", metavar="PATH", help="optimum-cli executable of the optimum-cli rows (default: "
                    "the one on PATH), e.g. a separate venv's with a transformers that optimum-intel can export.")
    args = ap.parse_args()
    if args.vs_optimum:
        vs_optimum(args)
        return

    from kvtool.models import make_tiny_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"llava-h{args.hidden}-l{args.layers}"
    if not (model / "config.json").exists():
        make_tiny_model("tiny-llava", model, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        kv_heads=args.heads, intermediate=args.intermediate)
    ckpt_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = []
    for backend in args.backends.split(","):
        base = None
        for wbits in (int(w) for w in args.wbits.split(",")):
            out = work / f"{backend}-w{wbits}"
            row = run_export(model, out, backend, wbits, [])
            row["lm_weight_bytes"] = lm_weight_bytes(row, out)
            if wbits == 16:
                base = row["lm_weight_bytes"]
            row["lm_vs_fp16"] = round(base / row["lm_weight_bytes"], 2) if base else None
            rows.append(row)
            print(f"{backend:<9} w{wbits:<3} {row['wall_s']:>7.1f} s wall {row['cpu_s']:>7.1f} s cpu  peak {row['peak_rss_mib']:>6} MiB  "
                  f"LM weights {row['lm_weight_bytes'] / 2**20:>8.1f} MiB  (x{row['lm_vs_fp16']})  "
                  + ", ".join(f"{g['role']}={g['weights']}" for g in row["graphs"]), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "model": {"path": str(model), "hidden": args.hidden, "layers": args.layers,
                        "intermediate": args.intermediate, "checkpoint_bytes_fp32": ckpt_bytes},
              "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
