"""The engine contract: what ``kvtool.runtime.pipeline.VLMPipeline`` (and ``bench/decode.py``) call on an engine.

An engine runs one model — an export's graphs or the HF checkpoint — for the generate loop, and holds the KV
cache between calls; sampling, stopping and text decoding stay in the pipeline. ``Engine`` is a
``typing.Protocol`` (``runtime_checkable``: ``isinstance`` checks that every member is present, not their
types); the engine classes do not inherit from it. Which class runs a given load is
``kvtool.runtime.engines``' registry. This module defines no behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from kvtool.runtime.preprocess import PreparedInputs


@runtime_checkable
class Engine(Protocol):
    """One loaded model answering the generate loop's calls, batch 1 (one sequence at a time).

    The loop is: ``start(prepared)``; ``run_prompt`` over the prompt (once ``[0, T)``, or ``[0, T-1)`` then
    ``[T-1, T)`` when the first token must see the compressed cache, DESIGN.md); ``run_token`` per generated
    token; ``kv_nbytes`` / ``kv_work_nbytes`` / ``kv_dtype_name`` / ``info`` for the run's statistics."""

    backend: str
    """The runtime library: ``"openvino"``, ``"onnxruntime"`` or ``"torch"`` (results files record it)."""
    device: str
    """The concrete device it runs on: an OpenVINO device (``CPU``, ``GPU.0``), an ONNX Runtime execution
    provider, or a torch device (``cpu``, ``cuda:0``)."""
    num_layers: int
    """Language-model layers (each holds one K and one V cache)."""
    num_kv_heads: int
    """KV heads per layer (H of the ``[1, H, N, D]`` cache)."""
    head_dim: int
    """Elements per head (D of the ``[1, H, N, D]`` cache)."""

    def start(self, prepared: PreparedInputs, max_new_tokens: int = 64) -> None:
        """Begin a sequence: empty the KV cache (sized for ``prepared.n_tokens + max_new_tokens`` tokens where
        the engine preallocates) and take the prompt's ids and vision inputs (``PreparedInputs``: ``input_ids``
        int64 ``[1, T]``, ``vision`` numpy arrays). Raises ``InputError`` when the image tokens and the vision
        features disagree."""
        ...

    def set_quantize(self, enabled: bool) -> None:
        """``first_token="fp"``: with ``False`` the next ``run_prompt`` stores the prompt without quantizing
        it inside the call (the torch engine's simulate cache); ``True`` restores it. Engines whose cache
        quantizes between calls only ignore it."""
        ...

    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """Run prompt positions ``[start, end)`` (0 <= start < end <= T, calls in order, contiguous) against the
        cache, append their K/V, and return the last position's logits: float32 numpy ``[V]``."""
        ...

    def run_token(self, token_id: int) -> np.ndarray:
        """Run one generated token (vocabulary id) at the next position, append its K/V, and return its
        logits: float32 numpy ``[V]``."""
        ...

    def kv_nbytes(self) -> tuple[int, int]:
        """``(bytes the KV cache holds now, bytes the same tokens take in fp16)``: codes, group parameters and
        exact (residual) tokens for a quantizing scheme; OpenVINO's own u8/u4 layout for ``ov-*``."""
        ...

    def kv_work_nbytes(self) -> int:
        """Bytes of KV memory kvtool holds besides what ``kv_nbytes`` counts: the dequantized working copy the
        graph reads its past from (caller-owned blocks, state buffers) and, in simulate mode (where
        ``kv_nbytes`` is what packed storage would hold), the dense re-quantized cache itself; 0 where there is
        none. An engine may say what it counts in one sentence with an optional ``kv_work_what()`` (shown by
        ``kvtool run --json`` as ``pipeline.engine.kv_work``)."""
        ...

    def kv_dtype_name(self) -> str:
        """The element type the cache's unquantized values are held in, as a numpy-style name (``float16``,
        ``float32``, ``bfloat16``; ``u8`` / ``u4`` for OpenVINO's own compression)."""
        ...

    def info(self) -> dict[str, Any]:
        """A JSON-serialisable description of the engine's settings (compile config, KV owner, dtypes, counters
        such as state or token writes), for results files."""
        ...

