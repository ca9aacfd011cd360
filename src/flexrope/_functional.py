"""``compute_rope``: the rotation of a tensor in any declared layout."""

from __future__ import annotations

import weakref

import torch

import difflib

from ._dispatch import Rotation, _check_values, check_out, check_out_index, refuse_grad_into, rope, rope_at
from ._qknorm import check_norm, normed_rotation
from ._errors import FlexRopeError, LayoutError, described
from ._kinds import check_layout, plain
from ._layout import AXES, Binding, Layout, bind, parse_layout
from ._positions import Where, resolve_positions
from ._tables import check_rotary_dim

_KEYWORDS = ("positions", "offset", "interleaved", "rotary_dim", "inplace", "inverse", "out", "out_index",
             "norm_weight", "norm_eps", "norm_weight_offset")


def checked_tables(cos: object, sin: object, rotary_dim: int | None, head_dim: int, per_token: bool = False) -> int:
    """Check the tables against the head dim and return the rotary dim r.

    Tables are full width (length, r), seed format, or half width (length, r/2). With ``rotary_dim`` None
    r is the head dim; a table of width head_dim/2 is then refused as ambiguous (half-width tables for full
    rotary, or full-width tables for rotary_dim = head_dim/2).
    """
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.dtype.is_floating_point or table.ndim != 2:
            raise FlexRopeError(f"{name} is a {described(table)}: expected a floating tensor of shape (context_length, "
                                f"rotary_dim), or per-token tables (b, s, rotary_dim)")
        check_layout(name, table)
    if cos.shape != sin.shape:
        raise FlexRopeError(f"cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}: pass the pair made "
                            f"together")
    if cos.device != sin.device:
        raise FlexRopeError(f"cos is on {cos.device} but sin is on {sin.device}: keep both tables on one device")
    width = cos.shape[1]
    if rotary_dim is None and width * 2 == head_dim:
        raise FlexRopeError(
            f"tables of width {width} for head dim {head_dim} are ambiguous: pass rotary_dim={head_dim} for "
            f"half-width tables rotating every channel, or rotary_dim={width} for full-width tables of a "
            f"partial rotation"
        )
    rotary_dim = check_rotary_dim(head_dim, rotary_dim)
    half = rotary_dim // 2
    if width not in (rotary_dim, half):
        raise FlexRopeError(
            f"tables of width {width} fit neither rotary_dim={rotary_dim} (full width, seed format) nor "
            f"{half} (half width); make them with precompute_rope_params(head_dim, rotary_dim={rotary_dim})"
        )
    if width == rotary_dim and not (per_token and not cos.is_cpu):  # (those change every call: a check per call)
        _check_halves(cos, sin, half)
    return rotary_dim


_whole: dict[tuple[int, int], tuple] = {}  # (id(cos), id(sin)) -> both weakly, their versions: checked already


def _versions(cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, int] | None:
    """The tables' version counters (None for inference tensors, which keep none and are not written outside
    inference mode)."""
    try:
        return cos._version, sin._version
    except RuntimeError:
        return None


def _check_halves(cos: torch.Tensor, sin: torch.Tensor, half: int) -> None:
    """A full-width table is read as Hugging Face's ``cat((angles, angles))``: its first ``half`` columns. One
    whose halves differ (each angle repeated side by side, as GPT-J's and Meta-style ``repeat_interleave(2)``
    tables are) would turn most pairs by another pair's angle, silently: refused. Checked once per pair of
    tables and their versions (on a GPU, queued on the device without a sync, except per-token tables, new at
    every call; under torch.compile, or of a tensor whose values are not at hand, such as a fake tensor, not at
    all)."""
    if torch.compiler.is_compiling():
        return
    key = (id(cos), id(sin))
    seen = _whole.get(key)
    if seen is not None and seen[0]() is cos and seen[1]() is sin:
        try:
            if seen[2] == (cos._version, sin._version):
                return
        except RuntimeError:  # inference tensors
            if seen[2] is None:
                return
    if not (plain(cos) and plain(sin)) or cos.device.type == "meta" or cos.shape[0] == 0:
        return
    for name, table in (("cos", cos), ("sin", sin)):
        first, second = table[:, :half], table[:, half:]
        if not table.is_cpu:
            torch._assert_async((first == second).all(), f"flexrope: the two halves of the full-width {name} "
                                                          f"table differ (a table of angles repeated side by side?)")
        elif not torch.allclose(first, second, rtol=0.0, atol=0.0, equal_nan=True):  # (NaN: the caller's own)
            column = int((first != second).any(0).nonzero()[0])
            raise FlexRopeError(
                f"the two halves of the full-width {name} table differ (column {column}: "
                f"{first[:, column].tolist()[:3]}... against column {half + column}: {second[:, column].tolist()[:3]}"
                f"...): a full-width table is read as cat((angles, angles)), Hugging Face's format, its first {half} "
                f"columns. Tables with each angle repeated side by side (repeat_interleave(2, -1), GPT-J's and "
                f"Meta-style) are half-width tables spread out: pass cos[..., ::2] and sin[..., ::2], with "
                f"interleaved=True for pairs side by side")
    if len(_whole) >= 256:
        _whole.clear()
    _whole[key] = (weakref.ref(cos), weakref.ref(sin), _versions(cos, sin))


def per_token_tables(
    cos: torch.Tensor, sin: torch.Tensor, shape: Binding, positions: object, offset: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token tables (b or 1, s, width), as transformers' rotary modules return them, as the rows of one
    table and the positions that read each token's own row (None: rows 0 .. s - 1, for tables shared by
    every batch row)."""
    if not isinstance(sin, torch.Tensor) or sin.shape != cos.shape:
        what = tuple(sin.shape) if isinstance(sin, torch.Tensor) else type(sin).__name__
        raise FlexRopeError(f"cos has shape {tuple(cos.shape)} but sin has {what}: pass the pair made together")
    if positions is not None or isinstance(offset, torch.Tensor) or offset != 0:
        raise FlexRopeError("per-token tables (b, s, width) already hold each token's angles: drop positions= "
                            "and offset=")
    rows, seq_len = cos.shape[0], cos.shape[1]
    if rows not in (1, shape.b) or seq_len != shape.s:
        raise FlexRopeError(
            f"per-token tables of shape {tuple(cos.shape)}: expected (1, {shape.s}, width) or "
            f"({shape.b}, {shape.s}, width), one row per token of the s axis (and per row of the b axis)"
        )
    if rows == 1:  # one row of tables for every batch row: a plain table read from position 0
        return cos[0], sin[0], None
    where = torch.arange(rows * seq_len, device=cos.device)
    return cos.reshape(rows * seq_len, -1), sin.reshape(rows * seq_len, -1), where.view(rows, seq_len)


def checked_flag(name: str, flag: object) -> bool:
    """A yes/no argument as a bool: True, False (0, 1, numpy's booleans); a string is refused, since
    bool("false") is True."""
    if isinstance(flag, str) or flag not in (True, False):
        raise FlexRopeError(f"{name}={flag!r}: expected True or False")
    return bool(flag)


def _check_x(x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise FlexRopeError(f"x is a {type(x).__name__}: expected a torch.Tensor")
    check_layout("x", x)
    if not x.dtype.is_floating_point:
        raise FlexRopeError(f"x has dtype {x.dtype}: expected a real floating dtype (float32, bfloat16, ...)")
    if x.dtype.itemsize == 1:
        raise FlexRopeError(f"x has dtype {x.dtype}: float8 is a storage format with scales; rotate in bfloat16 "
                            f"or float32 and quantize after")


def _describe(x: object, layout: object, axes_lengths: dict) -> str:
    shape = f"x of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) and not x.is_nested else "x"
    keywords = "".join(f", {name}={value!r}" for name, value in axes_lengths.items())
    return f"compute_rope({shape}, layout={layout!r}{keywords})"


def parse(layout: object, axes_lengths: dict, keywords: tuple[str, ...] = _KEYWORDS) -> Layout:
    for name in axes_lengths:
        close = difflib.get_close_matches(name, keywords, n=1, cutoff=0.75) if name not in AXES else []
        if close:
            raise FlexRopeError(f"unknown keyword {name}=: did you mean {close[0]}=?")
    if not isinstance(layout, str):
        raise LayoutError(f"layout={layout!r}: expected a string such as 'b s h d'")
    return parse_layout(layout, tuple(sorted(axes_lengths.items())) if axes_lengths else ())


def bound(layout: Layout, x: torch.Tensor) -> Binding:
    _check_x(x)
    return bind(layout, tuple(x.shape))


def checked_positions(
    x: torch.Tensor, shape: Binding, cos: torch.Tensor, positions: torch.Tensor | None, offset: int | torch.Tensor,
    table_len: int | None = None,
) -> Where:
    """Where ``x``'s tokens are (an int start, positions or row starts), checked against ``x`` and the table
    (or ``table_len`` positions)."""
    if cos.device != x.device:
        raise FlexRopeError(f"x is on {x.device} but the tables are on {cos.device}: move them with .to(x.device)")
    return resolve_positions(positions, offset, seq_len=shape.s, batch=shape.b,
                             table_len=cos.shape[0] if table_len is None else table_len, device=x.device)


def compute_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "b h s d",
    *,
    positions: torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    inplace: bool = False,
    inverse: bool = False,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_weight_offset: float = 0.0,
    **axes_lengths: int,
) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` by the angles of each token's position.

    Notation: b batch, h heads, s sequence, d head dim, r rotary dim.

    Args:
        x: queries or keys, laid out as ``layout``, e.g. (b h s d) or (b s h d). Real floating dtype;
            half precision is rotated in float32 and returned in its own dtype.
        cos, sin: tables of shape (context_length, r) in the seed format ``[t0..tn-1, t0..tn-1]``, as
            :func:`precompute_rope_params` makes them, or half width (context_length, r/2). Or per-token
            tables (b, s, r) or (1, s, r) (or half width), as transformers' rotary modules return them:
            each token's own angles, so ``positions`` and ``offset`` are not given.
        layout: an einops pattern naming the axes of ``x``: ``s`` and ``d`` required, ``b`` and ``h``
            optional, ``...`` for extra leading axes, groups such as ``"b s (h d)"`` with the other lengths
            given as keywords.
        positions: integer tensor (s,) or (b, s) of the token positions. Default ``offset + arange(s)``.
        offset: the position of the first token: an int, or an integer tensor (b,), one per row.
        interleaved: pair channels (2i, 2i+1) (Meta, GPT-J) instead of (i, i + r/2) (NeoX, Hugging Face).
        rotary_dim: channels that rotate; the rest pass through. Default: the head dim.
        inplace: write the result into ``x`` and return it. Otherwise ``x`` is not modified.
        inverse: rotate by the negated angles: undoes the rotation at the same positions. Re-positioning keys
            already rotated at p to p' is a rotation by p' - p, also when it is negative: rotate at positions
            ``p' - p`` if every difference is >= 0, or at ``p - p'`` with ``inverse=True`` where they are <= 0.
        out: a tensor of x's shape, dtype and device, laid out as ``layout`` with any strides (a slice of a
            preallocated KV cache, ``cache_k[:, n:n + s]`` in "b s h d"), that the rotation is written into
            and returned, in the same pass (no copy). ``out=x`` rotates in place; a tensor sharing only some of
            x's memory is refused. As torch's ``out=``, it does not support autograd.
        out_index: integer tensor (s,) or (b, s): each token's sequence index in ``out`` (a ring buffer, a
            cache shared by packed sequences), whose sequence length may then differ from x's, written there in
            the rotation's own pass (the C loop, the Triton kernel); a negative index skips its token
            (padding). An index past out's length is an error; so is one repeated within a row, where checked
            (CPU tensors; on a GPU the check would sync, and which token lands there is unspecified).
        norm_weight: (d,) weights of an RMSNorm over each head's channels, applied before the rotation in the
            same pass (QK-norm: Qwen3, Gemma 3, OLMo): ``x / sqrt(mean(x^2) + norm_eps) * (norm_weight_offset
            + norm_weight)`` computed in float32 (float64 for float64) and rotated without rounding in between.
            ``norm_weight_offset=1.0`` is Gemma's ``1 + weight``. Gradients flow to x and the weight.
        **axes_lengths: lengths of axes, needed inside groups and checked everywhere, e.g. ``h=8``.

    Returns:
        The rotated tensor, of the same shape, layout, memory order, dtype and device as ``x`` (``out`` where
        given).

    Raises:
        LayoutError: the layout string is malformed or does not fit ``x``.
        FlexRopeError: any other bad input (tables, positions, dtypes).

    Example:
        >>> import torch, flexrope
        >>> cos, sin = flexrope.precompute_rope_params(16, context_length=32)
        >>> x = torch.randn(2, 10, 4, 16)  # (b s h d)
        >>> flexrope.compute_rope(x, cos, sin, "b s h d").shape
        torch.Size([2, 10, 4, 16])
    """
    try:
        for name, flag in (("interleaved", interleaved), ("inplace", inplace), ("inverse", inverse)):
            checked_flag(name, flag)
        parsed = parse(layout, axes_lengths)
        shape = bound(parsed, x)
        per_token = isinstance(cos, torch.Tensor) and cos.ndim == 3
        if per_token:
            cos, sin, positions = per_token_tables(cos, sin, shape, positions, offset)
        rotary_dim = checked_tables(cos, sin, rotary_dim, shape.d, per_token)
        where = checked_positions(x, shape, cos, positions, offset)
        if norm_weight is not None:
            weight, eps, gain_offset = check_norm(norm_weight, norm_eps, norm_weight_offset, x, shape.d)
            if inplace or inverse:
                raise FlexRopeError("norm_weight= with inplace=True or inverse=True: the norm is not undone by the "
                                    "inverse rotation, and is computed out of place; write into out= instead")
            index = None
            if out_index is not None and out is None:
                raise FlexRopeError("out_index= needs out=, the tensor it indexes")
            if out is not None:
                check_out(parsed, x, out, indexed=out_index is not None)
                index = None if out_index is None else check_out_index(parsed, x, out, out_index)
            if not per_token:
                _check_values(parsed, x, where, cos.shape[0])
            if out is not None:
                refuse_grad_into("out", [("x", x), ("norm_weight", weight)])
            return normed_rotation(parsed, x, weight, eps, gain_offset, cos, sin, where, shape.s, rotary_dim,
                                   bool(interleaved), out=out, out_index=index)
        if out_index is not None:
            if out is None or inplace:
                raise FlexRopeError("out_index= needs out=, the tensor it indexes (and no inplace=True)")
            check_out(parsed, x, out, indexed=True)
            index = check_out_index(parsed, x, out, out_index)
            return rope_at(Rotation(parsed, rotary_dim, bool(interleaved)), cos, sin, x, where, out, index,
                           table_len=cos.shape[0], inverse=bool(inverse), positions_checked=per_token)
        if out is not None:
            if inplace:
                raise FlexRopeError("inplace=True and out= both given: pass out=x, or one of them")
            if check_out(parsed, x, out):
                inplace, out = True, None
        return rope(Rotation(parsed, rotary_dim, bool(interleaved)), cos, sin, [(x, where)], inplace=bool(inplace),
                    table_len=cos.shape[0], inverse=bool(inverse), positions_checked=per_token,
                    outs=None if out is None else (out,))[0]
    except FlexRopeError as error:
        raise type(error)(f"{_describe(x, layout, axes_lengths)}: {error}") from None
