"""Engines: each runs one model's graphs (or the HF model) for the generate loop of ``kvtool.runtime.pipeline``,
answering the calls of ``protocol.Engine``; this module holds the registry that picks one and ``load_engine``.

A load is described by its ``EngineKey``: backend, export kind (``stateful`` / ``stateless`` OpenVINO LM graph,
``checkpoint`` for the torch reference), scheme family (``fp16``; ``kvtool``: a quant_ops scheme kvtool
quantizes; ``ov``: OpenVINO's own ``ov-u8``/``ov-u4``), kv mode (``packed`` / ``simulate``), device, the LM's
architecture, and the ``kv_owner`` asked for (None: not asked). The selection rule, in full:

  1. the candidates are the ``ENGINES`` entries whose backend, export kind and architecture match and whose
     ``families`` hold the scheme family;
  2. with ``kv_owner`` given, the candidate whose ``owner`` is that name (device and mode do not matter: asking
     is an override); without it, the first candidate in ``ENGINES`` order whose ``default`` holds the family,
     the device and the mode;
  3. none: ``InputError``, one line naming the scheme, backend, export kind, device (and kv_owner) and what would
     run it.

A new engine is its module (a class answering ``Engine``, built as ``cls(path, spec, device, **kwargs)``) plus
one ``EngineEntry`` here, placed before the entries it should win over. Engine classes are imported only when
chosen, so only the chosen runtime library is loaded.

Why each engine is kept (decode figures: docs/BENCHMARKS.md, "kvtool owning a stateful export's cache", OpenVINO
2026.4 CPU, tiny-LM benchmark; "x" = decode time over the anchor's, own process / interleaved):

- ``OpenVINOStatefulEngine`` (kv_owner ``openvino``): the stateful export with the KV inside the graph — what
  optimum-intel runs — and the only home of OpenVINO's own compression (``ov-u8``/``ov-u4``). Default for
  those on a stateful export on any device, and for ``fp16`` where the paged engine does not run it (non-CPU
  devices). On CPU LLaVA it missed issue 13's fp16 targets against openvino.genai f16 (peak RSS 1.45x /
  2.45x at 2k / 8k tokens, time to first token 2.94x at 8k, decode 1.23x / 1.45x): its one-call prefill of the
  stateful SDPA holds the whole prompt's mask and activations, and chunking that graph costs 1.8x-5.9x the CPU.
  For ``fp16`` on CPU it prefills in chunks of 512 where the prompt is longer
  (``openvino_engine.stateful_chunking_saves_memory``: its chunks need no extra buffer, the states are the
  cache), trading prefill CPU for memory (docs/BENCHMARKS.md, "Qwen2-VL fp16 on the stateful engine's chunked
  prefill"; Qwen2-VL's fp16 default on CPU is now the paged engine); ``prefill_chunk=0`` asks for one call.
- ``OpenVINOPackedEngine`` (kv_owner ``packed``): kvtool's schemes in packed mode on the stateful export with
  the cache held *only* packed: the graph's KV state is removed and a Python OpenVINO op per layer appends to
  the layer's ``QuantizedKVStore`` and runs the fused attention over the codes (``quant_ops.attention``).
  All three architectures (positions stay a graph input). Default for kvtool schemes in packed mode on
  ``CPU`` (docs/BENCHMARKS.md, "packed engine": KV held 37.6 MiB where paged also holds a 512 MiB working
  copy at 8k tokens). Simulate mode keeps the paged engine. fp16 on request only (kv_owner ``packed``).
- ``OpenVINOPagedEngine`` (kv_owner ``paged``): the stateful export through PagedAttention (openvino.genai's
  graph form) with caller-owned blocks. ``fp16``: the blocks are the cache (held once) and the prompt is
  prefilled in chunks of 512 tokens; against openvino.genai f16 on the issue-13 model (docs/BENCHMARKS.md, "fp16
  on the paged engine"): peak RSS 1.01x / 0.90x at 2k / 8k tokens, time to first token 0.96x / 0.96x in CPU
  seconds. kvtool's schemes: 1.01x / 0.83x decode for g-KC128VT128 K2V2 packed (the stateless graph: 3.00x /
  2.40x). Default for ``fp16`` and for kvtool schemes in simulate mode on a stateful export on ``CPU`` (the
  device its in-place host-memory blocks were built and measured on), every architecture: OpenVINO's
  PagedAttention pass turns Qwen2-VL's ``[3, 1, T]`` positions into a ``[3, T]`` input, which the engine feeds
  (openvino.genai runs Qwen2-VL so; docs/BENCHMARKS.md, "Qwen2-VL on the paged engine": prefill CPU and memory
  against the stateful engine's; tests/runtime/test_qwen2vl_paged.py: transformers' logits).
- ``OpenVINOStateOwnedEngine`` (kv_owner ``kvtool``): kvtool's schemes on the stateful export through OpenVINO's
  variable-state API. With a quantizing scheme it rewrites whole states (3.20x / 1.95x, about the stateless
  graph's speed) and its states are a dequantized copy the size of the fp cache, so on CPU LLaVA paged replaces
  it. Kept because it runs kvtool's schemes on the stateful export — the export's default — where paged cannot:
  non-CPU OpenVINO devices (the state API needs no host-memory blocks; no OpenVINO GPU/NPU was available to
  measure it). Default there. (It also runs Qwen2-VL: ``tests/runtime/test_state_owned.py``, the stateless
  graph's tokens and logits within 1e-4.)
- ``OpenVINOEngine`` (stateless graphs; no kv_owner): 2.81x / 2.18x for fp16, about 3x the paged engine's
  time. Kept because ``kvtool export --stateless`` still writes that export (explicit past inputs, which no
  other OpenVINO engine runs), and it is the reference the stateful engines are tested against
  (``tests/runtime/test_state_owned.py``: logits within 1e-4). Default for every stateless OpenVINO export.
- ``ONNXEngine``: every ONNX export (stateless by construction), CPU or CUDA execution provider.
- ``TorchEngine``: the HF checkpoint itself, the fp32 reference (CPU or CUDA).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from kvtool.errors import InputError
from kvtool.runtime.engines.protocol import Engine

__all__ = ["ENGINES", "Default", "Engine", "EngineEntry", "EngineKey", "engine_key", "load_engine", "select_engine"]

ANY = None  # in an EngineEntry / Default field: matches every value


@dataclass(frozen=True)
class Default:
    """When an entry is chosen without ``kv_owner``: for these scheme families, on these devices, in these kv
    modes (``ANY``: every one)."""

    families: frozenset[str]
    devices: frozenset[str] | None = ANY
    modes: frozenset[str] | None = ANY

    def holds(self, key: EngineKey) -> bool:
        """True when ``key``'s scheme family, device and kv mode are all in this default."""
        return (key.family in self.families and (self.devices is ANY or key.device in self.devices)
                and (self.modes is ANY or key.mode in self.modes))


@dataclass(frozen=True)
class EngineEntry:
    """One engine in the registry.

    ``target``: ``"module:Class"``, imported when chosen; ``backend``: ``openvino`` | ``onnxruntime`` | ``torch``;
    ``export``: ``stateful`` | ``stateless`` | ``checkpoint``; ``families``: the scheme families it runs
    (``fp16``, ``kvtool``, ``ov``); ``owner``: the ``kv_owner`` value that asks for it (None: it cannot be
    asked for by name); ``default``: when it is chosen without ``kv_owner`` (None: only when asked for);
    ``archs``: the architectures it runs (``ANY``: all)."""

    target: str
    backend: str
    export: str
    families: frozenset[str]
    owner: str | None = None
    default: Default | None = None
    archs: frozenset[str] | None = ANY

    @property
    def name(self) -> str:
        """The engine class's name (the part of ``target`` after the colon)."""
        return self.target.split(":")[1]

    def load_class(self) -> type:
        """Import and return the engine class (this imports its runtime library's Python modules lazily)."""
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class EngineKey:
    """What selects an engine (module docstring): ``backend``; ``export``: ``stateful`` | ``stateless`` |
    ``checkpoint``; ``family``: the scheme's family, ``fp16`` | ``kvtool`` | ``ov``; ``mode``: ``packed`` |
    ``simulate``; ``device``: the resolved device; ``arch``: the manifest's architecture (None for a checkpoint:
    the torch engine runs them all); ``owner``: the ``kv_owner`` asked for, or None; ``kv``: the scheme's name
    (for messages only; None: the family's name)."""

    backend: str
    export: str
    family: str
    mode: str
    device: str
    arch: str | None = None
    owner: str | None = None
    kv: str | None = None


_S = frozenset
_E = "kvtool.runtime.engines."
ENGINES: tuple[EngineEntry, ...] = (
    EngineEntry(_E + "torch_engine:TorchEngine", "torch", "checkpoint", _S({"fp16", "kvtool"}),
                default=Default(_S({"fp16", "kvtool"}))),
    EngineEntry(_E + "onnx_engine:ONNXEngine", "onnxruntime", "stateless", _S({"fp16", "kvtool"}),
                default=Default(_S({"fp16", "kvtool"}))),
    EngineEntry(_E + "openvino_engine:OpenVINOEngine", "openvino", "stateless", _S({"fp16", "kvtool"}),
                default=Default(_S({"fp16", "kvtool"}))),
    EngineEntry(_E + "openvino_packed:OpenVINOPackedEngine", "openvino", "stateful", _S({"fp16", "kvtool"}),
                owner="packed", default=Default(_S({"kvtool"}), devices=_S({"CPU"}), modes=_S({"packed"}))),
    EngineEntry(_E + "openvino_paged:OpenVINOPagedEngine", "openvino", "stateful", _S({"fp16", "kvtool"}),
                owner="paged", default=Default(_S({"fp16", "kvtool"}), devices=_S({"CPU"}))),
    EngineEntry(_E + "openvino_state:OpenVINOStateOwnedEngine", "openvino", "stateful", _S({"fp16", "kvtool"}),
                owner="kvtool", default=Default(_S({"kvtool"}))),
    EngineEntry(_E + "openvino_engine:OpenVINOStatefulEngine", "openvino", "stateful", _S({"fp16", "ov"}),
                owner="openvino", default=Default(_S({"fp16", "ov"}))),
)
"""The registry, in priority order (module docstring: the selection rule and why each engine is kept)."""


def engine_key(backend: str, spec, device: str, manifest=None, kv_owner: str | None = None) -> EngineKey:
    """The ``EngineKey`` of a load: ``spec`` is the ``KVSpec``, ``manifest`` the export's (None: an HF checkpoint,
    export kind ``checkpoint``)."""
    export = "checkpoint" if manifest is None else "stateful" if manifest.stateful else "stateless"
    family = "fp16" if spec.is_fp else "ov" if spec.is_ov else "kvtool"
    arch = None if manifest is None else manifest.architecture
    return EngineKey(backend, export, family, spec.mode, device, arch, kv_owner, spec.scheme)


def _runs(entry: EngineEntry, key: EngineKey) -> bool:
    return (entry.backend == key.backend and entry.export == key.export and key.family in entry.families
            and (entry.archs is ANY or key.arch is None or key.arch in entry.archs))


def select_engine(key: EngineKey, engines: tuple[EngineEntry, ...] = ENGINES) -> EngineEntry:
    """The entry of ``engines`` the selection rule (module docstring) picks for ``key``; ``InputError`` when none
    does, or when ``key.owner`` is a name no entry answers to."""
    owners = sorted({e.owner for e in engines if e.owner})
    if key.owner is not None and key.owner not in owners:
        raise InputError(f"kv_owner: expected one of {', '.join(owners)}, got {key.owner!r}")
    found = [e for e in engines if _runs(e, key)]
    if key.owner is not None:
        hit = next((e for e in found if e.owner == key.owner), None)
    else:
        hit = next((e for e in found if e.default is not None and e.default.holds(key)), None)
    if hit is not None:
        return hit
    raise InputError(_no_engine_message(key, engines))


_FAMILY_NAMES = {"fp16": "fp16", "kvtool": "kvtool's schemes", "ov": "ov-u8/ov-u4"}


def _no_engine_message(key: EngineKey, engines: tuple[EngineEntry, ...]) -> str:
    """One line: what was asked (scheme, kv_owner, backend, export kind, architecture, device) and, from the entries
    that answer to that kv_owner (or run that scheme family), what would run it."""
    asked = f"kv={key.kv or key.family}" + (f" with kv_owner={key.owner}" if key.owner else "")
    where = f"a {key.export} {key.backend} export" if key.export != "checkpoint" else f"an HF checkpoint (backend {key.backend})"
    arch = f" of {key.arch}" if key.arch else ""
    hints: list[str] = []
    for e in engines:
        if (e.owner != key.owner) if key.owner else (key.family not in e.families):
            continue
        if e.backend != key.backend:
            hint = f"it needs backend {e.backend}"
        elif key.family not in e.families:
            hint = f"kv_owner={key.owner} takes {' or '.join(_FAMILY_NAMES[f] for f in sorted(e.families))}"
        elif e.export != key.export:
            hint = f"it needs a {e.export} export" + (f" (export with stateful={e.export == 'stateful'})"
                                                      if key.backend == "openvino" else "")
        elif e.archs is not ANY and key.arch not in e.archs:
            hint = f"{e.name} runs {', '.join(sorted(e.archs))} only"
        else:
            continue
        if hint not in hints:
            hints.append(hint)
    return f"{asked}: no engine runs it on {where}{arch} on device {key.device}" + "".join(f"; {h}" for h in hints)


def load_engine(backend: str, path: str | Path, spec, device: str, **kwargs) -> Engine:
    """Build the engine the registry picks for this load (module docstring: the rule).

    ``backend``: ``openvino`` | ``onnxruntime`` | ``torch``; ``path``: the export dir (or HF checkpoint for torch);
    ``spec``: the ``KVSpec``; ``device``: the resolved device. ``kwargs``: ``manifest`` (the export's, passed on
    to graph engines), ``kv_owner`` (``paged`` | ``kvtool`` | ``openvino``: ask for an engine by name; not passed
    on), and the chosen engine's own options. Raises ``InputError`` when no engine runs the load."""
    owner = kwargs.pop("kv_owner", None)
    manifest = kwargs.get("manifest")
    if backend not in {e.backend for e in ENGINES}:
        raise InputError(f"backend: expected one of {', '.join(sorted({e.backend for e in ENGINES}))}, "
                         f"got {backend!r}")
    entry = select_engine(engine_key(backend, spec, device, manifest, owner))
    return entry.load_class()(path, spec, device, **kwargs)
