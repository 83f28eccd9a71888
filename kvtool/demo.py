"""``kvtool demo``: the study's Table 3 in minutes, on the bundled trained model and the ``shapes`` benchmark.

``run_demo(DemoConfig())`` exports the shipped ``kvtool-shapes`` checkpoint once to OpenVINO with int4 weights
(cached under ``cache_dir``, keyed by the checkpoint's hash), then evaluates the ``shapes`` test split with
the ordinary eval runner: the PyTorch fp32 reference; OpenVINO int4 with fp16 KV; OpenVINO int4 with each of
the study's KV schemes at 4 and 2 bits in the runtime's default mode (``packed``, first answer token already
sees the compressed cache). Each row is compared with the reference (answer agreement, accuracy delta with a
paired bootstrap 95% interval). Results: a table, ``demo.json`` (``{"rows": [...]}``), two PNG plots —
``demo.png`` (accuracy vs KV bits per scheme, bootstrap intervals) and ``demo_tradeoff.png`` (accuracy change
vs KV bytes per token relative to fp16, Pareto front) — and the run directories (resumable: a re-run reuses
finished predictions).

It does not train, tune or choose anything: the rows are whatever the schemes do to this model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.quant_ops.schemes import QUANT_BITS

DEMO_SCHEMES = ("uniform", "or2", "g-CN", "g-T128", "g-KCNVT128", "g-KC128VT128")
DEMO_BITS = (4, 2)
QUICK_N = 60


@dataclass
class DemoConfig:
    """One demo run. ``n``: shapes test questions per row (``quick`` uses ``QUICK_N``)."""

    out_dir: str = "kvtool-demo"
    cache_dir: str | None = None  # export cache; default $KVTOOL_CACHE or ~/.cache/kvtool
    n: int = 300
    quick: bool = False
    schemes: tuple[str, ...] = DEMO_SCHEMES
    bits: tuple[int, ...] = DEMO_BITS
    device: str = "auto"
    n_boot: int = 1000
    model: str | None = None  # default: the bundled kvtool-shapes
    progress: bool = True
    plan: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.quick:
            self.n = min(self.n, QUICK_N)
        if self.n < 1:
            raise InputError(f"--n {self.n}: expected a positive number of questions")
        bad = [b for b in self.bits if b not in QUANT_BITS]
        if bad:
            raise InputError(f"--bits {bad[0]}: expected KV bits among {', '.join(map(str, QUANT_BITS))}")
        from kvtool.quant_ops import parse_scheme

        parsed = []
        for s in self.schemes:
            try:
                parsed.append(str(parse_scheme(s)))
            except (InputError, ValueError) as e:  # name the option, as run/eval's --kv do
                raise InputError(f"--schemes: {e}") from None
        if not parsed:
            raise InputError("--schemes: empty; expected comma-separated KV schemes (kvtool ls schemes)")
        self.schemes = tuple(parsed)
        self.plan = demo_plan(self.schemes, self.bits)


def demo_plan(schemes: tuple[str, ...], bits: tuple[int, ...]) -> list[dict[str, Any]]:
    """The rows: reference, int4 + fp16 KV, then int4 x scheme x bits (each scheme at every bit width)."""
    rows = [{"name": "torch-fp32", "backend": "torch", "wbits": 16, "kv": "fp16", "k_bits": 16, "v_bits": 16},
            {"name": "ov-w4-fp16", "backend": "openvino", "wbits": 4, "kv": "fp16", "k_bits": 16, "v_bits": 16}]
    for b in bits:
        for s in schemes:
            rows.append({"name": f"ov-w4-{s}-k{b}v{b}", "backend": "openvino", "wbits": 4, "kv": s,
                         "k_bits": b, "v_bits": b})
    return rows


def _cache_root(cfg: DemoConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("KVTOOL_CACHE", Path.home() / ".cache" / "kvtool"))


def _model_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()[:12]


def ensure_export(model_dir: Path, cache_root: Path, wbits: int = 4, progress: bool = True) -> Path:
    """The OpenVINO int``wbits`` export of ``model_dir`` in the cache, made on first use (``progress``: the
    export's own progress bar)."""
    from kvtool.export import ExportConfig, export_model

    # "stateful": the export default since issue 14; a cached stateless export of older kvtool is not reused
    out = cache_root / "demo" / f"openvino-w{wbits}-stateful-{_model_hash(model_dir)}"
    if not (out / "kvtool.json").is_file():
        export_model(ExportConfig(model=str(model_dir), output=str(out), backend="openvino", wbits=wbits,
                                  progress=progress))
    return out


def _row_record(plan: dict[str, Any], results: dict[str, Any], cmp: dict[str, Any] | None,
                ci: tuple[float, float] | None = None) -> dict[str, Any]:
    """One table row; ``ci``: the row's own bootstrap 95% interval of accuracy (%), recorded as a fraction."""
    from kvtool.evals.report import kv_ratio, run_kv_dtype
    from kvtool.evals.tasks import get_task

    # the task's accuracies are declared on a 0-100 scale (TaskSpec.metrics); the demo records fractions
    pct = get_task("shapes").headline_info.scale[1]
    task = results["tasks"]["shapes"]
    m, timing = task["metrics"], task.get("timing", {})
    row: dict[str, Any] = {k: plan[k] for k in ("name", "backend", "wbits", "kv", "k_bits", "v_bits")}
    row["accuracy"] = m["accuracy"] / pct
    row["n"] = m["n"]
    for k, v in m.items():
        if k.startswith("accuracy_"):
            row[k] = v / pct
    pope = m.get("pope") or {}
    row["pope_f1"] = pope.get("mean_f1", float("nan")) / pct if pope else None
    row["pope_random_f1"] = pope.get("random_f1", float("nan")) / pct if "random_f1" in pope else None
    # the element type the unquantized cache is held in (the torch reference: fp32; the graphs' fp16 KV: fp16)
    row["kv_dtype"] = run_kv_dtype(results)
    row["kv_bytes"] = timing.get("mean_kv_bytes")
    row["kv_fp16_bytes"] = timing.get("mean_kv_fp16_bytes")
    # measured kv_bytes / kv_fp16_bytes, else quant_ops' storage bound of the scheme ("bound")
    row["kv_ratio"], row["kv_ratio_source"] = kv_ratio(timing, plan["kv"], plan["k_bits"], plan["v_bits"])
    row["accuracy_ci95"] = None if ci is None else [c / pct for c in ci]
    row["decode_ms_per_token"] = timing.get("mean_decode_ms_per_token")
    row["prefill_ms"] = timing.get("mean_prefill_ms")
    if cmp is None:  # the reference itself
        row.update(agreement=1.0, accuracy_delta=0.0, accuracy_delta_ci95=[0.0, 0.0])
    else:
        t = cmp["tasks"]["shapes"]
        d = t["metrics"]["accuracy"]
        row.update(agreement=t["agreement"], accuracy_delta=d["delta"] / pct,
                   accuracy_delta_ci95=[x / pct for x in d.get("ci95", [float("nan")] * 2)])
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a text table in the shape of the study's Table 3 (accuracies in %)."""
    types = sorted({k[len("accuracy_"):] for r in rows for k in r if k.startswith("accuracy_")
                    and k != "accuracy_delta" and not k.endswith("_ci95")})
    head = (f"{'backend':<9}{'W':>3} {'KV':<13}{'bits':>5}{'acc':>7}" + "".join(f"{t[:8]:>9}" for t in types)
            + f"{'POPE F1':>8}{'KV/fp16':>8}{'ms/tok':>8}{'agree':>7}{'delta [95% CI]':>24}")
    from kvtool.evals.report import held_kv_label

    lines = [head, "-" * len(head)]
    for r in rows:
        # an unquantized cache is labelled by the element type the run recorded (as kvtool report does)
        kv, bits = held_kv_label(r.get("kv_dtype")) if r["kv"] == "fp16" else (r["kv"], f"{r['k_bits']}")
        ci = r["accuracy_delta_ci95"]
        pct = (lambda v: "   –" if v is None else f"{100 * v:.1f}")  # noqa: E731
        lines.append(
            f"{r['backend']:<9}{r['wbits']:>3} {kv:<13}{bits:>5}{pct(r['accuracy']):>7}"
            + "".join(f"{pct(r.get('accuracy_' + t)):>9}" for t in types)
            + f"{pct(r['pope_f1']):>8}"
            + (f"{r['kv_ratio']:>8.3f}" if r["kv_ratio"] is not None else f"{'–':>8}")
            + (f"{r['decode_ms_per_token']:>8.2f}" if r["decode_ms_per_token"] is not None else f"{'–':>8}")
            + f"{pct(r['agreement']):>7}"
            + f"{100 * r['accuracy_delta']:>+8.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]".rjust(24))
    return "\n".join(lines)


def _is_reference(row: dict[str, Any]) -> bool:
    return row["backend"] == "torch"


def plot_demo(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``demo_accuracy_figure(rows)`` as PNG to ``path``."""
    from kvtool.evals.plots import save_figure

    save_figure(demo_accuracy_figure(rows), path)
    return Path(path)


def plot_demo_tradeoff(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``demo_tradeoff_figure(rows)`` as PNG to ``path``."""
    from kvtool.evals.plots import save_figure

    save_figure(demo_tradeoff_figure(rows), path)
    return Path(path)


def demo_accuracy_figure(rows: list[dict[str, Any]]):
    """Accuracy (%) vs KV bits per scheme with each row's bootstrap 95% interval; the PyTorch reference and the
    int4 fp16-KV row as distinct horizontal lines (``kvtool.evals.plots.accuracy_vs_bits_figure``)."""
    from kvtool.evals import plots as P

    pts = []
    for r in rows:
        ref = r["kv"] == "fp16"
        ci = r.get("accuracy_ci95")
        name = ("PyTorch fp32 (reference)" if _is_reference(r) else f"{r['backend']} int{r['wbits']}, fp16 KV"
                ) if ref else r["kv"]
        pts.append({"task": "shapes", "series": name, "reference": ref,
                    "bits": 16.0 if ref else (r["k_bits"] + r["v_bits"]) / 2, "value": 100 * r["accuracy"],
                    "ci95": None if ci is None else [100 * c for c in ci]})
    n = rows[0]["n"]
    return P.accuracy_vs_bits_figure(pts, ["shapes"], {"shapes": f"shapes test, n={n} questions per row"},
                                     title="kvtool demo: kvtool-shapes, OpenVINO int4 weights")


def demo_tradeoff_figure(rows: list[dict[str, Any]]):
    """Accuracy change vs the PyTorch reference (paired bootstrap 95% interval, percentage points) against KV
    bytes held per token relative to fp16, one point per scheme x bits, Pareto front drawn
    (``kvtool.evals.plots.tradeoff_figure``)."""
    from kvtool.evals import plots as P

    pts = []
    for r in rows:
        if _is_reference(r):
            continue
        ci = r.get("accuracy_delta_ci95")
        pts.append({"scheme": "fp16" if r["kv"] == "fp16" else r["kv"],
                    "bits": r["k_bits"] if r["k_bits"] == r["v_bits"] else f"K{r['k_bits']}V{r['v_bits']}",
                    "kv_ratio": r.get("kv_ratio"), "kv_ratio_source": r.get("kv_ratio_source", "measured"),
                    "delta": 100 * r["accuracy_delta"],
                    "ci95": None if ci is None else [100 * c for c in ci]})
    n = rows[0]["n"]
    return P.tradeoff_figure([{"task": "shapes", "title": f"shapes accuracy vs KV memory (int4 weights, n={n})",
                               "reference": "PyTorch fp32", "points": pts}], title="kvtool demo: kvtool-shapes")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Export (cached), evaluate every planned row, compare with the reference; write JSON, table and plot."""
    from tqdm import tqdm

    from kvtool.evals.compare import compare_runs
    from kvtool.evals.report import headline_ci
    from kvtool.evals.runner import EvalConfig, run_eval
    from kvtool.models.bundled import SHAPES_MODEL_DIR

    model_dir = Path(cfg.model) if cfg.model else SHAPES_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise InputError(f"demo model {model_dir}: expected an HF checkpoint directory with config.json")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = ensure_export(model_dir, _cache_root(cfg), progress=cfg.progress)
    rows: list[dict[str, Any]] = []
    ref_dir = None
    bar = tqdm(cfg.plan, desc="demo rows", unit="row", disable=not cfg.progress)
    for plan in bar:
        bar.set_postfix_str(plan["name"])
        run_dir = out / "runs" / plan["name"]
        ecfg = EvalConfig(model=str(model_dir if plan["backend"] == "torch" else export_dir), tasks=["shapes"],
                          output=str(run_dir), backend=plan["backend"], device=cfg.device, kv=plan["kv"],
                          k_bits=None if plan["kv"] == "fp16" else plan["k_bits"],
                          v_bits=None if plan["kv"] == "fp16" else plan["v_bits"],
                          wbits=plan["wbits"], limit=cfg.n, progress=cfg.progress)
        results = run_eval(ecfg)
        cmp = None if ref_dir is None else compare_runs(ref_dir, run_dir, tasks=["shapes"], n_boot=cfg.n_boot)
        if ref_dir is None:
            ref_dir = run_dir
        rows.append(_row_record(plan, results, cmp, headline_ci(run_dir, "shapes", cfg.n_boot)))
    table = format_table(rows)
    plot = plot_demo(rows, out / "demo.png")
    tradeoff = plot_demo_tradeoff(rows, out / "demo_tradeoff.png")
    cfg_json = {k: v for k, v in asdict(cfg).items() if k != "plan"}
    result = {"rows": rows, "config": cfg_json, "model": str(model_dir), "export": str(export_dir),
              "plot": str(plot), "plots": [str(plot), str(tradeoff)], "table": table}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
