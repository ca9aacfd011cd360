"""The rotation as an ``autograd.Function`` with an exact backward that saves no activation.

The backward of a rotation by theta is the rotation by -theta: ``Rope.backward`` rotates the incoming
gradients with the sine negated, by calling ``Rope`` again (so double backward works too). It saves only the
tables, which are alive anyway, and the integer positions; the angles of each token are looked up again.
One or two tensors (q and k) go through one Function, so a backend that rotates both in one launch does so
forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# The backends by name, as ``_dispatch`` registers them, each called with its name too: the Function is given a
# name, never a callable (torch.compile traces the backward with the names alone).
RUNNERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class Call:
    """What a call of :class:`Rope` does besides its tensors: the backend (by name), layout, rotary dim,
    pairing, whether in place, whether by the negated angles, and which positions tensors are row starts."""

    backend: str
    layout: object
    rotary_dim: int
    interleaved: bool
    inplace: bool
    inverse: bool
    row_starts: tuple[bool, ...]


class Rope(torch.autograd.Function):
    # forward apart from setup_context, and a vmap rule: torch.func.grad, jacrev and vmap run through it
    generate_vmap_rule = True

    @staticmethod
    def forward(call: Call, cos, sin, x, x_where, y=None, y_where=None):
        """Rotate x (and y): each ``where`` an int start or a tensor of positions (of row starts where
        ``call.row_starts`` says so). Explicit parameters, not ``*args``: torch.compile binds these."""
        xs, wheres = ((x,), (x_where,)) if y is None else ((x, y), (x_where, y_where))
        outs = RUNNERS[call.backend](call.layout, call.rotary_dim, call.interleaved, cos, sin, xs, wheres,
                                     call.row_starts, inplace=call.inplace, inverse=call.inverse,
                                     backend=call.backend)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, cos, sin, *operands = inputs
        xs, wheres = operands[0::2], operands[1::2]
        if call.inplace:
            ctx.mark_dirty(*(x for x in xs if x is not None))
        wheres = [w for x, w in zip(xs, wheres) if x is not None]
        tensors = [w for w in wheres if isinstance(w, torch.Tensor)]
        ctx.save_for_backward(cos, sin, *tensors)
        ctx.rotation = call
        ctx.starts = [None if isinstance(w, torch.Tensor) else w for w in wheres]

    @staticmethod
    def backward(ctx, *grads):
        cos, sin, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        wheres = [next(tensors) if start is None else start for start in ctx.starts]
        live = [i for i, grad in enumerate(grads) if grad is not None]
        flat = [item for i in live for item in (grads[i], wheres[i])]
        call = ctx.rotation
        back = Call(call.backend, call.layout, call.rotary_dim, call.interleaved, False, not call.inverse,
                    tuple(call.row_starts[i] for i in live))
        rotated = apply(back, cos, sin, *flat)
        rotated = rotated if isinstance(rotated, tuple) else (rotated,)
        out = [None] * len(grads)
        for i, grad in zip(live, rotated):
            out[i] = grad
        return (None,) * 3 + tuple(item for grad in out for item in (grad, None)) + (None, None) * (2 - len(out))


class RopeInGraph(torch.autograd.Function):
    """:class:`Rope` as torch.compile traces it: a forward given ctx (dynamo loses what a setup_context keeps
    for the backward)."""

    @staticmethod
    def forward(ctx, call: Call, cos, sin, x, x_where, y=None, y_where=None):
        out = Rope.forward(call, cos, sin, x, x_where, y, y_where)
        Rope.setup_context(ctx, (call, cos, sin, x, x_where, y, y_where), out)
        return out

    backward = staticmethod(Rope.backward)


def apply(call: Call, cos, sin, *operands):
    """Rotate through autograd: :class:`Rope`, or inside a compiled graph :class:`RopeInGraph`."""
    return (RopeInGraph if torch.compiler.is_compiling() else Rope).apply(call, cos, sin, *operands)
