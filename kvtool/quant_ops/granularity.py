"""Typed KV groupings (torchao's ``granularity.py`` shape) and the one place that turns them into block sizes.

A side (K or V) of a quantizing scheme is quantized with one granularity::

    PerTensor()            statistics over one layer's K (or V): all heads, tokens and dims (uniform, or<s>)
    PerChannel(tokens=g)   one (delta, min) per channel and group of g tokens; tokens=None: all N tokens (g-CN)
    PerToken(channels=g)   one (delta, min) per token and group of g channels of D_model = H * D

``block_size(granularity, shape)`` maps a granularity onto a ``[B, H, N, D]`` tensor as the block of values
that share one ``delta`` and one ``min`` (the argument ``affine`` 's primitives take):

    =====================  ==================================  =====================================
    granularity            block_size on [B, H, N, D]           params shape
    =====================  ==================================  =====================================
    PerTensor()            (1, H, N, D)                         (B, 1, 1, 1)
    PerChannel(g)          (1, 1, g, 1)                         (B, H, N/g, D)
    PerChannel(None)       (1, 1, N, 1)                         (B, H, 1, D)
    PerToken(g), g | D     (1, 1, 1, g)                         (B, H, N, D/g)
    PerToken(g), D | g     (1, g/D, 1, D)                       (B, H*D/g, N, 1)
    PerToken(g), otherwise (1, 1, 1, g) on the view [B,1,N,H*D] (B, 1, N, H*D/g)
    =====================  ==================================  =====================================

The last row sets ``flat``: the block applies to the head-major view ``[B, 1, N, H*D]`` (``affine.to_flat``).
This module only describes groupings; it does not quantize.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from kvtool.errors import InputError


class Axis(StrEnum):
    """What one group of a side spans; compares equal to its string (``Axis.TOKEN == "token"``)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    TOKEN = "token"


@dataclass(frozen=True)
class Granularity:
    """Base of the KV granularities. ``axis``: what a group spans; ``group``: its size (tokens for per-channel,
    channels of D_model for per-token, None for all N tokens / the whole tensor)."""

    axis: ClassVar[Axis]

    @property
    def group(self) -> int | None:
        return None

    @property
    def token_block(self) -> int | None:
        """Tokens one group spans along the growing token axis: 1 (per-token), g (per-channel g) or None
        (statistics spanning every token held: per-tensor, per-channel over all N)."""
        return None


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One (delta, min) per batch row of one layer's K (or V)."""

    axis: ClassVar[Axis] = Axis.TENSOR


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One (delta, min) per channel (head, dim) and group of ``tokens`` tokens (None: all N tokens)."""

    tokens: int | None = None
    axis: ClassVar[Axis] = Axis.CHANNEL

    def __post_init__(self) -> None:
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                        or self.tokens < 1):
            raise InputError(f"per-channel group {self.tokens!r}: expected a positive number of tokens or None")

    @property
    def group(self) -> int | None:
        return self.tokens

    @property
    def token_block(self) -> int | None:
        return self.tokens


@dataclass(frozen=True)
class PerToken(Granularity):
    """One (delta, min) per token and group of ``channels`` channels of D_model = H * D (head-major)."""

    channels: int
    axis: ClassVar[Axis] = Axis.TOKEN

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise InputError(f"per-token group {self.channels!r}: expected a positive number of channels")

    @property
    def group(self) -> int:
        return self.channels

    @property
    def token_block(self) -> int:
        return 1


def granularity(axis: str, group: int | None) -> Granularity:
    """The granularity named by an ``(axis, group)`` pair (``"tensor" | "channel" | "token"``, as
    ``KVQuantSpec.side`` returns them). Raises ``InputError`` for an unknown axis or a per-token group of None."""
    if axis == Axis.TENSOR:
        return PerTensor()
    if axis == Axis.CHANNEL:
        return PerChannel(group)
    if axis == Axis.TOKEN:
        if group is None:
            raise InputError("per-token grouping: expected a group size (channels of D_model), got None")
        return PerToken(group)
    raise InputError(f"grouping axis {axis!r}: expected tensor, channel or token")


def block_size(gran: Granularity, shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """``(block_size, flat)`` for quantizing a ``[B, H, N, D]`` tensor of ``shape`` with ``gran`` (see the
    module table). Raises ``InputError`` when the groups do not tile the shape (N not a multiple of a
    per-channel group, D_model not a multiple of a per-token group) or the shape is not rank 4."""
    if len(shape) != 4:
        raise InputError(f"KV tensor shape {tuple(shape)}: expected rank 4 [B, H, N, D]")
    _, h, n, d = shape
    if isinstance(gran, PerTensor):
        return (1, h, n, d), False
    if isinstance(gran, PerChannel):
        g = n if gran.tokens is None else gran.tokens
        if n % max(g, 1):
            raise InputError(f"per-channel group {g}: {n} tokens is not a multiple of it")
        return (1, 1, g, 1), False
    if isinstance(gran, PerToken):
        g = gran.channels
        if (h * d) % g:
            raise InputError(f"per-token group size {g}: D_model = H*D = {h}*{d} = {h * d} is not a "
                             f"multiple of it")
        if d % g == 0:
            return (1, 1, 1, g), False
        if g % d == 0:
            return (1, g // d, 1, d), False
        return (1, 1, 1, g), True
    raise InputError(f"granularity {gran!r}: expected PerTensor, PerChannel or PerToken")
