"""The one place kvtool calls OpenVINO's private (underscore) API, behind a check of the installed version.

``paged_attention(model)`` applies ``openvino._offline_transformations.paged_attention_transformation`` — the
pass openvino.genai runs to turn a stateful LLM graph into its PagedAttention form — and checks that the result
has the inputs the paged engine feeds (``key_cache.{i}`` / ``value_cache.{i}``, ``past_lens``,
``subsequence_begins``, ``block_indices``, ``block_indices_begins``, ``max_context_len``). A private API may
change in any release, so it is called only on the OpenVINO versions it was tested with
(``TESTED_OPENVINO``: 2026.4 in this project's tests and benchmarks; the 2026 line is accepted); outside them,
or when the pass no longer gives those inputs, the call fails with one line naming the installed OpenVINO
version instead of a failure deep inside a graph. It does not compile graphs or run them.
"""

from __future__ import annotations

from kvtool.errors import InputError

# [first, end) as (year, release): the range the private calls below were tested in (tests/runtime/
# test_state_owned.py, docs/BENCHMARKS.md's paged rows: OpenVINO 2026.4)
TESTED_OPENVINO = ((2026, 0), (2027, 0))
# inputs the paged engine feeds after the pass (openvino.genai's PagedAttention model inputs)
PAGED_INPUTS = ("past_lens", "subsequence_begins", "block_indices", "block_indices_begins", "max_context_len")


def installed_openvino_version() -> str:
    """The installed OpenVINO's version string (``openvino.get_version()``, e.g. ``2026.4.1-22982-...``)."""
    import openvino

    return openvino.get_version()


def _year_release(version: str) -> tuple[int, int] | None:
    parts = version.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check_openvino_version(what: str) -> None:
    """Refuse ``what`` (a private-API use, named in the message) unless the installed OpenVINO is in
    ``TESTED_OPENVINO``. Raises ``InputError``: one line naming the installed version and the tested range."""
    version = installed_openvino_version()
    (lo_y, lo_r), (hi_y, hi_r) = TESTED_OPENVINO
    yr = _year_release(version)
    if yr is None or not (lo_y, lo_r) <= yr < (hi_y, hi_r):
        raise InputError(f"OpenVINO {version}: {what} uses OpenVINO's private API, tested with OpenVINO "
                         f">= {lo_y}.{lo_r}, < {hi_y}.{hi_r} only (install such a version, or use kv_owner=kvtool "
                         f"or a stateless export)")


def paged_attention(model, num_layers: int) -> None:
    """Turn ``model`` (an ``openvino.Model``: a stateful LLM graph) into OpenVINO's PagedAttention form, in place,
    with the private ``paged_attention_transformation`` (default options: no score outputs, no cache rotation).

    ``num_layers``: the LM's layers; the result must have a ``key_cache.{i}`` and ``value_cache.{i}`` input per
    layer and the ``PAGED_INPUTS``. Raises ``InputError`` (one line, naming the OpenVINO version) on an untested
    OpenVINO version, when the pass fails, or when it did not give those inputs."""
    check_openvino_version("the paged engine (paged_attention_transformation)")
    from openvino._offline_transformations import paged_attention_transformation

    try:
        paged_attention_transformation(model)
    except RuntimeError as exc:  # OpenVINO's check failures are multi-line; keep the reason line
        lines = [x.strip() for x in str(exc).splitlines() if x.strip() and not x.strip().startswith("Check ")]
        raise InputError(f"OpenVINO {installed_openvino_version()}: paged_attention_transformation could not convert "
                         f"the language model ({(lines[0] if lines else 'no detail')[:200]})") from None
    names = {n for port in model.inputs for n in port.get_names()}
    want = [*PAGED_INPUTS, *(f"{side}_cache.{i}" for i in range(num_layers) for side in ("key", "value"))]
    missing = [n for n in want if n not in names]
    if missing:
        raise InputError(f"OpenVINO {installed_openvino_version()}: paged_attention_transformation gave no input "
                         f"{missing[0]} ({len(missing)} of the paged engine's {len(want)} inputs missing; is the "
                         f"language model a stateful export?)")
