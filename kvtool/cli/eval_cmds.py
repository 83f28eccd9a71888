"""``kvtool eval``: ``eval run`` (the default: ``kvtool eval MODEL --tasks ...``), ``eval merge`` (join a sharded
run's shards) and ``eval rescore`` (score saved predictions again, e.g. with a judge), plus the one-line-per-task
summary they print. The options' text is parsed by ``kvtool.evals.options``, the KV options by
``kv_options``; the work is ``kvtool.evals.runner``'s. ``--merge`` / ``--rescore`` on ``eval run`` are
deprecated aliases of the subcommands (one line on stderr says so)."""

from __future__ import annotations

import functools
import sys

import click

from kvtool.cli.base import (
    DefaultCommandGroup,
    echo_json,
    main,
    model_argument,
    progress_option,
    quiet_loading,
    verbose_option,
)
from kvtool.cli.kv_options import conversation_option, kv_fields, kv_options
from kvtool.cli.run_cmds import backend_option, device_option
from kvtool.errors import InputError

JUDGE_PARAMS = ("judge_url", "judge_model", "judge_key", "mmvet_runs", "toxicity_model", "toxicity_url",
                "competence_words", "stereotype_words")


def judge_options(f):
    """The judge / scorer options of ``eval run``, ``merge`` and ``rescore``; the command receives them as one
    ``judge`` (``kvtool.evals.judges.JudgeConfig.from_env``: unset options come from the environment)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from kvtool.evals.judges import JudgeConfig

        opts = {name: kwargs.pop(name) for name in JUDGE_PARAMS}
        kwargs["judge"] = JudgeConfig.from_env(url=opts["judge_url"], model=opts["judge_model"],
                                               key=opts["judge_key"], **{k: opts[k] for k in JUDGE_PARAMS[3:]})
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--judge-url", default=None, help="OpenAI-compatible base URL (env KVTOOL_JUDGE_URL) for the "
                     "MM-Vet grader and HallusionBench judge."),
        click.option("--judge-model", default=None, help="Judge model name (env KVTOOL_JUDGE_MODEL)."),
        click.option("--judge-key", default=None, help="Judge API key (env KVTOOL_JUDGE_KEY / OPENAI_API_KEY)."),
        click.option("--mmvet-runs", default=1, show_default=True, type=int,
                     help="MM-Vet grading runs to average (the study used 5)."),
        click.option("--toxicity-model", default=None, help="Local text-classification checkpoint for toxicity."),
        click.option("--toxicity-url", default=None, help="HTTP toxicity scorer: POST {texts} -> {scores}."),
        click.option("--competence-words", default=None, help="Competence word list (one per line)."),
        click.option("--stereotype-words", default=None, help="Stereotype words, JSON {group: [words]}."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def _print_results(results: dict) -> None:
    """One line per task: its headline metric on the task's own scale, and the sample count. The other
    metrics (on their official scales, some 0-1, some 0-100) are in results.json / ``--json``, not mixed in."""
    from kvtool.evals.tasks import flatten_metrics, get_task, headline_value

    for task, rec in results.get("tasks", {}).items():
        m = rec.get("metrics", {})
        spec = get_task(task)
        head, val = spec.headline, headline_value(spec, m)
        shown = "missing" if val is None else f"{val:.2f}"
        flat = flatten_metrics(m, keep_missing=True)
        beside = "".join(f" {k}={'–' if flat.get(k) is None else format(flat[k], '.2f')}" for k in spec.beside)
        click.echo(f"{task:<15} {head}={shown:<10}{beside} n={rec.get('n_samples', m.get('n'))}")
    if results.get("tasks"):
        shard = (results.get("config") or {}).get("shard")
        if isinstance(shard, str):
            shard = shard.split("/")
        where = f"results.shard-{shard[0]}-of-{shard[1]}.json" if shard else "results.json"
        click.echo(f"(every metric: {where} in the run directory, or --json)")


def _print_failures(results: dict) -> None:
    """One line per task with failed rows: how many, and why."""
    for task, rec in results.get("tasks", {}).items():
        failed = rec.get("failed") or {}
        if failed.get("n"):
            why = "; ".join(f"{n['n']}x {reason}" for reason, n in list(failed["reasons"].items())[:3])
            click.echo(f"{task}: {failed['n']} of {rec.get('n_samples')} rows failed, counted as wrong ({why})",
                       err=True)


def _show(results: dict, as_json: bool) -> None:
    if as_json:
        echo_json(results)
    else:
        _print_results(results)
        _print_failures(results)


def _deprecated(old: str, new: str) -> None:
    click.echo(f"warning: kvtool eval {old} is deprecated; use kvtool eval {new}", err=True)


@main.group(name="eval", cls=DefaultCommandGroup, default="run")
def eval_group() -> None:
    """Evaluate a model on the study's benchmarks (`eval run`, the default: `kvtool eval MODEL --tasks ...`),
    join a sharded run (`eval merge RUN_DIR`), or score saved predictions again (`eval rescore RUN_DIR`)."""


@eval_group.command(name="run")
@model_argument("model_or_dir", required=False)
@click.option("--tasks", "tasks", default=None, help="Comma-separated tasks (kvtool ls tasks).")
@click.option("-o", "--output", default=None, help="Run directory (results.json, <task>/predictions.jsonl).")
@backend_option(choices=False)
@device_option
@kv_options()
@conversation_option
@click.option("--wbits", type=int, default=None, help="Weight-bits label for reports (else from the manifest).")
@click.option("--limit", type=int, default=None, help="At most N dataset rows per task.")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip the first N rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of greedy tasks.")
@click.option("--seeds", default=None, help="Seeds of sampled tasks (PAIRS, SocialCF), e.g. 0,1,2.")
@click.option("--shard", default=None, help="i/n: run the i-th of n interleaved shards.")
@click.option("--data", "data", multiple=True, help="TASK=PATH_OR_HUB_ID (repeatable).")
@click.option("--data-dir", default=None, help="Folder holding <task>/ local copies in the hub format.")
@click.option("--max-new-tokens", type=int, default=None, help="Override every task's default.")
@click.option("--retry-failed", is_flag=True, help="Generate again the failed rows (unreadable image, processor "
              "error, prompt too long) a resumed run would otherwise keep.")
@click.option("--merge", is_flag=True, hidden=True, help="Deprecated: kvtool eval merge RUN_DIR.")
@click.option("--rescore", default=None, hidden=True, help="Deprecated: kvtool eval rescore RUN_DIR.")
@judge_options
@progress_option
@verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def eval_run(model_or_dir, tasks, output, kv_spec, data, seeds, shard, merge, rescore, judge, no_progress, verbose,
             as_json, **opts) -> None:
    """Evaluate MODEL_OR_DIR (an export dir, an HF checkpoint dir, or a bundled model's name) on the study's
    benchmarks; resumable (re-run the same command to continue).

    The run directory records the settings that produced it; a re-run under other settings (model, --kv,
    bits, ...) is refused (--limit, --offset and --shard may change). --limit takes a balanced sample across a
    task's strata (POPE category, MME category, ...). A sample that fails is saved as a failed row and the run
    goes on; resumed runs keep failed rows unless --retry-failed."""
    from kvtool.evals.options import parse_data, parse_seeds, parse_tasks
    from kvtool.evals.runner import EvalConfig, EvalInterrupted, merge_shards, parse_shard, run_eval
    from kvtool.evals.runner import rescore as rescore_run

    if rescore:
        _deprecated("--rescore RUN_DIR", "rescore RUN_DIR")
        return _show(rescore_run(rescore, judge, parse_tasks(tasks) if tasks else None), as_json)
    if merge:
        _deprecated("--merge -o RUN_DIR", "merge RUN_DIR")
        if not output:
            raise InputError("--merge: give the run directory with -o")
        return _show(merge_shards(output, judge), as_json)
    if not model_or_dir:
        raise InputError("MODEL_OR_DIR: missing; expected an exported dir, an HF checkpoint dir or a bundled "
                         "model's name (kvtool ls models)")
    task_list = parse_tasks(tasks)
    if not output:
        raise InputError("-o/--output: missing; expected a run directory such as runs/NAME")
    cfg = EvalConfig(model=model_or_dir, tasks=task_list, output=output, **kv_fields(kv_spec), **opts,
                     shard=parse_shard(shard), data=parse_data(data), seeds=parse_seeds(seeds), judge=judge,
                     progress=not no_progress)
    try:
        with quiet_loading(verbose, datasets=True):
            results = run_eval(cfg)
    except EvalInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    _show(results, as_json)


@eval_group.command(name="merge")
@click.argument("run_dir")
@judge_options
@click.option("--json", "as_json", is_flag=True, help="Print the merged results.json to stdout.")
def eval_merge(run_dir, judge, as_json) -> None:
    """Join the shards in RUN_DIR (runs made with --shard i/n and the same -o) into predictions.jsonl and
    results.json, and score them."""
    from kvtool.evals.runner import merge_shards

    _show(merge_shards(run_dir, judge), as_json)


@eval_group.command(name="rescore")
@click.argument("run_dir")
@click.option("--tasks", "tasks", default=None, help="Comma-separated subset of the run's tasks.")
@judge_options
@click.option("--json", "as_json", is_flag=True, help="Print the re-scored results.json to stdout.")
def eval_rescore(run_dir, tasks, judge, as_json) -> None:
    """Score the saved predictions of RUN_DIR again without generating (e.g. with a judge now reachable);
    results.json is rewritten."""
    from kvtool.evals.options import parse_tasks
    from kvtool.evals.runner import rescore

    _show(rescore(run_dir, judge, parse_tasks(tasks) if tasks else None), as_json)
