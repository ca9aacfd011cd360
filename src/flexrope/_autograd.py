"""The rotation of a tensor in its layout, with an exact backward that saves no activation.

The backward of a rotation by theta is the rotation by -theta: ``_Rope.backward`` rotates the incoming
gradient with the sine negated, by calling ``_Rope`` again (so double backward works too). It saves only the
tables, which are alive anyway, and the integer positions; the angles of each token are looked up again.
"""

from __future__ import annotations

import sys

import torch

from ._errors import FlexRopeError
from ._layout import Layout
from ._positions import angles_at
from ._rotation import rotate


def rotate_in_layout(
    x: torch.Tensor,
    layout: Layout,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    where: int | torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
    inplace: bool,
) -> torch.Tensor:
    """Rotate ``x`` (laid out as ``layout``) by the angles at ``where`` (an int start or positions)."""
    x_c = layout.canonical(x)
    out = x if inplace else torch.empty_like(x)
    out_c = x_c if inplace else layout.canonical(out)
    seq_len = x_c.shape[-2]
    cos, sin = angles_at(cos_half, where, seq_len), angles_at(sin_half, where, seq_len)
    rotate(x_c, out_c, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos_half, sin_half, positions, offset, layout, rotary_dim, interleaved, inplace):
        where = offset if positions is None else positions
        out = rotate_in_layout(
            x, layout, cos_half, sin_half, where, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace
        )
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos_half, sin_half, positions)
        ctx.offset, ctx.layout, ctx.rotary_dim, ctx.interleaved = offset, layout, rotary_dim, interleaved
        return out

    @staticmethod
    def backward(ctx, grad):
        cos_half, sin_half, positions = ctx.saved_tensors
        grad_x = _Rope.apply(
            grad, cos_half, -sin_half, positions, ctx.offset, ctx.layout, ctx.rotary_dim, ctx.interleaved, False
        )
        return grad_x, None, None, None, None, None, None, None, None


def rope(
    x: torch.Tensor,
    layout: Layout,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    where: int | torch.Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
    inplace: bool,
) -> torch.Tensor:
    """Rotate ``x``, through autograd when a gradient is needed; a DTensor shard by shard."""
    dtensor = _dtensor_class(x)
    if dtensor is not None:
        return _rope_dtensor(dtensor, x, layout, cos_half, sin_half, where, rotary_dim=rotary_dim,
                             interleaved=interleaved, inplace=inplace)
    if not torch.is_grad_enabled() or not (x.requires_grad or cos_half.requires_grad or sin_half.requires_grad):
        return rotate_in_layout(
            x, layout, cos_half, sin_half, where, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace
        )
    if cos_half.requires_grad or sin_half.requires_grad:
        raise FlexRopeError("the cos/sin tables require grad: gradients flow to x only; detach the tables")
    if inplace and x.is_leaf:
        raise FlexRopeError(
            "inplace=True on a leaf tensor that requires grad: autograd cannot overwrite it; "
            "pass inplace=False, or rotate a tensor computed from it"
        )
    positions = where if isinstance(where, torch.Tensor) else None
    offset = where if isinstance(where, int) else 0
    return _Rope.apply(x, cos_half, sin_half, positions, offset, layout, rotary_dim, interleaved, inplace)


def _dtensor_class(x: torch.Tensor):
    # Only code that made a DTensor has imported torch.distributed.tensor: no import here for anyone else.
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None and isinstance(x, module.DTensor) else None


def _rope_dtensor(dtensor, x, layout: Layout, cos_half, sin_half, where, **kwargs) -> torch.Tensor:
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
    local = rope(x.to_local(), layout, cos_half, sin_half, where, **kwargs)
    if kwargs["inplace"]:
        return x
    return dtensor.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
