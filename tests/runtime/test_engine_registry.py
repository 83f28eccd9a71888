"""The engine registry and contract: the selection table (every combination of backend, export kind, scheme family,
kv_owner, device, architecture and kv mode -> the expected engine class, or a one-line InputError naming scheme,
backend and device); a new entry placed before the others wins where its default holds (how an engine is added);
every registered class has every member of ``Engine`` with the protocol's signature, and a docstring on every
public member of the engine modules; the private OpenVINO API is refused outside the tested versions. No model is
loaded here (the engines' behaviour is tested in test_engines.py / test_state_owned.py / test_pipeline.py)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvtool.errors import InputError
from kvtool.runtime.engines import ENGINES, Default, EngineEntry, engine_key, load_engine, select_engine
from kvtool.runtime.engines.protocol import Engine
from kvtool.runtime.kvspec import make_kv_spec

ENGINES_DIR = Path(__file__).resolve().parents[2] / "kvtool" / "runtime" / "engines"
SPECS = {"fp16": ("fp16", None), "kvtool": ("g-KC128VT128", 2), "ov": ("ov-u8", None)}  # one scheme per family

STATEFUL, STATE_OWNED, PAGED = "OpenVINOStatefulEngine", "OpenVINOStateOwnedEngine", "OpenVINOPagedEngine"
PACKED = "OpenVINOPackedEngine"
PACKED_FAMILIES = "kv_owner=packed takes fp16 or kvtool's schemes"
STATELESS = "OpenVINOEngine"
NEEDS_STATEFUL = "it needs a stateful export (export with stateful=True)"
# stateful OpenVINO export of LLaVA: (family, kv_owner) -> (engine or error on CPU, on GPU)
STATEFUL_LLAVA = {
    ("fp16", None): (PAGED, STATEFUL),  # paged on CPU (chunked prefill, genai's graph form); stateful elsewhere
    ("fp16", "openvino"): (STATEFUL, STATEFUL),
    ("fp16", "paged"): (PAGED, PAGED),
    ("fp16", "kvtool"): (STATE_OWNED, STATE_OWNED),
    ("kvtool", None): (PAGED, STATE_OWNED),  # paged on CPU only (its host-memory blocks); the state API elsewhere
    ("kvtool", "paged"): (PAGED, PAGED),
    ("kvtool", "kvtool"): (STATE_OWNED, STATE_OWNED),
    ("kvtool", "openvino"): ("kv_owner=openvino takes fp16 or ov-u8/ov-u4",) * 2,
    ("ov", None): (STATEFUL, STATEFUL),
    ("ov", "openvino"): (STATEFUL, STATEFUL),
    ("ov", "paged"): ("kv_owner=paged takes fp16 or kvtool's schemes",) * 2,
    ("ov", "kvtool"): ("kv_owner=kvtool takes fp16 or kvtool's schemes",) * 2,
    ("fp16", "packed"): (PACKED, PACKED),  # opt-in for fp16: paged (CPU) / stateful stay its defaults
    ("kvtool", "packed"): (PACKED, PACKED),  # asking is an override; the engine itself refuses a non-CPU device
    ("ov", "packed"): (PACKED_FAMILIES,) * 2,
}
# kvtool schemes in packed mode on CPU: the packed engine (any architecture); simulate mode keeps the tables above
PACKED_CPU = {("kvtool", None): (PACKED, STATE_OWNED)}
# Qwen2-VL: the same table (PagedAttention takes its 3-D positions as [3, T]: test_qwen2vl_paged.py)
STATEFUL_QWEN = STATEFUL_LLAVA
# stateless OpenVINO export (any architecture, any device): family -> kv_owner -> engine or error
STATELESS_OV = {
    "fp16": {None: STATELESS, "openvino": NEEDS_STATEFUL, "paged": NEEDS_STATEFUL, "kvtool": NEEDS_STATEFUL,
             "packed": NEEDS_STATEFUL},
    "kvtool": {None: STATELESS, "openvino": "kv_owner=openvino takes fp16 or ov-u8/ov-u4", "paged": NEEDS_STATEFUL,
               "kvtool": NEEDS_STATEFUL, "packed": NEEDS_STATEFUL},
    "ov": {None: NEEDS_STATEFUL, "openvino": NEEDS_STATEFUL, "paged": "kv_owner=paged takes fp16 or kvtool's",
           "kvtool": "kv_owner=kvtool takes fp16 or kvtool's", "packed": PACKED_FAMILIES},
}
OWNERS = (None, "openvino", "paged", "kvtool", "packed")


def _spec(family: str, mode: str = "packed"):
    kv, bits = SPECS[family]
    return make_kv_spec(kv, bits, bits, mode)


def _pick(backend, family, device, manifest, owner, mode="packed") -> str:
    """The chosen class's name, or the InputError's message (checked to be one line naming scheme, backend,
    device)."""
    spec = _spec(family, mode)
    try:
        return select_engine(engine_key(backend, spec, device, manifest, owner)).name
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and f"kv={spec.scheme}" in msg and backend in msg and device in msg, msg
        if owner:
            assert f"kv_owner={owner}" in msg, msg
        return msg


def _check(got: str, want: str) -> None:
    if want.startswith(("OpenVINO", "ONNX", "Torch")) and " " not in want:
        assert got == want
    else:
        assert want in got, got


@pytest.mark.parametrize("mode", ["packed", "simulate"])
@pytest.mark.parametrize("arch,table", [("llava", STATEFUL_LLAVA), ("llava_next", STATEFUL_LLAVA),
                                        ("qwen2_vl", STATEFUL_QWEN)])
def test_stateful_openvino_selection_table(arch, table, mode):
    manifest = SimpleNamespace(stateful=True, architecture=arch)
    table = {**table, **PACKED_CPU} if mode == "packed" else table
    for (family, owner), wants in table.items():
        for device, want in zip(("CPU", "GPU.0"), wants, strict=True):
            _check(_pick("openvino", family, device, manifest, owner, mode), want)
    # NPU (any non-CPU device) is chosen for as GPU is
    for (family, owner), (_, on_gpu) in table.items():
        _check(_pick("openvino", family, "NPU", manifest, owner, mode), on_gpu)


@pytest.mark.parametrize("mode", ["packed", "simulate"])
@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("device", ["CPU", "GPU"])
def test_stateless_openvino_selection_table(arch, device, mode):
    manifest = SimpleNamespace(stateful=False, architecture=arch)
    for family, by_owner in STATELESS_OV.items():
        for owner, want in by_owner.items():
            _check(_pick("openvino", family, device, manifest, owner, mode), want)


@pytest.mark.parametrize("backend,device,manifest,engine", [
    ("onnxruntime", "CPUExecutionProvider", SimpleNamespace(stateful=False, architecture="llava"), "ONNXEngine"),
    ("onnxruntime", "CUDAExecutionProvider", SimpleNamespace(stateful=False, architecture="qwen2_vl"), "ONNXEngine"),
    ("torch", "cpu", None, "TorchEngine"),
    ("torch", "cuda:0", None, "TorchEngine"),
])
def test_onnxruntime_and_torch_selection_table(backend, device, manifest, engine):
    for mode in ("packed", "simulate"):
        for family in ("fp16", "kvtool"):
            assert _pick(backend, family, device, manifest, None, mode) == engine
            for owner in ("openvino", "paged", "kvtool", "packed"):  # kv_owner is an OpenVINO stateful-export option
                _check(_pick(backend, family, device, manifest, owner, mode), "it needs backend openvino")
        _check(_pick(backend, "ov", device, manifest, None, mode), "it needs backend openvino")


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("device", ["CPU", "GPU.0", "NPU"])
def test_fp16_default_is_paged_on_cpu_and_ov_stays_stateful(arch, device):
    """fp16's default on a stateful export: the paged engine (chunked prefill; docs/BENCHMARKS.md, "fp16 on the
    paged engine", "Qwen2-VL on the paged engine") on CPU for every architecture; the stateful engine off CPU.
    OpenVINO's own ov-u8 / ov-u4 stay on the stateful engine everywhere."""
    m = SimpleNamespace(stateful=True, architecture=arch)
    want = PAGED if device == "CPU" else STATEFUL
    for mode in ("packed", "simulate"):
        assert _pick("openvino", "fp16", device, m, None, mode) == want
        for ov in ("ov-u8", "ov-u4"):
            assert select_engine(engine_key("openvino", make_kv_spec(ov), device, m)).name == STATEFUL


def test_unknown_kv_owner_and_backend_are_refused():
    m = SimpleNamespace(stateful=True, architecture="llava")
    with pytest.raises(InputError, match="kv_owner: expected one of kvtool, openvino, packed, paged, got 'state'"):
        select_engine(engine_key("openvino", _spec("fp16"), "CPU", m, "state"))
    with pytest.raises(InputError, match="backend: expected one of onnxruntime, openvino, torch, got 'tvm'"):
        load_engine("tvm", "/nowhere", _spec("fp16"), "CPU", manifest=m)
    with pytest.raises(InputError, match="kv=ov-u8: no engine runs it on a stateless openvino export"):
        load_engine("openvino", "/nowhere", _spec("ov"), "CPU", manifest=SimpleNamespace(stateful=False,
                                                                                      architecture="llava"))


def test_a_new_engine_is_one_entry_placed_before_those_it_wins_over():
    """What adding an engine takes: one ``EngineEntry``. An engine for packed kvtool schemes on a stateful CPU
    export (here a hypothetical "fused" one), placed first, wins there and only there; the others keep their
    loads, and it answers its kv_owner (how ``OpenVINOPackedEngine`` was added)."""
    new = EngineEntry("kvtool.runtime.engines.openvino_packed:OpenVINOPackedEngine", "openvino", "stateful",
                      frozenset({"fp16", "kvtool"}), owner="fused",
                      default=Default(frozenset({"kvtool"}), devices=frozenset({"CPU"}), modes=frozenset({"packed"})))
    reg = (new, *ENGINES)
    m = SimpleNamespace(stateful=True, architecture="llava")

    def pick(family, mode, device="CPU", owner=None):
        return select_engine(engine_key("openvino", _spec(family, mode), device, m, owner), reg)

    assert pick("kvtool", "packed") is new
    assert pick("kvtool", "simulate").owner == "paged"
    assert pick("kvtool", "packed", device="GPU").owner == "kvtool"
    assert pick("fp16", "packed").owner == "paged"
    assert pick("fp16", "packed", device="GPU").owner == "openvino"
    assert pick("fp16", "packed", owner="fused") is new
    assert pick("kvtool", "packed", owner="packed").owner == "packed"
    assert select_engine(engine_key("openvino", _spec("kvtool"), "CPU", m)).owner == "packed"  # ENGINES unchanged


def _protocol_members() -> tuple[list[str], list[str]]:
    data = list(Engine.__annotations__)
    methods = [n for n, v in vars(Engine).items() if not n.startswith("_") and callable(v)]
    return data, methods


def test_protocol_lists_what_the_pipeline_calls():
    data, methods = _protocol_members()
    assert data == ["backend", "device", "num_layers", "num_kv_heads", "head_dim"]
    assert methods == ["start", "set_quantize", "run_prompt", "run_token", "kv_nbytes", "kv_work_nbytes",
                       "kv_dtype_name", "info"]
    src = (ENGINES_DIR.parents[0] / "pipeline.py").read_text()
    for name in ("start", "set_quantize", "run_prompt", "run_token", "kv_nbytes", "kv_work_nbytes", "kv_dtype_name",
                 "info", "backend", "device", "num_kv_heads", "head_dim"):
        assert f"eng.{name}" in src or f"engine.{name}" in src, name


@pytest.mark.parametrize("entry", ENGINES, ids=lambda e: e.name)
def test_every_engine_class_has_every_protocol_member(entry):
    cls = entry.load_class()
    data, methods = _protocol_members()
    for name in methods:
        mine, want = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Engine, name))
        assert list(mine.parameters) == list(want.parameters), (cls.__name__, name)
        assert [p.default for p in mine.parameters.values()] == [p.default for p in want.parameters.values()]
    assert cls.backend == entry.backend
    # instance attributes: every class sets them in __init__ (the isinstance check on loaded engines is in
    # test_engines.py / test_state_owned.py / test_pipeline.py)
    init_src = "".join(inspect.getsource(c.__init__) for c in cls.__mro__ if "__init__" in vars(c)
                       and c.__module__.startswith("kvtool"))
    for name in data[1:]:
        assert f"self.{name}" in init_src, (cls.__name__, name)


def test_isinstance_checks_members_not_inheritance():
    class Partial:
        backend, device, num_layers, num_kv_heads, head_dim = "torch", "cpu", 1, 1, 1

        def start(self, prepared, max_new_tokens=64): ...

    assert not isinstance(Partial(), Engine)
    full = Partial()
    for name in _protocol_members()[1]:
        setattr(full, name, lambda *a: None)
    assert isinstance(full, Engine)


def test_every_public_member_of_the_engine_modules_has_a_docstring():
    missing = []
    for f in sorted(ENGINES_DIR.glob("*.py")):
        tree = ast.parse(f.read_text())
        assert ast.get_docstring(tree), f.name
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{f.name}:{node.name}")
                if isinstance(node, ast.ClassDef):
                    missing += [f"{f.name}:{node.name}.{m.name}" for m in node.body
                                if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
                                and not ast.get_docstring(m)]
    assert not missing, missing


# -- the private OpenVINO API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2025.3.0-19807-44526285f24-releases/2025/3", "2027.0.0", "nightly"])
def test_private_openvino_api_is_refused_outside_the_tested_versions(monkeypatch, version):
    from kvtool.runtime.engines import ov_private

    monkeypatch.setattr(ov_private, "installed_openvino_version", lambda: version)
    with pytest.raises(InputError) as exc:
        ov_private.paged_attention(None, 1)  # refused before the model is touched
    msg = str(exc.value)
    assert msg.startswith(f"OpenVINO {version}: the paged engine") and ">= 2026.0, < 2027.0" in msg
    assert "\n" not in msg


def test_private_openvino_api_failure_is_one_line_naming_the_version():
    """On a tested version the pass runs; graphs it cannot turn into PagedAttention (no KV state; state but no
    attention) are refused in one line naming the OpenVINO version and OpenVINO's reason, not a multi-line
    RuntimeError from inside the pass."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    from kvtool.runtime.engines import ov_private

    ov_private.check_openvino_version("this test")  # the installed version is a tested one
    x = ops.parameter([1, 4], ov.Type.f32, "inputs_embeds")
    stateless = ov.Model([ops.relu(x)], [x])
    info = VariableInfo()
    info.data_shape, info.data_type, info.variable_id = ov.PartialShape([1, 4]), ov.Type.f32, "past"
    var = Variable(info)
    y = ops.add(ops.read_value(x, var), x)
    no_attention = ov.Model([y.output(0)], [ops.assign(y, var)], [x])
    version = ov_private.installed_openvino_version()
    for model, reason in ((stateless, "stateful"), (no_attention, "ScaledDotProductAttention")):
        with pytest.raises(InputError) as exc:
            ov_private.paged_attention(model, 1)
        msg = str(exc.value)
        assert msg.startswith(f"OpenVINO {version}: paged_attention_transformation could not convert")
        assert reason in msg and "\n" not in msg
