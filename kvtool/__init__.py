"""kvtool: export LLaVA-family vision-language models to OpenVINO / ONNX with compressed weights, run them
with a group-wise quantized KV cache held outside the graph, and measure what each compression changes.

Subpackages (layers and contracts: docs/ARCHITECTURE.md): ``quant_ops`` (KV quantizers), ``manifest`` (the
export directory's ``kvtool.json``), ``export`` (graphs), ``runtime`` (engines + generate loop), ``evals`` (tasks,
metrics, runner, reports), ``devices`` (device discovery), ``models`` (offline model factory and the bundled demo
model). Importing ``kvtool`` imports nothing heavy.
"""

__version__ = "0.1.0"
