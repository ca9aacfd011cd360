"""A fused rotation through ``torch.compile`` for large out-of-place calls.

The eager kernels run six elementwise operations per chunk. In cache that still costs about three times a
copy of x, whereas one fused loop reads x once and writes the result once. Inductor writes that loop
(vectorised C++ on the CPU, Triton on a GPU) from ``fused_expression``, whose rounded operations are those of
the other paths, so the results are bitwise the same (tested on the CPU).

Each variant (pairing, rank, which table dims broadcast, dtype) is compiled once per process, with dynamic
shapes so that no new sequence length recompiles it; the first large call of a variant takes seconds. Where
no compiler works the eager kernels are used, with one warning. ``FLEXROPE_COMPILE=0`` turns this path off.
In-place calls stay eager: they allocate nothing and already run below the cost of ``x.clone()``.
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from ._rotation import _as, _broadcast_to, _memory_order, fused_expression

# From this many elements a call is worth a compiled kernel; below, the eager kernels' cost is small.
FUSED_MIN_ELEMENTS = 1 << 20
ENABLED = os.environ.get("FLEXROPE_COMPILE", "1") != "0"
_kernels: dict[tuple, object] = {}
_unavailable = False


def _kernel_template(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return fused_expression(x, cos, sin, ROTARY_DIM, INTERLEAVED)  # noqa: F821 - globals of each variant


def _kernel(key: tuple, rotary_dim: int, interleaved: bool):
    # rotary_dim and interleaved are globals of each variant's function, which dynamo treats as constants:
    # passed as arguments or closure cells they became symbolic, and inductor stopped vectorising the
    # bfloat16 loop (6x slower). torch.compile keeps its cache and recompile limit per code object: one
    # code object per variant.
    kernel = _kernels.get(key)
    if kernel is None:
        code = _kernel_template.__code__.replace(co_name=f"flexrope_fused_{len(_kernels)}")
        scope = {**_kernel_template.__globals__, "ROTARY_DIM": rotary_dim, "INTERLEAVED": interleaved}
        kernel = _kernels[key] = torch.compile(types.FunctionType(code, scope, code.co_name), dynamic=True,
                                               fullgraph=True)
    return kernel


def fused_rotation(x: torch.Tensor, x_c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int,
                   interleaved: bool) -> torch.Tensor | None:
    """The rotation of ``x`` (canonical view ``x_c``) as a new tensor laid out in memory like x, or None when
    this path does not apply (small, not dense with channels innermost, no compiler)."""
    global _unavailable
    if (
        not ENABLED
        or _unavailable
        or x.numel() < FUSED_MIN_ELEMENTS
        or torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0  # fake tensors, flop counters: they see eager operations
    ):
        return None
    order = _memory_order(x_c)
    x_m = x_c.permute(order)
    if not x_m.is_contiguous():
        return None
    compute = torch.promote_types(x.dtype, torch.float32)
    cos_m, sin_m = (_as(_broadcast_to(t, x_c.ndim).permute(order), compute) for t in (cos, sin))
    key = (interleaved, rotary_dim, x_m.ndim, x.dtype, tuple(size == 1 for size in cos_m.shape))
    try:
        out_m = _kernel(key, rotary_dim, interleaved)(x_m, cos_m, sin_m)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager kernels
        _unavailable = True
        warnings.warn(
            f"flexrope: torch.compile failed here ({type(error).__name__}: {error}); large calls use the eager "
            f"kernels from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    # out_m is contiguous in x's memory order, so x's own strides describe it
    return out_m.as_strided(x.shape, x.stride())
