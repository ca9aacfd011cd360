"""A fused rotation through ``torch.compile`` for large out-of-place float32 and float64 calls.

The eager kernels run six elementwise operations per chunk. In cache that still costs about three times a
copy of x, whereas one fused loop reads x once and writes the result once. Inductor writes that loop
(vectorised C++ on the CPU, Triton on a GPU) from the same expression the other paths compute, with the same
rounded operations, so the results are bitwise the same (tested).

Each variant (pairing, rank, which table dims broadcast, dtype) is compiled once per process, with dynamic
shapes so that no new sequence length recompiles it; the first large call of a variant takes seconds. Where
no compiler works the eager kernels are used, with one warning. ``FLEXROPE_COMPILE=0`` turns this path off.
Half precision stays eager: inductor's bfloat16 loop ran slower than the chunked eager kernel on the CPUs
measured (see benchmarks/).
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from ._rotation import _as, _broadcast_to, _memory_order, _rotated_pairs

# From this many elements a call is worth a compiled kernel; below, the eager kernels' cost is small.
FUSED_MIN_ELEMENTS = 1 << 20
ENABLED = os.environ.get("FLEXROPE_COMPILE", "1") != "0"
_kernels: dict[tuple, object] = {}
_unavailable = False


def _expression(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    rotated = _rotated_pairs(x, cos, sin, rotary_dim, interleaved)
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat([rotated, _as(x[..., rotary_dim:], rotated.dtype)], dim=-1)
    return _as(rotated, x.dtype)


def _kernel(key: tuple):
    # torch.compile keeps its cache (and its recompile limit) per code object: one code object per variant
    kernel = _kernels.get(key)
    if kernel is None:
        code = _expression.__code__.replace(co_name=f"flexrope_fused_{len(_kernels)}")
        function = types.FunctionType(code, _expression.__globals__, code.co_name)
        kernel = _kernels[key] = torch.compile(function, dynamic=True, fullgraph=True)
    return kernel


def fused_rotation(x: torch.Tensor, x_c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int,
                   interleaved: bool) -> torch.Tensor | None:
    """The rotation of ``x`` (canonical view ``x_c``) as a new tensor laid out in memory like x, or None when
    this path does not apply (small, half precision, not dense with channels innermost, no compiler)."""
    global _unavailable
    if (
        not ENABLED
        or _unavailable
        or x.numel() < FUSED_MIN_ELEMENTS
        or x.dtype not in (torch.float32, torch.float64)
        or torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0  # fake tensors, flop counters: they see eager operations
    ):
        return None
    order = _memory_order(x_c)
    x_m = x_c.permute(order)
    if not x_m.is_contiguous():
        return None
    cos_m, sin_m = (_as(_broadcast_to(t, x_c.ndim).permute(order), x.dtype) for t in (cos, sin))
    key = (interleaved, x_m.ndim, x.dtype, tuple(size == 1 for size in cos_m.shape), rotary_dim == x.shape[-1])
    try:
        out_m = _kernel(key)(x_m, cos_m, sin_m, rotary_dim, interleaved)
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
