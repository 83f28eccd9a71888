"""The packed engine's attention as a Python ``openvino.Op`` (the route where the C++ extension op of
``ov_packed_ext`` is not built, fails to load, or ``KVTOOL_NO_OV_EXTENSION=1``).

``PackedKVAttention(q, k_new, v_new[, sdpa_out])`` evaluates ``openvino_packed._evaluate`` (the op's semantics,
documented there) on the host for every call: f32 inputs are passed as numpy views, bf16 ones (raw uint16 bits
in OpenVINO's numpy view) widened to f32, and the output written back in the output's element type. Each call
costs ~1 ms of CPU on top of the attention: the CPU plugin re-clones a Python op on every inference.

Does not: insert the op into a graph (``openvino_packed._packed_lm``), choose the route (``ov_packed_ext.route``).
"""

from __future__ import annotations

import functools

import numpy as np

from kvtool.runtime.engines.openvino_engine import bf16_bits_to_f32, f32_to_bf16_bits


def _is_bf16(t) -> bool:
    import openvino as ov

    return t.get_element_type() == ov.Type.bf16


def _as_np(t, bf16: bool) -> np.ndarray:
    """An ``ov.Tensor`` as a numpy view (bf16 — raw uint16 bits in OpenVINO's numpy view — widened to f32)."""
    a = t.data
    return bf16_bits_to_f32(a.view(np.uint16)) if bf16 else a



@functools.lru_cache(maxsize=1)
def op_class():
    """``PackedKVAttention``, an ``openvino.Op`` (defined on first use: openvino is imported lazily)."""
    import openvino as ov

    from kvtool.runtime.engines.openvino_packed import _evaluate

    class PackedKVAttention(ov.Op):
        """(q [1, Hq, T, D], k_new / v_new [1, H, T, D][, sdpa_out [1, Hq, T, D]]) -> [1, Hq, T, D] of sdpa_out's
        element type, or of q's where there is no sdpa_out (the graph's SDPA removed, ``packed_prefix``)."""

        def __init__(self, inputs=None, layer=None, validate: bool = True):
            super().__init__(self, inputs)
            self.layer = layer
            if inputs and validate:
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self):
            src = 3 if self.get_input_size() > 3 else 0  # the SDPA's output, or q (same shape: Dv = D)
            self.set_output_type(0, self.get_input_element_type(src), self.get_input_partial_shape(src))

        def clone_with_new_inputs(self, new_inputs):
            # the CPU plugin clones the op for its shape inference on every inference and validates the clone
            # itself: skipping the constructor's validation halves the Python calls of each clone
            return PackedKVAttention(new_inputs, self.layer, validate=False)

        def visit_attributes(self, visitor):
            return True

        def has_evaluate(self):
            return True

        def evaluate(self, outputs, inputs):
            layer = self.layer
            sd = inputs[3] if len(inputs) > 3 else None  # None: no SDPA in the graph (_evaluate computes all)
            if layer.bf16 is None:
                layer.bf16 = tuple(_is_bf16(x) for x in (*inputs[:3], outputs[0]))
                layer.f32_out = outputs[0].get_element_type() == ov.Type.f32
            bf, o = layer.bf16, outputs[0]
            o.shape = (sd if sd is not None else inputs[0]).shape
            if not any(bf):  # f32 q / k / v / output (no bf16 widening)
                dst = o.data if layer.f32_out else None
                out = _evaluate(layer, inputs[0].data, inputs[1].data, inputs[2].data, sd, dst)
            else:
                dst = None
                out = _evaluate(layer, *(_as_np(inputs[j], bf[j]) for j in range(3)), sd)
            if out is None:
                sd.copy_to(o)
            elif bf[3]:
                o.data.view(np.uint16)[...] = f32_to_bf16_bits(out)
            elif dst is None or not np.shares_memory(out, dst):
                o.data[...] = out
            return True

    return PackedKVAttention
