"""kvtool.models: checkpoints without a hub.

``make_tiny_model`` builds tiny random LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL checkpoints offline (``tiny.py``).
Heavy libraries are imported only when a model is built.
"""

from kvtool.models.tiny import TINY_MODELS, TinySize, make_tiny_model, tiny_size

__all__ = ["TINY_MODELS", "TinySize", "make_tiny_model", "tiny_size"]
