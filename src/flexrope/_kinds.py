"""Which tensors flexrope takes, which a kernel may read through a pointer, and which may be written in place.

- ``check_layout``: sparse, nested and other non-strided tensors are refused with what to do instead.
- ``plain``: a plain dense strided tensor whose values sit in its own memory (no ``__torch_dispatch__``
  subclass such as a fake or logging tensor, no ``vmap`` / ``grad`` / functionalization wrapper, no negation
  bit). Only these reach the C loop and the Triton kernel; every other tensor takes the eager path, which
  dispatches through torch.
- ``overlaps``: whether two elements of a strided view share memory, decided exactly.
"""

from __future__ import annotations

import itertools
import math

import torch

from ._errors import FlexRopeError

# module globals, not attribute lookups: plain() is asked of every tensor of every call
_Tensor, _Parameter, _strided = torch.Tensor, torch.nn.Parameter, torch.strided
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_functional = torch._is_functional_tensor
_LISTED = 1 << 22  # offsets listed at once (32 MiB)


def check_layout(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor that is not dense and strided, naming its layout and what to do instead."""
    if t.layout is _strided and not t.is_nested:
        return
    if t.is_nested:
        what, hint = "a nested tensor", "rotate each of its tensors (t.unbind()) or pad it (t.to_padded_tensor(0))"
    elif t.layout is torch._mkldnn:
        what, hint = "an mkldnn tensor", "convert it with t.to_dense()"
    else:
        what, hint = f"a {t.layout} tensor", "convert it with t.to_dense()"
    raise FlexRopeError(f"{name} is {what}: only dense strided tensors are supported; {hint}")


def plain(t: torch.Tensor) -> bool:
    """Whether a kernel may read ``t`` through its data pointer (written to cost little: every call asks)."""
    kind = type(t)
    return ((kind is _Tensor or kind is _Parameter) and t.layout is _strided
            and not (_wrapped(t) or t.is_neg() or _functional(t)))


def overlapping(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` share memory. A vmap or grad wrapper: not told here (its strides are the
    logical ones), the in-place operations it runs check their own memory."""
    if _wrapped(x):
        return False
    overlap = torch._debug_has_internal_overlap(x)  # 0 none, 1 some, 2 too hard for torch to tell
    return overlap == 1 or overlap == 2 and overlaps(x.shape, x.stride())


def overlaps(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of a view of ``shape`` and ``stride`` sit at the same memory offset, exactly.

    Sorted by stride, dims whose stride exceeds the span of all smaller ones prove no overlap (every dense,
    transposed, stepped or padded view); a repeated stride 0 or more elements than offsets in the span prove
    one. What is left (rare: dims interleaved into each other's gaps) is decided by listing its offsets.
    """
    dims = sorted((st, n) for n, st in zip(shape, stride) if n != 1)
    if any(n == 0 for _, n in dims):
        return False  # no element at all
    span = 0  # the largest offset reached by the dims so far
    for i, (st, n) in enumerate(dims):
        if st <= span or st == 0:
            break
        span += st * (n - 1)
    else:
        return False
    total = sum(st * (n - 1) for st, n in dims)
    if any(st == 0 for st, _ in dims) or math.prod(n for _, n in dims) > total + 1:
        return True  # a stride 0 along a dim of several elements, or more elements than offsets
    while dims:  # a largest stride beyond the span of all others cannot collide: only the others can
        rest = total - dims[-1][0] * (dims[-1][1] - 1)
        if dims[-1][0] <= rest:
            break
        dims.pop()
        total = rest
    return len(dims) > 1 and _listed_overlap(dims, total)


def _listed_overlap(dims: list[tuple[int, int]], total: int) -> bool:
    """Whether offsets repeat: all of them at once where few, else a slice of the outer dims at a time against
    a map of the offsets seen (its size bounded by the memory the view spans)."""
    offsets, outer = torch.zeros(1, dtype=torch.int64), list(dims)
    while outer and offsets.numel() * outer[0][1] <= _LISTED:
        st, n = outer.pop(0)
        offsets = (offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st).flatten()
    if offsets.numel() != torch.unique(offsets).numel():
        return True
    if not outer:
        return False
    seen = torch.zeros(total + 1, dtype=torch.bool)
    for index in itertools.product(*(range(n) for _, n in outer)):
        at = offsets + sum(i * st for i, (st, _) in zip(index, outer))
        if seen[at].any():
            return True
        seen[at] = True
    return False
