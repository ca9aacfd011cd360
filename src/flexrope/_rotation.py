"""The rotation itself, on canonical ``(*lead, b, h, s, d)`` views.

Each pair (a, b) of channels becomes ``(a cos - b sin, b cos + a sin)``. Half-split pairing takes channel i
with i + r/2; interleaved takes 2i with 2i + 1. Both are the same arithmetic on a different view of the
channels, and each output element is computed by the same rounded operations in every layout, so results
are bitwise independent of the layout.
"""

from __future__ import annotations

import torch


def _pair_views(t: torch.Tensor, rotary_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    half = rotary_dim // 2
    if interleaved:
        pairs = t[..., :rotary_dim].unflatten(-1, (half, 2))
        return pairs[..., 0], pairs[..., 1]
    pairs = t[..., :rotary_dim].unflatten(-1, (2, half))
    return pairs[..., 0, :], pairs[..., 1, :]


def _rotate_pairs(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                  interleaved: bool) -> None:
    # dst may be src: both products with sin are taken before either half is overwritten.
    a, b = _pair_views(src, rotary_dim, interleaved)
    out_a, out_b = _pair_views(dst, rotary_dim, interleaved)
    b_sin, a_sin = b * sin, a * sin
    torch.mul(a, cos, out=out_a).sub_(b_sin)
    torch.mul(b, cos, out=out_b).add_(a_sin)


def _rotated_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                   interleaved: bool) -> torch.Tensor:
    """The rotated first ``rotary_dim`` channels as one expression, for compilers to fuse into one pass."""
    a, b = _pair_views(x, rotary_dim, interleaved)
    a, b = a.to(cos.dtype), b.to(cos.dtype)
    out_a, out_b = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        return torch.stack([out_a, out_b], dim=-1).flatten(-2)
    return torch.cat([out_a, out_b], dim=-1)


def rotate(
    x: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
) -> None:
    """Write the rotation of canonical view ``x`` into canonical view ``out`` (which may be ``x``).

    ``cos`` and ``sin`` hold the r/2 angles per position, broadcastable to (*lead, b, h, s, r/2). Inputs in
    half precision are rotated in float32; the channels past ``rotary_dim`` are copied unchanged.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(compute), sin.to(compute)
    if torch.compiler.is_compiling():
        out[..., :rotary_dim].copy_(_rotated_pairs(x, cos, sin, rotary_dim, interleaved))
    elif x.dtype == compute:
        _rotate_pairs(x, out, cos, sin, rotary_dim, interleaved)
    else:
        work = x[..., :rotary_dim].to(compute)
        _rotate_pairs(work, work, cos, sin, rotary_dim, interleaved)
        out[..., :rotary_dim].copy_(work)
    if out is not x and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
