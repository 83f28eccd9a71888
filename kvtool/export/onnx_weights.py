"""Weights of the ONNX export, one tensor at a time: trace with placeholders, write, quantize per weight.

The ONNX graphs are fp32 graphs (inputs, outputs and compute as the runtime and the parity tests expect),
but the checkpoint is loaded in its own dtype (fp16/bf16) and never up-cast as a whole. What this module
does, and which library does each part:

* ``placeholder_weights(module)``: swaps the module's floating-point parameters for fp32 *fake* tensors
  (``torch._subclasses.fake_tensor``, no storage) while ``torch.onnx.export(..., optimize=False)`` traces it;
  torch.onnx keeps such initializers without data (``ONNXProgram.apply_weights`` is its own way of
  attaching weights afterwards).
* ``attach_real_weights(ir_model, real)``: gives each such initializer an ``onnx_ir.LazyTensor`` that
  up-casts the real 16-bit parameter to fp32 when it is written, so ``onnx_ir.save`` streams the weights to
  the external data file one tensor at a time. Written by hand because the libraries lack it: the exporter's
  optimizer constant-folds ``Transpose(weight)`` of every linear, which would materialise an fp32 copy of
  every weight at once; here a rank-2 ``Transpose`` of a weight becomes a lazy initializer of the transposed
  weight (the graph is then the one the optimizer made before), and the optimizer runs afterwards on the
  rest (its size limits keep it off the large weights).
* ``quantize_matmuls(path, algo)``: onnxruntime's ``MatMulNBitsQuantizer`` on the graph loaded without its
  external data, each MatMul's weight read from the file just before its node is quantized and dropped
  after (a wrapper around the library's per-node quantizer), so only the packed int4/int8 weights and one
  fp32 weight are in memory.
* ``fp32_weights(module)``: real fp32 copies of a (small) module's parameters, for the onnxruntime check.
* ``release_weights(module, names)``: once a graph is written, its parameters become ``meta`` tensors.

It does not choose graphs, names or quantization settings (``onnx_backend`` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _swap(module: Any, name: str, value: Any) -> Any:
    """Set the parameter ``name`` (dotted) of ``module`` to ``value``; returns the previous one."""
    *path, attr = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    old = owner._parameters[attr]
    owner._parameters[attr] = value
    return old


def _float_params(module: Any) -> dict[str, Any]:
    return {n: p for n, p in module.named_parameters(remove_duplicate=False) if p.is_floating_point()}


@contextmanager
def placeholder_weights(module: Any) -> Iterator[dict[str, Any]]:
    """While the block runs, ``module``'s floating-point parameters are fp32 fake tensors (same shapes, no
    memory); yields ``{parameter name: real tensor}`` (the checkpoint's dtype). Restored on exit."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _float_params(module)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = {n: torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                 for n, p in real.items()}
    for n, f in fakes.items():
        _swap(module, n, f)
    try:
        yield real
    finally:
        for n, p in real.items():
            _swap(module, n, p)


@contextmanager
def fp32_weights(module: Any) -> Iterator[None]:
    """While the block runs, ``module``'s floating-point parameters are real fp32 (copies of 16-bit ones;
    fp32 ones are used as they are). For the onnxruntime check of small graphs only."""
    import torch

    real = _float_params(module)
    for n, p in real.items():
        _swap(module, n, torch.nn.Parameter(p.detach().float(), requires_grad=False))
    try:
        yield
    finally:
        for n, p in real.items():
            _swap(module, n, p)


def param_count(module: Any) -> int:
    return sum(p.numel() for p in _float_params(module).values())


def release_weights(module: Any, names: set[str]) -> None:
    """Replace the parameters ``names`` of ``module`` by ``meta`` tensors (no memory; the module can no
    longer run). The mapped checkpoint pages they pointed to are then unreferenced."""
    import torch

    for n, p in _float_params(module).items():
        if n in names:
            _swap(module, n, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def _lazy(tensor: Any, perm: tuple[int, ...] | None, name: str) -> Any:
    import onnx_ir as ir
    import torch

    shape = tuple(tensor.shape) if perm is None else tuple(tensor.shape[i] for i in perm)

    def value():
        t = tensor.detach().to(torch.float32)
        if perm is not None:
            t = t.permute(*perm).contiguous()
        return ir.Tensor(t.numpy())

    return ir.LazyTensor(value, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def attach_real_weights(model: Any, real: dict[str, Any]) -> set[str]:
    """Give the fake initializers of the ``onnx_ir`` model the real weights as lazy fp32 tensors, folding
    ``Transpose(weight)`` into a lazily transposed initializer (see the module docstring). Returns the
    parameter names the graph uses."""
    import onnx_ir as ir

    graph = model.graph
    used = {n for n in real if n in graph.initializers}
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or src.name not in used or src.const_value is None:
            continue
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(src.shape))))
        out = node.outputs[0]
        name = f"{src.name}.T" if perm == (1, 0) else f"{src.name}.perm{''.join(map(str, perm))}"
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), const_value=_lazy(real[src.name], perm, name))
        value.shape = value.const_value.shape
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        if out.is_graph_output():  # never for weights, but keep the graph valid if it were
            continue
        graph.remove(node, safe=True)
    for n in used:
        init = graph.initializers[n]
        if init.uses():
            init.const_value = _lazy(real[n], None, n)
        else:
            del graph.initializers[n]
    return used


def save_ir(model: Any, path: Path) -> None:
    """Save an ``onnx_ir`` model with its weights in ``<name>.data``, one tensor at a time; drops the
    exporter's per-node stack-trace metadata (it can outweigh a small model's weights)."""
    import onnx_ir as ir

    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        node.metadata_props.clear()
        node.doc_string = None
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    ir.save(model, str(path), external_data=data.name, size_threshold_bytes=1024, max_workers=1,
            max_in_flight_bytes=1 << 26)


class _LoadingQuantizer:
    """Wraps onnxruntime's per-node weight-only quantizer: each MatMul's weight is read from the external
    data file into a one-tensor scratch graph placed innermost on the library's graph stack (its initializer
    lookup searches innermost first), the library quantizes from there and adds the packed tensors to it,
    and only those are copied into the model. Written by hand because the library reads every weight from
    the in-memory model, and bytes loaded into a protobuf message stay in its arena until the whole model
    is freed: loading in place would end with the whole fp32 graph in memory."""

    def __init__(self, inner: Any, base_dir: Path):
        self.inner, self.base_dir = inner, str(base_dir)

    def quantize(self, node: Any, graph_stack: list) -> Any:
        import onnx
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
        from onnxruntime.quantization.matmul_nbits_quantizer import get_initializer

        tensor, owner = get_initializer(node.input[1], graph_stack) if len(node.input) > 1 else (None, None)
        if tensor is None or not uses_external_data(tensor):
            return self.inner.quantize(node, graph_stack)
        scratch = onnx.GraphProto()
        weight = scratch.initializer.add()
        weight.CopyFrom(tensor)  # the external-data reference only: no weight bytes yet
        load_external_data_for_tensor(weight, self.base_dir)
        weight.data_location = onnx.TensorProto.DEFAULT  # so the library reads the loaded bytes
        del weight.external_data[:]
        nodes = self.inner.quantize(node, [*graph_stack, scratch])
        owner.initializer.extend(t for t in scratch.initializer if t.name != tensor.name)
        return nodes


def quantize_matmuls(path: Path, algo: Any) -> Any:
    """Run ``MatMulNBitsQuantizer(algo_config=algo)`` over the graph at ``path`` weight by weight (see the
    module docstring); returns the quantized ``onnx.ModelProto`` with every remaining tensor loaded (the
    small ones: norms, biases, packed weights)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(path), load_external_data=False), algo_config=algo)
    q.node_quantizer = _LoadingQuantizer(q.node_quantizer, path.parent)
    q.process()
    model = q.model.model
    load_external_data_for_model(model, str(path.parent))
    return model
