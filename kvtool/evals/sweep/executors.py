"""Running a sweep's units: the unit itself (``run_unit``), the local executor and the Ray executor.

A unit is one call of the resumable eval runner (``run_eval`` with ``shard=(i, n)``) writing into
``<out>/cells/<cell>/units/<task>/``; a retried or re-run unit therefore continues its rows, never losing or
duplicating one. Executors take a list of unit arguments (plain dicts, recorded in ``units.jsonl`` — they hold
no secret) and call ``on_done(result)`` on the driver as each unit ends, so one progress bar follows them.

- ``run_local``: units one after another in this process, or in a process pool (``workers > 1``, spawned
  processes: each loads its own model). It never imports ``ray``.
- ``run_ray``: each unit is a Ray task with its resources (``num_cpus``; ``num_gpus`` for torch-reference
  units when the grid asks, so they land on GPU nodes), retried when its worker dies (``max_retries``).

Secrets: the judge's API key (``KVTOOL_JUDGE_KEY`` / ``OPENAI_API_KEY`` in the driver's environment) reaches
local units through the inherited environment. On Ray it goes through the task's runtime env, but Ray logs a
runtime env's ``env_vars`` verbatim in ``runtime_env_agent.log`` (ray-project/ray#28276), so the key is split
into two one-time-pad shares: one in ``env_vars``, the other as the task's in-memory argument; the worker joins
them into its process environment for the unit's duration. Neither share alone tells anything about the key.
This module does not expand grids or merge results (``grid`` / ``study``).
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from kvtool.errors import InputError

SECRET_ENV = ("KVTOOL_JUDGE_KEY", "OPENAI_API_KEY")
PUBLIC_ENV = ("KVTOOL_JUDGE_URL", "KVTOOL_JUDGE_MODEL")
SHARE_PREFIX = "KVTOOL_SECRET_SHARE_"


def run_unit(args: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one unit; ``args`` as built by ``kvtool.evals.sweep.driver.unit_args``. Returns a small
    record: unit key, rows in the shard, rows generated now, generation seconds, worker host and pid."""
    from kvtool.evals.judges import JudgeConfig
    from kvtool.evals.runner import EvalConfig, run_eval

    t0 = time.perf_counter()
    quant = args["kv"] != "fp16"
    cfg = EvalConfig(model=args["path"], tasks=[args["task"]], output=args["output"], backend=args["backend"],
                     device=args["device"], kv=args["kv"], k_bits=args["k_bits"] if quant else None,
                     v_bits=args["v_bits"] if quant else None, kv_mode=args["kv_mode"],
                     first_token=args["first_token"], conversation=args["conversation"], wbits=args["wbits"],
                     limit=args["limits"].get(args["task"], args["limit"]), offset=args["offset"], seed=args["seed"],
                     shard=(args["shard"], args["n_shards"]), data=dict(args["data"]), data_dir=args["data_dir"],
                     max_new_tokens=args["max_new_tokens"], seeds=args["seeds"],
                     judge=JudgeConfig.from_env(**args["judge"]), progress=False)
    try:
        res = run_eval(cfg)
    except InputError:
        res = _empty_shard(cfg, args)
        if res is None:
            raise
    rec = res["tasks"][args["task"]]
    return {"unit": args["unit"], "n_samples": rec["n_samples"], "n_generated_now": rec["n_generated_now"],
            "generate_s": rec["timing"]["generate_s"], "wall_s": time.perf_counter() - t0,
            "host": socket.gethostname(), "pid": os.getpid()}


def _empty_shard(cfg, args: dict[str, Any]) -> dict[str, Any] | None:
    """A shard the data leaves empty (fewer rows than shards) is finished, not failed: the runner refuses to
    score no rows, so its results file is written here with ``n_samples`` 0 for ``merge_shards``."""
    from pathlib import Path

    from kvtool.evals.runner import read_predictions
    from kvtool.evals.sweep.driver import write_json

    out = Path(args["output"])
    name = f"shard-{args['shard']}-of-{args['n_shards']}"
    if read_predictions(out / args["task"] / f"predictions.{name}.jsonl"):
        return None
    res = {"config": cfg.to_json(), "pipeline": None, "empty_shard": True,
           "tasks": {args["task"]: {"n_samples": 0, "n_generated_now": 0, "timing": {"generate_s": 0.0},
                                    "metrics": {}, "predictions": f"{args['task']}/predictions.{name}.jsonl"}}}
    write_json(out / f"results.{name}.json", res)
    return res


def run_local(units: list[dict[str, Any]], on_done: Callable[[dict[str, Any]], None], workers: int = 1) -> None:
    """Run ``units`` here: in this process (``workers == 1``) or a pool of ``workers`` spawned processes.
    A unit that raises is reported to ``on_done`` as ``{"unit": key, "error": "..."}``; the others go on."""
    if workers <= 1:
        for u in units:
            try:
                on_done(run_unit(u))
            except Exception as exc:  # noqa: BLE001 - recorded and reported as a failed unit
                on_done({"unit": u["unit"], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_unit, u): u["unit"] for u in units}
        for f in as_completed(futures):
            exc = f.exception()
            on_done(f.result() if exc is None else
                    {"unit": futures[f], "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"})


def split_secrets(environ: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``(env_vars, arg_shares)``: the non-secret judge settings and one one-time-pad share of each secret
    for a Ray runtime env, and the other shares for the task arguments (all base64). Joined by
    ``join_secrets``."""
    env = os.environ if environ is None else environ
    env_vars = {k: env[k] for k in PUBLIC_ENV if env.get(k)}
    args: dict[str, str] = {}
    for name in SECRET_ENV:
        if env.get(name):
            key = env[name].encode()
            pad = secrets.token_bytes(len(key))
            env_vars[SHARE_PREFIX + name] = base64.b64encode(pad).decode()
            args[name] = base64.b64encode(bytes(a ^ b for a, b in zip(key, pad, strict=True))).decode()
    return env_vars, args


def join_secrets(arg_shares: dict[str, str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The secrets from the argument shares and the environment's shares (``split_secrets``' inverse)."""
    env = os.environ if environ is None else environ
    out = {}
    for name, share in arg_shares.items():
        pad = env.get(SHARE_PREFIX + name)
        if pad is None:
            raise RuntimeError(f"{SHARE_PREFIX}{name} missing from the worker's environment (runtime env)")
        a, b = base64.b64decode(share), base64.b64decode(pad)
        out[name] = bytes(x ^ y for x, y in zip(a, b, strict=True)).decode()
    return out


def ray_unit(args: dict[str, Any], arg_shares: dict[str, str]) -> dict[str, Any]:
    """The Ray task: join the secret shares into this worker's environment, run the unit, restore."""
    joined = join_secrets(arg_shares)
    saved = {k: os.environ.get(k) for k in joined}
    os.environ.update(joined)
    try:
        return run_unit(args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ray(units: list[dict[str, Any]], on_done: Callable[[dict[str, Any]], None], address: str | None = None,
            workers: int | None = None, max_retries: int = 3) -> None:
    """Run ``units`` as Ray tasks. Joins the running Ray session if this process has one; else connects to
    ``address`` (``auto``, ``ray://host:10001``, ...) or, with no address, starts a local Ray instance
    (``workers`` CPUs) and shuts it down at the end. Each unit asks for ``args["cpus"]`` CPUs and
    ``args["gpus"]`` GPUs; a unit whose worker dies is retried up to ``max_retries`` times."""
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise InputError(f"--address {address}: no Ray cluster reachable there ({msg})") from None
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            started = True
    try:
        env_vars, shares = split_secrets()
        task = ray.remote(ray_unit)
        pending = {}
        for u in units:
            ref = task.options(num_cpus=u["cpus"], num_gpus=u["gpus"], max_retries=max_retries,
                               retry_exceptions=False, runtime_env={"env_vars": env_vars}).remote(u, shares)
            pending[ref] = u["unit"]
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    on_done(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a failed unit is recorded, the others go on
                    msg = str(exc).strip().splitlines()
                    on_done({"unit": key, "error": f"{type(exc).__name__}: {msg[-1] if msg else ''}"})
    finally:
        if started:
            ray.shutdown()
