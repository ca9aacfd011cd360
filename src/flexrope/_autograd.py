"""The rotation of a tensor in its layout, with an exact backward that saves no activation.

The backward of a rotation by theta is the rotation by -theta: ``_Rope.backward`` rotates the incoming
gradient with the sine negated, by calling ``_Rope`` again (so double backward works too). It saves only the
tables, which are alive anyway, and the integer positions; the angles of each token are looked up again.
"""

from __future__ import annotations

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
    """Rotate ``x``, through autograd when a gradient is needed."""
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
