"""The rotation of a tensor in its layout, with an exact backward that saves no activation.

The backward of a rotation by theta is the rotation by -theta: ``_Rope.backward`` rotates the incoming
gradient with the sine negated, by calling ``_Rope`` again (so double backward works too). It saves only the
tables, which are alive anyway, and the integer positions; the angles of each token are looked up again.
"""

from __future__ import annotations

import sys

import torch

from ._errors import FlexRopeError
from ._fused import fused_rotation
from ._layout import Layout
from ._positions import angles_at
from . import _rotation
from ._rotation import over_pairs, rotate, rotated


def rotate_in_layout(
    x: torch.Tensor,
    layout: Layout,
    cos: torch.Tensor,
    sin: torch.Tensor,
    where: int | torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
    inplace: bool,
    inverse: bool = False,
) -> torch.Tensor:
    """Rotate ``x`` (laid out as ``layout``) by the angles at ``where`` (an int start or positions), with
    ``cos`` and ``sin`` the full tables; by the negated angles when ``inverse``."""
    x_c = layout.canonical(x)
    seq_len, half = x_c.shape[-2], rotary_dim // 2
    if not inplace and x.numel() <= _rotation.SMALL_ELEMENTS and x.is_contiguous() and x_c.is_contiguous():
        # Few tokens (decoding): per-call overhead dominates, so the fewest operations, into a new tensor
        # whose memory order (canonical order, here also x's) is x's. Seed-format tables already hold
        # the half-split angles over all r channels.
        if not interleaved and cos.shape[-1] == rotary_dim:
            cos2, sin2 = angles_at(cos, where, seq_len, rotary_dim), angles_at(sin, where, seq_len, rotary_dim)
        else:
            cos2 = over_pairs(angles_at(cos, where, seq_len, half), interleaved)
            sin2 = over_pairs(angles_at(sin, where, seq_len, half), interleaved)
        out = rotated(x_c, cos2, -sin2 if inverse else sin2, rotary_dim, interleaved)
        return out if x_c is x else out.as_strided(x.shape, x.stride())
    cos, sin = angles_at(cos, where, seq_len, half), angles_at(sin, where, seq_len, half)
    if inverse:
        sin = -sin
    if not inplace:
        fused = fused_rotation(x, x_c, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved)
        if fused is not None:
            return fused
    out = x if inplace else torch.empty_like(x)
    out_c = x_c if inplace else layout.canonical(out)
    rotate(x_c, out_c, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, positions, offset, layout, rotary_dim, interleaved, inplace, inverse):
        where = offset if positions is None else positions
        out = rotate_in_layout(
            x, layout, cos, sin, where, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace,
            inverse=inverse,
        )
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, positions)
        ctx.offset, ctx.layout, ctx.rotary_dim, ctx.interleaved = offset, layout, rotary_dim, interleaved
        ctx.inverse = inverse
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        grad_x = _Rope.apply(
            grad, cos, sin, positions, ctx.offset, ctx.layout, ctx.rotary_dim, ctx.interleaved, False,
            not ctx.inverse,
        )
        return grad_x, None, None, None, None, None, None, None, None, None


def rope(
    x: torch.Tensor,
    layout: Layout,
    cos: torch.Tensor,
    sin: torch.Tensor,
    where: int | torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
    inplace: bool,
) -> torch.Tensor:
    """Rotate ``x``, through autograd when a gradient is needed; a DTensor shard by shard."""
    dtensor = _dtensor_class(x)
    if dtensor is not None:
        return _rope_dtensor(dtensor, x, layout, cos, sin, where, rotary_dim=rotary_dim,
                             interleaved=interleaved, inplace=inplace)
    if not torch.is_grad_enabled() or not (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return rotate_in_layout(
            x, layout, cos, sin, where, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace
        )
    if cos.requires_grad or sin.requires_grad:
        raise FlexRopeError("the cos/sin tables require grad: gradients flow to x only; detach the tables")
    if inplace and x.is_leaf:
        raise FlexRopeError(
            "inplace=True on a leaf tensor that requires grad: autograd cannot overwrite it; "
            "pass inplace=False, or rotate a tensor computed from it"
        )
    positions = where if isinstance(where, torch.Tensor) else None
    offset = where if isinstance(where, int) else 0
    return _Rope.apply(x, cos, sin, positions, offset, layout, rotary_dim, interleaved, inplace, False)


def _dtensor_class(x: torch.Tensor):
    # Only code that made a DTensor has imported torch.distributed.tensor: no import here for anyone else.
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None and isinstance(x, module.DTensor) else None


def _rope_dtensor(dtensor, x, layout: Layout, cos, sin, where, **kwargs) -> torch.Tensor:
    """Rotate each rank's local shard: exact when no shard cuts the sequence or the head dim."""
    entries = layout.entry_of_dim(x.ndim)
    for placement in x.placements:
        if placement.is_partial():
            raise FlexRopeError(f"x is a DTensor with a partial placement ({placement}): reduce it first")
        if placement.is_shard():
            entry = entries[placement.dim]
            if "s" in entry or "d" in entry:
                axis = "s (sequence)" if "s" in entry else "d (head dim)"
                raise FlexRopeError(
                    f"x is a DTensor sharded along dim {placement.dim}, which holds {axis}: shard along batch or "
                    f"heads, or rotate the local shards with context_parallel_positions"
                )
            if "b" in entry and isinstance(where, torch.Tensor) and where.ndim == 2 and where.shape[0] > 1:
                raise FlexRopeError(
                    f"x is a DTensor sharded along dim {placement.dim} (batch) with per-row positions: rotate "
                    f"the local shards with their own rows of positions"
                )
    local = rope(x.to_local(), layout, cos, sin, where, **kwargs)
    if kwargs["inplace"]:
        return x
    return dtensor.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
