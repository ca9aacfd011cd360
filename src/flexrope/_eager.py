"""The eager backends, on canonical ``(*lead, b, h, s, d)`` views: chunked kernels and a few-op path.

Every output element is computed by the same rounded float32 (or float64) operations in every layout and
on every path (``_pairs``), so results are bitwise independent of the layout and of the chunking.

RoPE is memory-bound: the least it can cost is one read of x and one write of the result. Six elementwise
operations over the whole tensor would read and write it many times over, so the eager path walks the tensor
in memory order, in chunks small enough that the intermediates stay in cache. A half-precision chunk is
converted to float32 once, rotated there, and converted back once.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ._kinds import plain
from ._pairs import as_dtype, broadcast_to, compute_dtype, expression, memory_order, over_pairs, pair_views

# Elements of x per chunk, at most. Each elementwise operation has a fixed cost, so chunks are large, but the
# chunk's inputs, outputs and float32 scratch stay within the last-level cache: x is read from memory once
# and the result written once. On a 2-core CPU 2^20 elements ran 2-3x faster than 2^16. A tensor of at most
# CHUNK_ELEMENTS is one chunk (it fits in cache whole); a larger one is cut into chunks of at most 1/16 of it
# (and at least MIN_CHUNK_ELEMENTS), so that the scratch stays a small fraction of x's size.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_ELEMENTS = 1 << 16
# Up to this many elements a call is latency-bound (a decoding step): the fewest operations win.
SMALL_ELEMENTS = 1 << 14


@functools.lru_cache(maxsize=64)
def _pair_signs(rotary_dim: int, interleaved: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-1 on the first channel of each pair, +1 on the second."""
    signs = torch.tensor([-1.0, 1.0], dtype=dtype, device=device)
    return signs.repeat(rotary_dim // 2) if interleaved else signs.repeat_interleave(rotary_dim // 2)


def _swap_pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """(b, a) in the place of each pair (a, b)."""
    if interleaved:
        return x.unflatten(-1, (rotary_dim // 2, 2)).flip(-1).flatten(-2)
    return x.roll(rotary_dim // 2, -1)


def rotated(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, rotary_dim: int, interleaved: bool):
    """The rotation of canonical view ``x`` as a new contiguous tensor of x's dtype, in the fewest operations
    (for small, latency-bound calls): ``x * cos2 + swap(x) * signed(sin2)``, where swap puts (b, a) in the
    place of each pair (a, b), signed negates the sine on each pair's first channel, and cos2, sin2 hold the
    angles over all r channels like the pairs. The rounded operations are those of the other paths:
    a cos + b (-sin) equals a cos - b sin exactly."""
    compute = compute_dtype(x.dtype)
    head = as_dtype(x if rotary_dim == x.shape[-1] else x.narrow(-1, 0, rotary_dim), compute)
    signs = _pair_signs(rotary_dim, interleaved, compute, x.device)
    signed_sin2 = as_dtype(sin2, compute) * signs
    out = head * as_dtype(cos2, compute) + _swap_pairs(head, rotary_dim, interleaved) * signed_sin2
    if rotary_dim < x.shape[-1]:
        out = torch.cat([out, as_dtype(x.narrow(-1, rotary_dim, x.shape[-1] - rotary_dim), compute)], dim=-1)
    return as_dtype(out, x.dtype)


def _chunks(shape: torch.Size) -> list[tuple]:
    """Index tuples that cut a tensor of ``shape`` into blocks of about the chunk size, each of consecutive
    outer indices (whole trailing dims, a slice of one dim, single indices of the dims before it)."""
    numel = shape.numel()
    limit = numel if numel <= CHUNK_ELEMENTS else min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, numel // 16))
    inner, split = shape[-1], len(shape) - 1
    while split > 0 and inner * shape[split - 1] <= limit:
        split -= 1
        inner *= shape[split]
    if split == 0:
        return [()]
    step = max(1, limit // inner)
    heads = itertools.product(*(range(n) for n in shape[: split - 1]))
    return [(*head, slice(i, i + step)) for head in heads for i in range(0, shape[split - 1], step)]


class _Scratch:
    """Reusable work buffers of the compute dtype, one per (name, shape)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.buffers = dtype, device, {}

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor:
        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.buffers[key]


def _rotate_half_split(x, out, cos, sin, scratch: _Scratch) -> None:
    """out = rotation of x (a block, channels last, r of them, pairs (i, i + r/2)); out may be x."""
    a, b = pair_views(x, x.shape[-1], False)
    out_a, out_b = pair_views(out, x.shape[-1], False)
    t1, t2, t3 = (scratch(name, a.shape) for name in ("t1", "t2", "t3"))
    torch.mul(a, sin, out=t1)
    torch.mul(b, sin, out=t2)
    torch.mul(a, cos, out=t3)
    torch.sub(t3, t2, out=out_a)  # a is not read after this: out_a may be a
    torch.mul(b, cos, out=t3)
    torch.add(t3, t1, out=out_b)


def _rotate_interleaved(x, out, cos2, signed_sin2, scratch: _Scratch) -> None:
    """out = x * cos2 + swap(x) * signed_sin2 for pairs (2i, 2i + 1); out may be x.

    cos2 holds each pair's cos twice and signed_sin2 its (-sin, +sin), so two of the four operations run
    over contiguous channels (the pair views have stride 2 and run slower). The rounded operations are those
    of the half-split path: a cos + (-(b sin)) equals a cos - b sin exactly.
    """
    a, b = pair_views(x, x.shape[-1], True)
    swapped, product = scratch("swapped", x.shape), scratch("product", x.shape)
    swapped_a, swapped_b = pair_views(swapped, x.shape[-1], True)
    sin_a, sin_b = pair_views(signed_sin2, x.shape[-1], True)
    torch.mul(b, sin_a, out=swapped_a)
    torch.mul(a, sin_b, out=swapped_b)
    torch.mul(x, cos2, out=product)
    torch.add(product, swapped, out=out)


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
    compute = compute_dtype(x.dtype)
    cos, sin = as_dtype(cos, compute), as_dtype(sin, compute)
    # inside the caller's graph: one expression, fused with the rest. A subclass or a vmap / grad wrapper: the same
    # expression, whole-tensor operations it sees (the blocks below write into plain scratch tensors)
    if torch.compiler.is_compiling() or not (plain(x) and plain(cos) and plain(sin)):
        out.copy_(expression(x, cos, sin, rotary_dim, interleaved))
        return
    if out is not x and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    order = memory_order(x)
    x, out = x.permute(order)[..., :rotary_dim], out.permute(order)[..., :rotary_dim]
    if interleaved:
        kernel, angles_shape = _rotate_interleaved, x.shape
        cos, sin = over_pairs(cos, True), over_pairs(sin, True, signed=True)
    else:
        kernel, angles_shape = _rotate_half_split, (*x.shape[:-1], rotary_dim // 2)
    cos, sin = (broadcast_to(t, x.ndim).permute(order).expand(angles_shape) for t in (cos, sin))
    scratch = _Scratch(compute, x.device)
    for index in _chunks(x.shape):
        if x.dtype == compute:
            kernel(x[index], out[index], cos[index], sin[index], scratch)
        else:  # mixed-precision operations run at half the speed: convert the block once each way
            work = scratch("work", x[index].shape)
            work.copy_(x[index])
            kernel(work, work, cos[index], sin[index], scratch)
            out[index].copy_(work)
