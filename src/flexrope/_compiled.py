"""The compiled backend: the rotation as one loop that ``torch.compile`` writes, for large CPU calls.

The eager kernels run several elementwise operations per chunk; one fused loop reads x once and writes the
result once. Inductor writes that loop (vectorised C++ on the CPU) from ``_pairs.expression``, whose rounded
operations are those of the other paths, so the results are bitwise the same (tested).

Each variant (pairing, rotary dim, rank, which table dims broadcast, dtype, in place or not) is compiled
once per process, with dynamic shapes; unit dims are dropped before the call, so no tensor shape adds a
guard and no sequence length recompiles. The first large call of a variant takes seconds. A compiler that
is missing or fails to compile turns this backend off for the process, with one warning; any other error
(out of memory, say) propagates as it is.
"""

from __future__ import annotations

import types

import torch

from ._errors import warn
from ._pairs import as_dtype, broadcast_to, compute_dtype, expression, memory_order

_kernels: dict[tuple, object] = {}
_compiled: set[tuple] = set()  # variants that compiled and ran
unavailable = False


def _out_of_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return expression(x, cos, sin, ROTARY_DIM, INTERLEAVED)  # noqa: F821 - globals of each variant


def _in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    x.copy_(expression(x, cos, sin, ROTARY_DIM, INTERLEAVED))  # noqa: F821 - globals of each variant


def _into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(expression(x, cos, sin, ROTARY_DIM, INTERLEAVED))  # noqa: F821 - globals of each variant


def _kernel(key: tuple, rotary_dim: int, interleaved: bool, inplace: bool):
    # rotary_dim and interleaved are globals of each variant's function, which dynamo treats as constants:
    # passed as arguments or closure cells they became symbolic, and inductor stopped vectorising the
    # bfloat16 loop (6x slower). torch.compile keeps its cache and recompile limit per code object: one
    # code object per variant.
    kernel = _kernels.get(key)
    if kernel is None:
        template = _into if key[-1] else _in_place if inplace else _out_of_place  # key[-1]: into a given out
        code = template.__code__.replace(co_name=f"flexrope_compiled_{len(_kernels)}")
        scope = {**template.__globals__, "ROTARY_DIM": rotary_dim, "INTERLEAVED": interleaved}
        kernel = _kernels[key] = torch.compile(types.FunctionType(code, scope, code.co_name), dynamic=True,
                                               fullgraph=True)
    return kernel


def applies(x: torch.Tensor, x_c: torch.Tensor) -> bool:
    """Whether the loop can run on ``x`` (canonical view ``x_c``): dense, channels innermost, in memory
    order, no fake tensors or modes that must see eager operations, a compiler not known to fail."""
    return (
        not unavailable
        and x.device.type == "cpu"
        and torch._C._len_torch_dispatch_stack() == 0  # fake tensors, flop counters: they see eager operations
        and x_c.permute(memory_order(x_c)).is_contiguous()
    )


def rotate(x: torch.Tensor, x_c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int,
           interleaved: bool, inplace: bool, out_c: torch.Tensor | None = None) -> torch.Tensor | None:
    """The rotation of ``x`` (canonical view ``x_c``; ``cos``, ``sin`` the angles (s, r/2) or (b, 1, s, r/2))
    written into x, into ``out_c`` (a canonical view of any strides, in the same loop) or into a new tensor
    laid out in memory like x; None once the compiler has failed."""
    global unavailable
    order = memory_order(x_c)
    compute = compute_dtype(x.dtype)
    x_m = x_c.permute(order)
    # contiguous tables: a table's strides (a slice of a wider table, or rows built per call) would otherwise
    # be a guard, and a variant seen with two of them recompiles into a slower loop with symbolic strides
    cos_m, sin_m = (as_dtype(broadcast_to(t, x_c.ndim).permute(order), compute).contiguous() for t in (cos, sin))
    # unit dims of x would each add a guard (and a graph) under dynamic shapes: drop them
    keep = [dim for dim in range(x_m.ndim) if x_m.shape[dim] != 1 or dim == x_m.ndim - 1]
    x_m, cos_m, sin_m = (t.squeeze([d for d in range(t.ndim) if d not in keep]) for t in (x_m, cos_m, sin_m))
    into = out_c is not None
    key = (interleaved, rotary_dim, x_m.ndim, x.dtype, inplace, tuple(size == 1 for size in cos_m.shape), into)
    try:
        kernel = _kernel(key, rotary_dim, interleaved, inplace)
        if into:  # out's strides become guards of this variant: one graph per cache geometry
            out_m = out_c.permute(order)
            kernel(x_m, cos_m, sin_m, out_m.squeeze([d for d in range(out_m.ndim) if d not in keep]))
        else:
            out_m = kernel(x_m, cos_m, sin_m)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - a variant that never compiled: the compiler does not work here
        if key in _compiled:
            raise
        unavailable = True
        warn(f"torch.compile failed here ({type(error).__name__}: {error}); large calls use the eager kernels "
             f"from now on", RuntimeWarning)
        return None
    _compiled.add(key)
    if inplace or into:
        return x
    # out_m is contiguous in x's memory order, so x's own strides describe it
    return out_m.as_strided(x.shape, x.stride())
