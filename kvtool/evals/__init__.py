"""kvtool.evals: the study's ten benchmarks (and the synthetic ``shapes``) with their official metrics, a
resumable runner, parity comparison and Table-3 reports.

Modules: ``metrics`` (official metric definitions), ``tasks`` (the registry, one ``TaskSpec`` per benchmark),
``loaders`` (hub ids / local copies, or a task's own ``load`` hook), ``pairs`` (PAIRS' folders and questions), ``judges`` (OpenAI-compatible grader, toxicity scorer,
lexicons), ``runner`` (``run_eval``, ``merge_shards``, ``rescore``), ``compare`` (``compare_runs``,
``bootstrap_ci``), ``report`` (``write_report``), ``shapes`` (the synthetic dataset generator).
The package talks to models only through a ``generate`` interface (``kvtool.runtime.VLMPipeline`` by
default); it never imports openvino or onnxruntime.

Python use::

    from kvtool.evals import EvalConfig, run_eval, compare_runs
    res = run_eval(EvalConfig(model="exports/llava", tasks=["pope"], output="runs/kv2", kv="g-KC128VT128",
                              k_bits=2, v_bits=2, limit=100))
    cmp = compare_runs("runs/fp16", "runs/kv2")
"""

from kvtool.evals.compare import bootstrap_ci, compare_runs, compare_task
from kvtool.evals.judges import JudgeConfig
from kvtool.evals.report import write_report
from kvtool.evals.runner import EvalConfig, merge_shards, rescore, run_eval
from kvtool.evals.tasks import TASKS, TaskSpec, get_task

__all__ = ["EvalConfig", "JudgeConfig", "TASKS", "TaskSpec", "bootstrap_ci", "compare_runs", "compare_task",
           "get_task", "merge_shards", "rescore", "run_eval", "write_report"]
