"""The rules every backend shares, each written once: which channels pair up, the dtype the rotation is
computed in, and the rotation as one expression.

Each pair (a, b) of channels becomes ``(a cos - b sin, b cos + a sin)``. Half-split pairing takes channel i
with i + r/2 (NeoX, Hugging Face); interleaved takes 2i with 2i + 1 (Meta, GPT-J). Half precision is rotated
in float32, float64 in float64: every backend rounds the same operations in the same dtype, so results are
bitwise the same on every path and in every layout.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is rotated in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def pair_views(t: torch.Tensor, rotary_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the second channel of every pair, as views of ``t``'s first ``rotary_dim`` channels."""
    # narrow/unflatten/unbind rather than indexing: these run per call, and indexing costs microseconds
    if rotary_dim != t.shape[-1]:
        t = t.narrow(-1, 0, rotary_dim)
    if interleaved:
        return t.unflatten(-1, (rotary_dim // 2, 2)).unbind(-1)
    return t.unflatten(-1, (2, rotary_dim // 2)).unbind(-2)


def over_pairs(angles: torch.Tensor, interleaved: bool, *, signed: bool = False) -> torch.Tensor:
    """Half-width angles (..., r/2) laid out over all r channels like the pairs; ``signed`` negates them on
    each pair's first channel."""
    first = -angles if signed else angles
    if interleaved:
        return torch.stack([first, angles], dim=-1).flatten(-2)
    return torch.cat([first, angles], dim=-1)


def expression(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    """The rotation of ``x`` as one expression for compilers: ``x * cos + flip(x) * signed sin`` over each
    pair, computed in cos's dtype, returned in x's. Inductor fuses this form into one vectorised loop in
    every dtype (concatenating or stacking the two rotated halves ran 2-3x slower in bfloat16). The rounded
    operations are those of the eager kernels: a cos + b (-sin) equals a cos - b sin exactly."""
    compute = cos.dtype
    pair_dim = -1 if interleaved else -2
    shape = (rotary_dim // 2, 2) if interleaved else (2, rotary_dim // 2)
    pairs = x[..., :rotary_dim].unflatten(-1, shape).to(compute)
    cos2, sin2 = torch.stack([cos, cos], dim=pair_dim), torch.stack([-sin, sin], dim=pair_dim)
    rotated = (pairs * cos2 + pairs.flip(pair_dim) * sin2).flatten(-2)
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat([rotated, x[..., rotary_dim:].to(compute)], dim=-1)
    return rotated.to(x.dtype)


def broadcast_to(table: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table`` with leading unit dims up to ``ndim``, so the memory-order permutation applies to it."""
    return table.reshape((1,) * (ndim - table.ndim) + tuple(table.shape))


def memory_order(x: torch.Tensor) -> list[int]:
    """A permutation of x's dims, outermost in memory first, the channel dim last."""
    return sorted(range(x.ndim - 1), key=lambda dim: -x.stride(dim)) + [x.ndim - 1]
