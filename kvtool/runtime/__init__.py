"""kvtool.runtime: load an exported model (or the HF reference) and generate with the KV cache held outside
the graph, stored compressed by ``kvtool.quant_ops``. See ``pipeline.VLMPipeline``."""

from kvtool.runtime.pipeline import GenerateOutput, VLMPipeline

__all__ = ["GenerateOutput", "VLMPipeline"]
