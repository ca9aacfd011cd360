"""Which backend rotates a call, and why: the one place that decides.

A call reads: check the inputs, choose a backend, check the positions where that backend does not, then
run it (through autograd when a gradient is needed). The backends, each with the same signature:

- ``triton``: one Triton kernel for every layout, q and k in one launch, positions read and checked on the
  device (no host sync). The default for CUDA tensors when Triton is installed; under ``TRITON_INTERPRET=1``
  it also runs on CPU tensors when forced.
- ``traced``: inside a caller's ``torch.compile`` graph (off CUDA): the rotation as one expression that
  inductor fuses with the caller's code.
- ``native``: one C loop over x in memory order (``_native``), built on first use: the default for CPU
  calls, in place and out of place, large and small.
- ``compiled``: a loop written by ``torch.compile`` (``_compiled``); only when forced.
- ``eager``: chunked eager kernels in memory order (``_eager``); where the others do not apply.
- ``small``: where the C loop cannot be built, for small CPU calls out of place (a decoding step): the fewest
  whole-tensor operations.

``FLEXROPE_BACKEND`` (read at every call) forces one: ``auto`` (the default), ``triton``, ``native``,
``compiled`` or ``eager``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import NamedTuple

import einops
import torch

from . import _compiled, _eager, _native
from ._autograd import RUNNERS, Call, apply
from ._dtensor import DTENSOR_MODULE, check_shards, dtensor_class, from_local
from ._errors import FlexRopeError, described
from ._kinds import check_layout, overlapping, plain
from ._layout import Layout
from ._pairs import over_pairs
from ._positions import (RowStarts, Where, angles_at, assert_values_async, check_values, position_tensor,
                         values_on_host)

BACKENDS = ("auto", "triton", "native", "compiled", "eager")


class Rotation(NamedTuple):
    """What every tensor of one call shares: its layout, rotary dim and pairing."""

    layout: Layout
    rotary_dim: int
    interleaved: bool


# Looked up once (torch.compile cannot trace find_spec). The backend registers a torch.library.custom_op:
# torch >= 2.4.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "custom_op")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def requested_backend() -> str:
    name = os.environ.get("FLEXROPE_BACKEND") or "auto"
    if name not in BACKENDS:
        raise FlexRopeError(f"FLEXROPE_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def choose(x: torch.Tensor, *, inplace: bool, numel: int, into: bool = False) -> str:
    """The backend for a call on ``x`` (the largest of its tensors has ``numel`` elements; ``into``: written
    into tensors the caller gave): triton, traced, native, compiled, eager or small."""
    requested = requested_backend()
    cuda, compiling = x.is_cuda, torch.compiler.is_compiling()
    if requested == "auto" and not (cuda or compiling or _native.unavailable):
        return "native"  # the CPU, eagerly: the C loop wherever it builds (else, as forced eager, below)
    if requested == "triton":
        if not TRITON_INSTALLED:
            raise FlexRopeError("FLEXROPE_BACKEND=triton but triton is not installed (or torch is older than 2.4): "
                                "pip install triton")
        if not cuda and not (x.device.type == "cpu" and _interpreted()):
            raise FlexRopeError(
                f"FLEXROPE_BACKEND=triton with x on {x.device}: the Triton backend runs CUDA tensors, and CPU "
                f"tensors under TRITON_INTERPRET=1"
            )
        if cuda or not compiling:
            return "triton"
    elif cuda and requested == "auto" and TRITON_INSTALLED:
        return "triton"
    if compiling:
        return "traced"
    if requested in ("native", "compiled"):
        return requested
    # small mixes in cached constants: not for a subclass such as a fake tensor, which takes eager's expression
    return "small" if not (inplace or into) and numel <= _eager.SMALL_ELEMENTS and plain(x) else "eager"


def _canonical_out(layout: Layout, x: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = x if inplace else torch.empty_like(x)  # x's strides where x is dense
    return out, layout.canonical(out)


def _run_triton(layout, rotary_dim, interleaved, cos, sin, xs, wheres, row_starts, *, inplace, inverse, backend,
                into=None):
    from . import _triton

    device, compiling, operands, outs = xs[0].device, torch.compiler.is_compiling(), [], []
    if not (compiling or all(plain(t) for t in (cos, sin, *xs, *wheres, *(into or ()))
                             if isinstance(t, torch.Tensor))):
        # the kernel reads pointers: a subclass or vmap / grad wrapper (the forward of a vmap rule) runs eagerly
        return _run_each(layout, rotary_dim, interleaved, cos, sin, xs, wheres, row_starts, inplace=inplace,
                         inverse=inverse, backend="eager", into=into)
    for x, where, rows, given in zip(xs, wheres, row_starts, into or (None,) * len(xs)):
        if isinstance(where, torch.Tensor):  # read by the kernel on x's device (CPU positions are copied there)
            positions, start = where if where.device == device else where.to(device), 0
            mode = _triton.ROW_STARTS if rows else _triton.POSITIONS
        else:
            positions, start, mode = None, where, _triton.START
        if compiling:  # the kernel as an operator of the caller's graph
            out_c, ok = _triton.rotate_op(layout.canonical(x), cos, sin, positions, start, mode, rotary_dim,
                                          interleaved, inverse)
            if positions is not None:
                torch._assert_async(ok, f"flexrope: positions hold a position < 0 or >= {cos.shape[0]}")
            out = layout.from_canonical(out_c)
            target = x if inplace else given
            outs.append(out if target is None else target.copy_(out))
            continue
        out, out_c = (given, layout.canonical(given)) if given is not None else _canonical_out(layout, x, inplace)
        outs.append(out)
        if x.numel():  # an empty one has nothing to rotate (and the kernel's plan divides by each length)
            operands.append(_triton.Operand(out_c if inplace else layout.canonical(x), out_c, start, positions, mode))
    if compiling:
        return tuple(outs)
    ok = _triton.flag(device)
    together = len(operands) == 2 and xs[0].dtype == xs[1].dtype and (
        operands[0].x.shape[:-3] == operands[1].x.shape[:-3])  # the same lead and batch lengths
    for group in [operands] if together or len(operands) == 1 else [[op] for op in operands]:
        _triton.launch(group, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse,
                       inplace=inplace, ok=ok)
    for out in outs if inplace or into else ():  # written by the kernel: autograd must still see them change
        torch.autograd.graph.increment_version(out)
    if any(op.positions is not None for op in operands):
        _check_flag(ok, _positions_message(cos.shape[0]))
    return tuple(outs)


def _positions_message(table_len: int) -> str:
    return f"flexrope: positions hold a position < 0 or >= the table's {table_len} positions"


def _check_flag(ok: torch.Tensor, message: str) -> None:
    """Raise ``message`` where the kernel cleared the flag ``ok``: on the device without a sync."""
    if ok.device.type != "cpu":  # queued on the device: no sync
        torch._assert_async(ok, message)
        return
    try:  # Triton's interpreter: the flag is host memory, and the check is immediate
        torch._assert_async(ok, message)
    except RuntimeError:
        ok.fill_(1)
        raise FlexRopeError(message.removeprefix("flexrope: ")) from None


def _run_each(layout, rotary_dim, interleaved, cos, sin, xs, wheres, row_starts, *, inplace, inverse, backend,
              into=None):
    outs = []
    call_inplace = inplace
    for x, where, rows, given in zip(xs, wheres, row_starts, into or (None,) * len(xs)):
        x_c = layout.canonical(x)
        seq_len = x_c.shape[-2]
        out, inplace = None, call_inplace or given is x  # q_out=q beside k_out=cache: q in place
        given = None if given is x else given
        if given is not None:
            out, out_c = given, layout.canonical(given)
        if backend == "native":
            if out is None:
                out, out_c = (x, x_c) if inplace else _canonical_out(layout, x, False)
            if _native.rotate(x_c, out_c, cos, sin, RowStarts(where) if rows else where, rotary_dim=rotary_dim,
                              interleaved=interleaved, inverse=inverse):
                if inplace or given is not None:  # written through a pointer: autograd must still see it change
                    torch.autograd.graph.increment_version(out)
                outs.append(out)
                continue
        if not isinstance(where, int):
            where = position_tensor(RowStarts(where) if rows else where, seq_len)
        if backend == "small":
            outs.append(_small(layout, x, x_c, cos, sin, where, rotary_dim, interleaved, inverse))
            continue
        half = rotary_dim // 2
        c, s = angles_at(cos, where, seq_len, half), angles_at(sin, where, seq_len, half)
        if inverse:
            s = -s
        if backend == "compiled" and plain(x) and _compiled.applies(x, x_c):
            done = _compiled.rotate(x, x_c, c, s, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace,
                                    out_c=None if given is None else out_c)
            if done is not None:
                outs.append(done if given is None else given)
                continue
        if out is None:
            out, out_c = _canonical_out(layout, x, inplace)
        _eager.rotate(x_c, out_c, c, s, rotary_dim=rotary_dim, interleaved=interleaved)
        outs.append(out)
    return tuple(outs)


def _small(layout, x, x_c, cos, sin, where, rotary_dim, interleaved, inverse) -> torch.Tensor:
    """A small call (a decoding step): the fewest operations, into a new tensor laid out like x."""
    seq_len = x_c.shape[-2]
    if not interleaved and cos.shape[-1] == rotary_dim:  # seed-format tables hold the angles over all r channels
        cos2, sin2 = angles_at(cos, where, seq_len, rotary_dim), angles_at(sin, where, seq_len, rotary_dim)
    else:
        half = rotary_dim // 2
        cos2 = over_pairs(angles_at(cos, where, seq_len, half), interleaved)
        sin2 = over_pairs(angles_at(sin, where, seq_len, half), interleaved)
    rotated = _eager.rotated(x_c, cos2, -sin2 if inverse else sin2, rotary_dim, interleaved)
    if x_c is x:
        return rotated
    if x.is_contiguous() and rotated.stride() == x_c.stride():  # elementwise results keep x's memory order
        return rotated.as_strided(x.shape, x.stride())
    out, out_c = _canonical_out(layout, x, False)
    out_c.copy_(rotated)
    return out


RUNNERS.update(triton=_run_triton, traced=_run_each, native=_run_each, compiled=_run_each, eager=_run_each,
               small=_run_each)


def _check_inplace(x: torch.Tensor, asked: str = "inplace=True", instead: str = "pass inplace=False") -> None:
    """Refuse an in-place call (``asked``: how the caller asked for it; ``instead``: what to do) that would fail
    half-way, or write garbage, before anything is written."""
    compiling = torch.compiler.is_compiling()  # (a traced graph cannot ask these two: its in-place ops check)
    if not compiling and x.is_inference() and not torch.is_inference_mode_enabled():
        raise FlexRopeError(f"{asked} on an inference tensor outside inference_mode: {instead}, or rotate inside "
                            f"torch.inference_mode()")
    if torch.is_grad_enabled() and x.requires_grad:
        base = x._base if x._is_view() else x
        if base.is_leaf:
            what = "a view of a leaf tensor" if base is not x else "a leaf tensor"
            raise FlexRopeError(f"{asked} on {what} that requires grad: autograd cannot overwrite it; {instead}, "
                                f"or rotate a tensor computed from it")
    if not compiling and overlapping(x):
        raise FlexRopeError(f"{asked} on a tensor whose elements overlap in memory (shape {tuple(x.shape)}, "
                            f"strides {x.stride()}, e.g. expanded or unfolded): elements would be written more "
                            f"than once; {instead}")


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offset of every element of ``t`` (on the CPU, from its geometry alone)."""
    offsets = torch.full((), t.storage_offset(), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.flatten()


def storage_address(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (one for all its views), or None where it has no memory flexrope can read:
    a meta tensor, or a subclass whose storage is its own operations' concern (their writes check it)."""
    if t.is_meta:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # (a wrapper subclass: "an invalid python storage")
        return None


def _shares_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have an element in common: their address ranges first, then (only where those
    meet, e.g. views into one buffer of q, k and v) element by element."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    address = storage_address(a)
    if address is None or address != storage_address(b):
        return False
    ends = [(t.storage_offset(), t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
            for t in (a, b)]
    if ends[0][1] < ends[1][0] or ends[1][1] < ends[0][0]:
        return False
    return bool(torch.isin(_offsets(a), _offsets(b)).any())


def refuse_grad_into(out_name: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse writing into ``out_name`` where autograd would have to follow the result: one of ``named``
    ((name, tensor): the operand, the out, a norm's weight) requires grad and grad mode is on."""
    if not torch.is_grad_enabled():
        return
    who = next((name for name, t in named if t.requires_grad), None)
    if who is not None:
        raise FlexRopeError(
            f"{out_name}= with {who} requiring grad: functions with out= arguments do not support automatic "
            f"differentiation (as in torch); write into {out_name} under torch.no_grad() or "
            f"torch.inference_mode() (as a decoding step runs), or rotate without {out_name}= and copy")


def check_out(layout: Layout, x: torch.Tensor, out: object, x_name: str = "x", out_name: str = "out",
              indexed: bool = False, own_storages: bool = False) -> bool:
    """Check ``out`` as the tensor ``x``'s rotation is written into, before anything is written: True where it
    is ``x`` itself (the rotation is then in place). ``indexed``: written at the sequence indices of an
    out_index, so the sequence lengths may differ. ``own_storages``: the caller has seen that x and out are in
    different storages (then no element is looked for in both)."""
    if not isinstance(out, torch.Tensor):
        raise FlexRopeError(f"{out_name} is a {type(out).__name__}: expected a torch.Tensor of {x_name}'s shape")
    check_layout(out_name, out)
    if indexed:
        x_c, out_c = layout.canonical(x), layout.canonical(out)
        if out.ndim != x.ndim or x_c.shape[:-2] != out_c.shape[:-2] or x_c.shape[-1] != out_c.shape[-1]:
            raise FlexRopeError(
                f"{out_name} has shape {tuple(out.shape)} but {x_name} has {tuple(x.shape)}: with out_index= they "
                f"differ only in the sequence length of {layout.text!r}")
    elif out.shape != x.shape:
        raise FlexRopeError(
            f"{out_name} has shape {tuple(out.shape)} but {x_name} has {tuple(x.shape)}: pass a tensor (or a "
            f"slice of one, e.g. cache[:, n:n + s]) of {x_name}'s shape, laid out as {layout.text!r}")
    if out.dtype != x.dtype:
        raise FlexRopeError(f"{out_name} has dtype {out.dtype} but {x_name} has {x.dtype}: the rotation is written "
                            f"in {x_name}'s dtype; make {out_name} {x.dtype} (or convert after)")
    if out.device != x.device:
        raise FlexRopeError(f"{out_name} is on {out.device} but {x_name} is on {x.device}: keep both on one device")
    compiling = torch.compiler.is_compiling()  # a traced graph has no addresses: x itself is out is x there
    if out is x or not (compiling or own_storages) and (out.shape == x.shape and out.stride() == x.stride()
                                              and out.storage_offset() == x.storage_offset()
                                              and storage_address(x) is not None
                                              and storage_address(out) == storage_address(x)):
        if indexed:
            raise FlexRopeError(f"{out_name} is {x_name} itself with an out_index: its tokens would be overwritten "
                                f"while they are read; write into another tensor (e.g. the cache)")
        _check_inplace(x, f"{out_name}={x_name}", f"pass a tensor apart from {x_name} as {out_name}")
        return True
    refuse_grad_into(out_name, [(x_name, x), (out_name, out)])
    if compiling:
        return False
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise FlexRopeError(f"{out_name} is an inference tensor outside inference_mode: it cannot be written; "
                            f"write inside torch.inference_mode(), or pass another tensor")
    if not out.is_contiguous() and overlapping(out):
        raise FlexRopeError(f"{out_name} has elements that overlap in memory (strides {out.stride()}, e.g. "
                            f"expanded): each would be written more than once; pass a tensor of its own")
    if not own_storages and _shares_elements(x, out):
        raise FlexRopeError(
            f"{out_name} overlaps {x_name} in memory without being {x_name} itself (strides {out.stride()} and "
            f"{x.stride()}): {x_name} would be overwritten while it is read; pass "
            + ("a tensor apart from it" if indexed else f"{out_name}={x_name} to rotate in place, or a tensor apart "
                                                        f"from it"))
    if layout.permutation is None:
        view = einops.rearrange(out, layout.to_canonical, **dict(layout.lengths))
        if storage_address(view) != storage_address(out):
            raise FlexRopeError(f"{out_name} of strides {out.stride()} cannot be viewed as {layout.text!r} without "
                                f"a copy (its grouped axes are not adjacent in memory): pass a tensor whose "
                                f"grouped axes are")
    return False


def check_out_index(layout: Layout, x: torch.Tensor, out: torch.Tensor, index: object) -> torch.Tensor:
    """``out_index`` checked against x (one index per token: (s,) or (b, s)) and out's sequence length,
    broadcast to (b, s). On the CPU its values are checked here (and duplicates refused: which token would
    land there is not defined); on a GPU, and traced by torch.compile (where values are not known while
    tracing), an index past the end is an asynchronous assert (a RuntimeError when it runs), as positions are,
    and duplicates are not looked for (that would sync): which token lands there is then unspecified."""
    x_c, length = layout.canonical(x), layout.canonical(out).shape[-2]
    b, s = x_c.shape[-4], x_c.shape[-2]
    if isinstance(index, torch.Tensor):
        check_layout("out_index", index)
    if (not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype.is_complex
            or index.dtype == torch.bool or index.shape not in ((s,), (b, s))):
        raise FlexRopeError(f"out_index is a {described(index)}: expected an integer tensor ({s},) or ({b}, {s}), "
                            f"each token's sequence index in out")
    if index.device != x.device:
        raise FlexRopeError(f"out_index is on {index.device} but x is on {x.device}: move it with .to(x.device)")
    index = index.long().expand(b, s)
    if index.is_cpu and not torch.compiler.is_compiling():  # (traced: values are not known, as on a GPU)
        if index.numel() and int(index.max()) >= length:
            raise FlexRopeError(f"out_index holds {int(index.max())}, past out's sequence length {length}: "
                                f"indices must be < {length} (negative ones skip their token)")
        kept = index.masked_fill(index < 0, -1).sort(dim=1).values
        if bool(((kept[:, 1:] == kept[:, :-1]) & (kept[:, 1:] >= 0)).any()):
            raise FlexRopeError("out_index repeats an index within a row: two tokens would be written to one "
                                "place; give each token its own index (or a negative one to skip it)")
    else:
        torch._assert_async(index.max() < length if index.numel() else torch.ones((), dtype=torch.bool,
                                                                                   device=index.device),
                            f"flexrope: out_index holds an index >= out's sequence length {length}")
    return index


def write_at(layout: Layout, rotated: torch.Tensor, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write each token of ``rotated`` at its sequence index ``index`` (b, s) of ``out``, skipping negative
    ones; return out."""
    source = layout.canonical(rotated).movedim(-4, 0).movedim(-2, 1)  # (b, s, *lead, h, d)
    target = layout.canonical(out).movedim(-4, 0).movedim(-2, 1)
    rows, tokens = (index >= 0).nonzero(as_tuple=True)
    target[rows, index[rows, tokens]] = source[rows, tokens]
    return out


def triton_fused(layout: Layout, x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 where: Where, rotary_dim: int, interleaved: bool, inverse: bool = False,
                 gain: torch.Tensor | None = None, eps: float = 0.0, index: torch.Tensor | None = None) -> bool:
    """The QK-norm (``gain``: offset + weight in the compute dtype) and / or the write at out's sequence
    indices ``index`` (b, s), fused with the rotation in one Triton launch, where the Triton backend runs x
    (CUDA, or CPU tensors under its interpreter when forced); False, writing nothing, elsewhere. Positions and
    indices are checked on the device, as the kernel reads them."""
    requested = requested_backend()
    if not (requested == "triton" or x.is_cuda and requested == "auto") or not TRITON_INSTALLED:
        return False
    if torch.compiler.is_compiling() or not (x.is_cuda or _interpreted()) or not all(
            plain(t) for t in (x, out, cos, sin, gain, index, where) if isinstance(t, torch.Tensor)):
        return False
    from . import _triton

    if isinstance(where, RowStarts):
        positions, start, mode = where.starts, 0, _triton.ROW_STARTS
    elif isinstance(where, torch.Tensor):
        positions, start, mode = where, 0, _triton.POSITIONS
    else:
        positions, start, mode = None, where, _triton.START
    if positions is not None and positions.device != x.device:
        positions = positions.to(x.device)
    ok = _triton.flag(x.device)
    _triton.launch([_triton.Operand(layout.canonical(x), layout.canonical(out), start, positions, mode, gain, eps,
                                    index)], cos, sin, rotary_dim=rotary_dim, interleaved=interleaved,
                   inverse=inverse, inplace=False, ok=ok)
    torch.autograd.graph.increment_version(out)
    if positions is not None:
        _check_flag(ok, _positions_message(cos.shape[0]))
    if index is not None:
        _check_flag(_triton.index_flag(x.device),
                    f"flexrope: out_index holds an index >= out's sequence length {layout.canonical(out).shape[-2]}")
    return True


def rope_at(rotation: Rotation, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor, where: Where,
            out: torch.Tensor, index: torch.Tensor, *, table_len: int, inverse: bool = False,
            positions_checked: bool = False) -> torch.Tensor:
    """The rotation of ``x`` written at the sequence indices ``index`` (b, s) of ``out`` (both checked: check_out
    with indexed=True, check_out_index), negative ones skipped; out returned. On the CPU the C loop writes each
    row at its index in the one pass; elsewhere the rotation goes through a temporary."""
    if x.is_cpu and requested_backend() in ("auto", "native") and not torch.compiler.is_compiling():
        if not (isinstance(where, int) or positions_checked):
            _check_values(rotation.layout, x, where, table_len)
            positions_checked = True
        layout = rotation.layout
        if _native.rotate(layout.canonical(x), layout.canonical(out), cos, sin, where,
                          rotary_dim=rotation.rotary_dim, interleaved=rotation.interleaved, inverse=inverse,
                          out_index=index):
            torch.autograd.graph.increment_version(out)
            return out
    if triton_fused(rotation.layout, x, out, cos, sin, where, rotation.rotary_dim, rotation.interleaved, inverse,
                    index=index):
        return out
    rotated = rope(rotation, cos, sin, [(x, where)], inplace=False, table_len=table_len, inverse=inverse,
                   positions_checked=positions_checked)[0]
    return write_at(rotation.layout, rotated, out, index)


def rope(rotation: Rotation, cos: torch.Tensor, sin: torch.Tensor, operands: list[tuple[torch.Tensor, Where]], *,
         inplace: bool, table_len: int, inverse: bool = False, positions_checked: bool = False,
         outs: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """Rotate each (x, where) of ``operands`` (by the negated angles when ``inverse``): through autograd when
    a gradient is needed, a DTensor shard by shard. ``where`` is an int start, a tensor of positions or
    RowStarts, its shapes already checked; its values too where ``positions_checked`` (rows of per-token
    tables, which index them by construction). ``outs``: for each operand, None or the tensor (already
    checked by :func:`check_out`, not x itself) its rotation is written into, which is then returned."""
    if outs is not None and all(out is None for out in outs):
        outs = None
    if DTENSOR_MODULE in sys.modules and any(dtensor_class(x) is not None for x, _ in operands):
        if outs is not None:
            raise FlexRopeError("out= with a DTensor: rotate without out= (each shard is rotated where it lives)")
        return tuple(_rope_dtensor(rotation, cos, sin, x, where, inplace=inplace, table_len=table_len,
                                   inverse=inverse, positions_checked=positions_checked) for x, where in operands)
    x = operands[0][0]
    if inplace:
        for x_, _ in operands:
            _check_inplace(x_)
    numel = x.numel() if len(operands) == 1 else max(x_.numel() for x_, _ in operands)
    backend = choose(x, inplace=inplace, numel=numel, into=outs is not None)
    if outs is not None:  # straight to the backend: out= has no autograd, as in torch
        if torch.is_grad_enabled() and any(x_.requires_grad for x_, _ in operands):
            for (x_, _), out in zip(operands, outs):
                if out is not None:
                    refuse_grad_into("out", [("x", x_)])
            # q through autograd beside k into the cache: each on its own
            return tuple(rope(rotation, cos, sin, [operand], inplace=False, table_len=table_len, inverse=inverse,
                              positions_checked=positions_checked, outs=(out,))[0]
                         for operand, out in zip(operands, outs))
        for x_, where in operands:
            if not (isinstance(where, int) or positions_checked or backend == "triton"):
                _check_values(rotation.layout, x_, where, table_len)
        wheres = [where.starts if isinstance(where, RowStarts) else where for _, where in operands]
        rows = [isinstance(where, RowStarts) for _, where in operands]
        return RUNNERS[backend](*rotation, cos, sin, [x_ for x_, _ in operands], wheres, rows, inplace=False,
                                inverse=inverse, backend=backend, into=tuple(outs))
    if len(operands) == 1 and isinstance(operands[0][1], int):  # the common call, without the lists below
        grad = x.requires_grad
        if backend == "small" and not (grad or cos.requires_grad or sin.requires_grad):
            # a decoding step on the CPU: per-call overhead is all it costs, so straight to the few operations
            layout = rotation.layout
            return (_small(layout, x, layout.canonical(x), cos, sin, operands[0][1], rotation.rotary_dim,
                           rotation.interleaved, inverse),)
        xs, wheres, row_starts = (x,), (operands[0][1],), (False,)
    else:
        xs, wheres, row_starts, grad = [], [], [], False
        for x_, where in operands:
            if not (isinstance(where, int) or positions_checked or backend == "triton"):  # triton: on the device
                _check_values(rotation.layout, x_, where, table_len)
            rows = isinstance(where, RowStarts)
            xs.append(x_)
            wheres.append(where.starts if rows else where)
            row_starts.append(rows)
            grad = grad or x_.requires_grad
    if not (grad or cos.requires_grad or sin.requires_grad) or not torch.is_grad_enabled():
        return RUNNERS[backend](*rotation, cos, sin, xs, wheres, row_starts, inplace=inplace, inverse=inverse,
                                backend=backend)
    if cos.requires_grad or sin.requires_grad:
        raise FlexRopeError("the cos/sin tables require grad: gradients flow to x only; detach the tables")
    flat = [item for pair in zip(xs, wheres) for item in pair]
    out = apply(Call(backend, *rotation, inplace, inverse, tuple(row_starts)), cos, sin, *flat)
    return out if isinstance(out, tuple) else (out,)


def _check_values(layout: Layout, x: torch.Tensor, where: Where, table_len: int) -> None:
    """Position values: on the host where they live there, queued on the device where a read would sync."""
    seq_len = layout.canonical(x).shape[-2]
    if values_on_host(x):
        check_values(where, seq_len, table_len)
    else:
        assert_values_async(where, seq_len, table_len)


def _rope_dtensor(rotation, cos, sin, x, where, *, inplace, table_len, inverse, positions_checked):
    dtensor = dtensor_class(x)
    kwargs = dict(inplace=inplace, table_len=table_len, inverse=inverse, positions_checked=positions_checked)
    if dtensor is None:
        return rope(rotation, cos, sin, [(x, where)], **kwargs)[0]
    check_shards(x, rotation.layout, where)
    (local,) = rope(rotation, cos, sin, [(x.to_local(), where)], **kwargs)
    return x if inplace else from_local(dtensor, x, local)
