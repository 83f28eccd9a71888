"""The study commands over run directories: ``compare``, ``report``, ``sweep``, ``submission``, ``ls tasks``,
and ``demo``. Each builds its library config, calls one function of ``kvtool.evals`` / ``kvtool.demo`` and
prints the result."""

from __future__ import annotations

import sys

import click

from kvtool.cli.base import echo_json, ls_group, main, progress_option, quiet_loading, verbose_option
from kvtool.errors import InputError


@main.command(name="compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--tasks", default=None, help="Comma-separated subset of the common tasks.")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(run_a, run_b, tasks, n_boot, seed, as_json) -> None:
    """Parity of RUN_B against reference RUN_A: metric deltas with bootstrap 95% CI, agreement, flips."""
    from kvtool.evals.compare import compare_runs, format_comparison

    cmp = compare_runs(run_a, run_b, tasks.split(",") if tasks else None, n_boot=n_boot, seed=seed)
    if as_json:
        echo_json(cmp)
    else:
        click.echo(format_comparison(cmp))


@main.command(name="report")
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", default="report", show_default=True, help="Output folder.")
@click.option("--reference", default=None,
              help="Run (one of RUNS) the trade-off plot compares against; default: per model its fp16-KV run "
                   "with the most weight bits, PyTorch first.")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap resamples of the 95% intervals (0: none).")
@click.option("--json", "as_json", is_flag=True)
def report_cmd(runs, output, reference, n_boot, as_json) -> None:
    """Table-3-shaped Markdown/CSV table and PNG plots over RUNS (run directories): headline vs KV bits, and
    the accuracy change vs KV bytes per token with its Pareto front (tradeoff.png)."""
    from kvtool.evals.report import write_report

    if n_boot < 0:
        raise InputError(f"--n-boot {n_boot}: expected 0 or a positive number of resamples")
    rep = write_report(list(runs), output, reference=reference, n_boot=n_boot)
    if as_json:
        echo_json(rep)
    else:
        click.echo((open(rep["markdown"], encoding="utf-8").read()).rstrip())
        click.echo(f"\nwrote {rep['markdown']}, {rep['csv']}, " + ", ".join(rep["plots"]))


@main.command(name="sweep")
@click.argument("grid")
@click.option("-o", "--output", required=True, help="Sweep folder (cells/, compare/, report/, sweep.json).")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: no server needed; ray: each unit a Ray task.")
@click.option("--address", default=None, help="Ray cluster: auto | ray://host:10001 (default: a local Ray).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="local: process pool size (1 = units one after another here); ray: CPUs of a local Ray.")
@click.option("--max-retries", default=3, show_default=True, type=int, help="Ray: retries of a unit whose worker died.")
@click.option("--dry-run", is_flag=True, help="Show units, samples and a time estimate; run nothing.")
@click.option("--rates-from", multiple=True, help="Earlier run/sweep folders to measure rows/s from (dry run).")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap resamples of compare.")
@progress_option
@verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sweep_cmd(grid, output, executor, address, workers, max_retries, dry_run, rates_from, n_boot, no_progress,
              verbose, as_json) -> None:
    """Run the grid in GRID (TOML: models, weights, KV schemes x bits, tasks, reference) into -o: every unit
    (cell x task x shard) once, resumable, then compare every cell with the reference and write the
    study-shaped report. The judge's API key comes from the environment (KVTOOL_JUDGE_KEY), never the grid."""
    from kvtool.evals.sweep import SweepConfig, format_plan, run_sweep

    if executor == "ray" and not dry_run:  # before any unit's progress bar: a missing extra is one clean line
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
    from kvtool.models.bundled import BUNDLED_MODELS

    cfg = SweepConfig(grid=grid, output=output, executor=executor, address=address, workers=workers,
                      max_retries=max_retries, dry_run=dry_run, rates_from=list(rates_from), n_boot=n_boot,
                      progress=not no_progress,
                      model_names={n: str(d) for n, (d, _) in BUNDLED_MODELS.items()})  # `kvtool ls models`
    with quiet_loading(verbose or dry_run, datasets=True):  # a dry run loads nothing
        result = run_sweep(cfg)
    if as_json:
        echo_json(result)
    else:
        click.echo(format_plan(result["plan"]))
        if not dry_run:
            st = result["study"]
            click.echo(f"ran {result['units_run']} units in {result['run_wall_s']:.1f} s; cells done "
                       f"{len(st['cells_done'])}/{len(st['cells_done']) + len(st['cells_missing'])}")
            if st.get("study"):
                click.echo(f"report: {st['study']}, {st['report']['markdown']}")
    if not dry_run and result["failed"]:
        for f in result["failed"]:
            click.echo(f"error: unit {f['unit']}: {f['error']}", err=True)
        sys.exit(1)


@ls_group.command(name="tasks")
@click.option("--json", "as_json", is_flag=True)
def ls_tasks(as_json) -> None:
    """List the eval tasks: data source, metric, the number each reports and its generation length (with source)."""
    from kvtool.evals.tasks import TASKS

    rows = [{"task": t.name, "data": t.source, "hub_ids": list(t.hub_ids), "metric": t.metric,
             "headline": t.headline, "beside": list(t.beside), "reports": t.reports, "judges": list(t.judges),
             "generation": t.generation(), "generation_source": t.generation_source, "notes": t.notes}
            for t in TASKS.values()]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['task']:<15} {r['data']}\n{'':<15} metric: {r['metric']}\n{'':<15} reports: {r['reports']}\n"
                   f"{'':<15} max new tokens: {r['generation']['max_new_tokens']}; source: {r['generation_source']}")


@main.command(name="submission")
@click.argument("run_dir")
@click.option("-o", "--output", required=True, help="The JSON file to upload (to EvalAI's test-dev phase).")
@click.option("--task", default="vqav2_testdev", show_default=True, help="The run's task to export.")
@click.option("--question-ids", default=None,
              help="Every question of the test set (VQA's test2015 questions JSON or LLaVA's test2015 JSONL): "
                   "listed questions without a prediction get \"\", as LLaVA's converter writes.")
@click.option("--json", "as_json", is_flag=True)
def submission_cmd(run_dir, output, task, question_ids, as_json) -> None:
    """Write the EvalAI upload file of RUN_DIR's VQAv2 test-dev predictions (LLaVA's converter's format)."""
    from kvtool.evals.submission import write_submission

    info = write_submission(run_dir, output, task=task, question_ids=question_ids)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {info['path']}: {info['n_answers']} answers ({info['n_predicted']} predicted, "
                   f"{info['n_blank']} blank)")


@main.command(name="demo")
@click.option("--out", "-o", "out_dir", default="kvtool-demo", show_default=True, help="Directory for runs, JSON and plot.")
@click.option("--cache-dir", default=None, help="Export cache (default $KVTOOL_CACHE or ~/.cache/kvtool).")
@click.option("--n", "n", type=int, default=300, show_default=True, help="shapes test questions per row.")
@click.option("--quick", is_flag=True, help="Fewer questions (60), for CI.")
@click.option("--schemes", default=",".join(("uniform", "or2", "g-CN", "g-T128", "g-KCNVT128", "g-KC128VT128")),
              show_default=True, help="Comma-separated KV schemes.")
@click.option("--bits", default="4,2", show_default=True, help="Comma-separated KV bit widths (K = V).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the {'rows': [...]} JSON here ('-': stdout).")
@progress_option
@verbose_option
def demo_cmd(out_dir, cache_dir, n, quick, schemes, bits, device, json_path, no_progress, verbose) -> None:
    """Export the bundled kvtool-shapes model with int4 weights to OpenVINO and evaluate it on the shapes
    benchmark: PyTorch fp32 reference, fp16 KV, and the study's KV schemes at each bit width (Table 3 shape)."""
    from kvtool.demo import DemoConfig, run_demo

    try:
        bit_list = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise InputError(f"--bits {bits!r}: expected comma-separated integers such as 4,2") from None
    cfg = DemoConfig(out_dir=out_dir, cache_dir=cache_dir, n=n, quick=quick, device=device, bits=bit_list,
                     schemes=tuple(s.strip() for s in schemes.split(",") if s.strip()), progress=not no_progress)
    with quiet_loading(verbose, datasets=True):
        result = run_demo(cfg)
    if json_path == "-":
        echo_json({"rows": result["rows"]})
        return
    click.echo(result["table"])
    click.echo(f"\nplots: {', '.join(result['plots'])}   json: {out_dir}/demo.json")
    if json_path:
        echo_json({"rows": result["rows"], "config": result["config"]}, json_path)
