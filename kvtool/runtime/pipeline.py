"""``VLMPipeline``: load a model (an exported dir by its manifest, or an HF checkpoint for the torch
reference), turn image + question into a prompt, and run the generate loop with the KV cache held outside
the graph.

The loop applies DESIGN.md's "where and when quantization acts": with a quantizing scheme and
``first_token="compressed"`` the prompt minus its last token is prefilled first and the last prompt token then
runs against the stored (compressed) cache, so every generated token sees compressed context; the torch
engine in ``simulate`` mode instead prefills in one pass with its ``Cache`` quantizing inside it, as the
study's code does. ``first_token="fp"`` takes the first token from a full-precision prefill.
It does not know about datasets or metrics, and it generates one sequence at a time (batch 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kvtool.errors import InputError, PromptTooLong
from kvtool.runtime.engines.protocol import Engine
from kvtool.runtime.kvspec import KVSpec, check_scheme_fits, make_kv_spec
from kvtool.runtime.preprocess import check_question, load_images, prepare_inputs, resolve_conversation
from kvtool.runtime.sampling import check_sampling, next_token

BACKENDS = ("auto", "openvino", "onnxruntime", "torch")
BACKEND_ALIASES = {"onnx": "onnxruntime"}  # export's name for the ONNX backend, accepted everywhere


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    logits: list[np.ndarray] | None = None  # per generated token, [V] each (only with keep_logits=True)


def model_max_positions(path: Path | None, config: dict | None = None) -> int | None:
    """Positions the language model has (``text_config.max_position_embeddings``, else the top-level one) from
    ``config`` (a config.json's dict the caller already read), else from ``config.json`` in ``path`` (an HF
    checkpoint, or an export, which keeps its source's config.json); None where it does not say."""
    import json

    cfg = config
    if cfg is None:
        f = Path(path or "") / "config.json"
        try:
            cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except json.JSONDecodeError:
            return None
    for section in (cfg.get("text_config") or {}, cfg):
        n = section.get("max_position_embeddings") if isinstance(section, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _peak_rss_bytes() -> int:
    """The process's own peak RSS (``kvtool.memory.peak_rss_bytes``: VmHWM, not the inheritable ru_maxrss)."""
    from kvtool.memory import peak_rss_bytes

    return peak_rss_bytes()


def _resolve_backend(path: Path, backend: str):
    from kvtool.manifest import Manifest, is_export_dir

    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)} (or onnx), got {backend!r}")
    if not path.exists():
        raise InputError(f"{path}: no such directory (expected a kvtool export or an HF checkpoint)")
    if backend == "torch":
        if is_export_dir(path):
            held = Manifest.load(path).backend
            raise InputError(f"--backend torch: {path} is a kvtool export ({held} graphs); torch runs an HF "
                             f"checkpoint (use --backend {'openvino' if held == 'openvino' else 'onnxruntime'} "
                             "or auto, or pass the source checkpoint)")
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json (backend torch expects an HF checkpoint directory)")
        if not any(path.glob("*.safetensors")):
            raise InputError(f"{path}: no *.safetensors weights (backend torch expects an HF checkpoint directory)")
        return "torch", None
    if backend == "auto" and not is_export_dir(path) and (path / "config.json").is_file() and any(
            path.glob("*.safetensors")):
        return "torch", None
    manifest = Manifest.load(path)  # InputError when there is no manifest
    want = {"openvino": "openvino", "onnx": "onnxruntime"}[manifest.backend]
    if backend not in ("auto", want):
        raise InputError(f"backend: {path} holds {manifest.backend} graphs, which backend {backend!r} cannot run "
                         f"(use {want!r})")
    return want, manifest


def _engine_config(engine) -> dict | None:
    """The config.json the engine loaded, as a dict: a graph engine's ``config`` (``hfconfig.read_config``),
    the torch engine's ``model.config``; None for an engine that holds neither (then the pipeline reads the
    file itself)."""
    cfg = getattr(engine, "config", None)
    if cfg is None:
        cfg = getattr(getattr(engine, "model", None), "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    out = to_dict() if callable(to_dict) else None
    return out if isinstance(out, dict) else None


class VLMPipeline:
    """One loaded model plus its processor and KV settings. Build it with ``VLMPipeline.load``.

    After each ``generate``, ``last_first_logits`` holds the logits ([V], numpy) the first new token was
    chosen from — what parity checks compare across engines and KV settings."""

    def __init__(self, engine: Engine, processor, spec: KVSpec, path: Path, manifest, conversation: str,
                 requested_device: str, config: dict | None = None):
        self.engine = engine
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.spec = spec
        self.path = path
        self.manifest = manifest
        self.conversation = conversation
        self.requested_device = requested_device
        self.eos_ids = self._eos_ids()
        self.max_positions = model_max_positions(path, config)  # config: the engine's, read once by ``load``
        self.last_first_logits: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "auto", kv: str = "fp16",
             k_bits: int | None = None, v_bits: int | None = None, kv_mode: str = "packed",
             first_token: str = "compressed", conversation: str = "chat_template",
             ov_group_size: int | None = None, ov_key_by_channel: bool = False, kv_residual: int | None = None,
             **engine_kwargs) -> VLMPipeline:
        """Load ``path``: an exported dir (its manifest decides OpenVINO or ONNX Runtime), or an HF checkpoint
        dir for ``backend="torch"`` (also picked by ``auto`` for a checkpoint without manifest).

        ``kv``: ``fp16`` (no KV quantization), a quant_ops scheme (``g-KC128VT128``, ``uniform``, ``or2``, ...)
        with ``k_bits`` / ``v_bits`` in 2, 3, 4, 8 (None: 4; must be None for fp16 and ov-*), or ``ov-u8`` / ``ov-u4`` (OpenVINO's own compression on a
        stateful export; ``ov_group_size`` / ``ov_key_by_channel`` where OpenVINO supports them).
        ``kv_mode``: ``packed`` | ``simulate``; ``first_token``: ``compressed`` | ``fp`` (DESIGN.md);
        ``kv_residual``: KIVI's full-precision window of the newest R tokens (quantizing schemes only).
        ``conversation``: ``chat_template`` | ``vicuna_v1`` | ``auto`` (``preprocess.resolve_conversation``: what
        ``kvtool run`` and ``kvtool eval`` use by default). ``engine_kwargs`` go to the engine (OpenVINO:
        ``inference_precision``, ``kv_precision="f16"``, ``edit_graph``; on a stateful export ``kv_owner``:
        ``"packed"`` (cache held only packed, attention over the codes; the default for kvtool schemes in
        packed mode on CPU), ``"paged"`` (PagedAttention with caller-owned blocks, the default for simulate
        mode on CPU) or ``"kvtool"`` (states rewritten), the last two also for fp16; ONNX Runtime: ``threads``;
        torch: ``dtype``). Which engine runs: ``kvtool.runtime.engines``' registry and its rule."""
        from kvtool.devices import resolve_device

        path = Path(path)
        if conversation != "auto":
            conversation = cls.prompt_format(path, conversation)  # checked before anything loads; reads nothing
        spec = make_kv_spec(kv, k_bits, v_bits, kv_mode, first_token, ov_group_size, ov_key_by_channel,
                            residual=kv_residual)
        backend, manifest = _resolve_backend(path, backend)
        if spec.is_ov and backend != "openvino":
            raise InputError(f"kv: {spec.scheme} is OpenVINO's own KV compression and needs an OpenVINO export, "
                             f"not backend {backend}")
        dev = resolve_device(backend, device)
        from kvtool.runtime.engines import load_engine

        if manifest is not None:
            check_scheme_fits(spec, manifest.lm.num_kv_heads, manifest.lm.head_dim)
            engine = load_engine(backend, path, spec, dev, manifest=manifest, **engine_kwargs)
        else:
            engine = load_engine(backend, path, spec, dev, **engine_kwargs)
            check_scheme_fits(spec, engine.num_kv_heads, engine.head_dim)
        processor = None
        if backend != "torch":  # transformers' processor classes import torch (~850 MiB): lean_processor's doc
            from kvtool.runtime.lean_processor import load_lean_processor

            processor = load_lean_processor(path)
            if processor is None:  # Qwen2-VL: lean_qwen2vl's doc
                from kvtool.runtime.lean_qwen2vl import load_lean_qwen2vl_processor

                processor = load_lean_qwen2vl_processor(path)
        if processor is None:
            from kvtool.runtime.processing import load_processor

            processor = load_processor(path)  # PIL image processing and fast; kvtool.runtime.processing
        # config.json is read once, by the engine; the prompt format and the position limit take it from there
        config = _engine_config(engine)
        if conversation == "auto":
            model_type = manifest.architecture if manifest is not None else (config or {}).get("model_type")
            conversation = resolve_conversation(path, conversation, model_type=model_type) if model_type \
                else cls.prompt_format(path, conversation)
        return cls(engine, processor, spec, path, manifest, conversation, device, config=config)

    @staticmethod
    def prompt_format(path: str | Path | None, conversation: str = "auto") -> str:
        """The prompt format (``chat_template`` or ``vicuna_v1``) ``load`` gives the model in ``path`` when asked
        for ``conversation`` (``auto`` resolved by ``preprocess.resolve_conversation``'s one rule; other values
        checked, ``InputError`` naming ``conversation``), reading the model's files. ``load`` applies the same
        rule to the config its engine read (config.json is read once per load); a caller that needs the format
        before loading (the eval runner's settings check) asks here. A loaded pipeline's ``conversation`` holds
        the result."""
        return resolve_conversation(path, conversation)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = self.path / "generation_config.json"
        if gen.is_file():
            import json

            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ------------------------------------------------------------------------------------------------
    def generate(self, image, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, text_only: bool = False,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
                 keep_logits: bool = False) -> GenerateOutput:
        """Answer ``prompt`` about ``image`` (a PIL image, a path, or a list of them).

        ``on_text`` receives the answer's text as it grows (each call gets the new suffix); ``ignore_eos``
        generates exactly ``max_new_tokens`` (benchmarks); ``keep_logits`` returns every step's logits.
        Raises ``InputError`` for bad input (checked before anything runs), ``PromptTooLong`` (an ``InputError``)
        when the prompt's tokens plus ``max_new_tokens`` exceed the model's positions."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        check_sampling(do_sample, temperature, top_p)
        check_question(prompt)
        images = load_images(image)
        if not images and not text_only:
            raise InputError("image: this is an image model and no image was given (pass text_only=True for a "
                             "text-only question)")
        if text_only and images:
            raise InputError("image: text_only=True takes no image")
        t_prep = time.perf_counter()
        prepared = prepare_inputs(self.processor, images, prompt, self.conversation)
        preprocess_ms = (time.perf_counter() - t_prep) * 1e3
        if self.max_positions is not None and prepared.n_tokens + max_new_tokens > self.max_positions:
            raise PromptTooLong(prepared.n_tokens, max_new_tokens, self.max_positions)
        rng = np.random.default_rng(seed)
        eng, spec = self.engine, self.spec

        t0 = time.perf_counter()
        eng.start(prepared, max_new_tokens)
        T = prepared.n_tokens
        split = ((spec.quantizes or spec.is_ov) and spec.first_token == "compressed" and T > 1
                 and not (eng.backend == "torch" and spec.mode == "simulate"))
        if split:
            eng.run_prompt(0, T - 1)
            logits = eng.run_prompt(T - 1, T)
        else:
            if spec.first_token == "fp":
                eng.set_quantize(False)
            logits = eng.run_prompt(0, T)
            eng.set_quantize(True)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        first_logits = logits

        ids: list[int] = []
        kept: list[np.ndarray] | None = [] if keep_logits else None
        shown = ""
        t1 = time.perf_counter()
        n_steps = 0
        while True:
            tok = next_token(logits, do_sample, temperature, top_p, rng)
            ids.append(tok)
            if kept is not None:
                kept.append(np.array(logits, copy=True))
            if on_text is not None:  # streaming time is not decode time
                c0 = time.perf_counter()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if text.startswith(shown) and len(text) > len(shown):
                    on_text(text[len(shown):])
                shown = text
                t1 += time.perf_counter() - c0
            if (tok in self.eos_ids and not ignore_eos) or len(ids) >= max_new_tokens:
                break
            logits = eng.run_token(tok)
            n_steps += 1
        decode_s = time.perf_counter() - t1
        kv_bytes, kv_fp16 = eng.kv_nbytes()
        stats = {
            "prompt_tokens": T,
            "new_tokens": len(ids),
            "prefill_ms": prefill_ms,
            # prompt text + tokenizer + image processor; prefill_ms starts after it (time to first token is both)
            "preprocess_ms": preprocess_ms,
            "decode_ms_per_token": decode_s * 1e3 / n_steps if n_steps else 0.0,
            "tokens_per_s": n_steps / decode_s if n_steps and decode_s > 0 else 0.0,
            "kv_bytes": int(kv_bytes),
            "kv_fp16_bytes": int(kv_fp16),
            # graph engines: the preallocated buffers the graph reads its past from (packed mode dequantizes
            # into them), counted apart from kv_bytes
            "kv_work_bytes": int(eng.kv_work_nbytes()),
            "peak_rss_bytes": _peak_rss_bytes(),
            "kv": spec.scheme, "kv_mode": spec.mode, "first_token": spec.first_token, "kv_residual": spec.residual,
            # the element type the cache's unquantized values are held in (kv_bytes counts them in it)
            "kv_dtype": eng.kv_dtype_name(),
        }
        self.last_first_logits = first_logits
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerateOutput(text=text.strip(), token_ids=ids, stats=stats, logits=kept)

    # ------------------------------------------------------------------------------------------------
    def _kv_work_what(self) -> str | None:
        """What the run's ``kv_work_bytes`` counts on this engine (its ``kv_work_what``; None where the engine
        does not say): shown as ``pipeline.engine.kv_work`` in ``kvtool run --json``."""
        what = getattr(self.engine, "kv_work_what", None)
        return what() if callable(what) else None

    def info(self) -> dict[str, Any]:
        """A JSON-serialisable description of this pipeline, for results files."""
        from kvtool.versions import library_versions

        versions = library_versions(("kvtool", "openvino", "onnxruntime", "torch", "transformers", "optimum-intel",
                                     "nncf"))
        return {
            "backend": self.engine.backend,
            "device": self.engine.device,
            "requested_device": self.requested_device,
            "kv": self.spec.scheme,
            "k_bits": self.spec.k_bits,
            "v_bits": self.spec.v_bits,
            "kv_mode": self.spec.mode,
            "first_token": self.spec.first_token,
            "kv_residual": self.spec.residual,
            "kv_spec": self.spec.to_dict(),
            "conversation": self.conversation,
            # LeanLlavaProcessor / LeanQwen2VLProcessor (transformers-free: lean_processor, lean_qwen2vl) or the
            # transformers processor class wrapped
            "processor": getattr(self.processor, "kind", type(self.processor).__name__),
            "model_path": str(self.path.resolve()),
            "manifest": self.manifest.to_dict() if self.manifest is not None else None,
            "engine": {"name": type(self.engine).__name__, **self.engine.info(),  # which engine ran, by class
                       "kv_work": self._kv_work_what()},
            "versions": versions,
        }
