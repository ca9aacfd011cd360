"""``check_attention``: an attention that uses RoPE sees where tokens are, and only where they are relative to
each other.

Seen from outside, ``fn(q, k, v)`` is softmax(scores) @ v. Give every token of a head the same q content and
the same k content, so that the scores can differ only through positions, and give token j the value e_j
(one-hot in channel j) times a number of its own head and batch row: then channel j of token i's output is
that number times the weight token i gives token j. With RoPE the score of (i, j) is a function of i - j
alone: each row of weights is non-uniform, and log w(i, j) - log w(i, i) depends on i - j only. An attention
that rotates q and k of a head by one same angle (the head index: the book's bug) or not at all is
position-blind: every row is uniform. One that adds absolute positions gives rows that disagree.
"""

from __future__ import annotations

import torch

from .._errors import FlexRopeError
from .._layout import ELLIPSIS, parse_layout

_BATCH, _HEADS, _TOKENS = 2, 3, 8
# Log-weight tolerance per dtype: scores of size ~4 computed in the dtype, exponentiated.
_LOG_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}
_SMALLEST = 1e-5  # weights below this are not compared in log space


def _value_scale(b: int, h: int) -> torch.Tensor:
    """A number per (batch row, head), distinct, so that mixing values across heads or rows shows."""
    return 1 + torch.arange(h, dtype=torch.float64)[None, :] + 0.25 * torch.arange(b, dtype=torch.float64)[:, None]


def check_attention(fn, layout: str, *, head_dim: int = 16, dtype: torch.dtype = torch.float32,
                    **axes_lengths: int) -> None:
    """Check that the attention ``fn(q, k, v) -> out`` (all laid out as ``layout``) behaves as a RoPE
    attention does: its weights depend on where tokens are, and only on their relative positions.

    q and k hold the same content at every position of a head (drawn, fixed seed), and v one-hot values, so
    that ``fn``'s output reads out its attention weights. Causal or not, scaled or not, any RoPE (any base,
    either pairing) passes; so does any attention whose scores depend on relative positions alone.

    Args:
        fn: the attention under test, ``fn(q, k, v)`` with q, k, v of one shape, returning that shape.
        layout: the layout of q, k, v and the output, e.g. ``"b s h d"``.
        head_dim: d; the sequence drawn has min(8, head_dim) tokens (each token's value is one channel).
        dtype: the dtype of q, k and v.
        **axes_lengths: lengths kept fixed (``h=4`` for ``"b s (h d)"``).

    Raises:
        AssertionError: with what is wrong: the output is not a mix of the tokens' values along s, the
            attention is position-blind, or its weights depend on absolute positions.
        FlexRopeError: the arguments of ``check_attention`` itself are wrong.

    Example:
        >>> import torch, flexrope
        >>> from flexrope.testing import check_attention
        >>> rope = flexrope.RotaryEmbedding(16, layout="b h s d")
        >>> def attention(q, k, v):  # (b h s d)
        ...     q, k = rope(q, k)
        ...     return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> check_attention(attention, "b h s d")
    """
    try:
        if not callable(fn):
            raise FlexRopeError(f"fn={fn!r}: expected a callable, fn(q, k, v) -> attention output")
        if type(head_dim) is not int or head_dim < 4:  # noqa: E721
            raise FlexRopeError(f"head_dim={head_dim!r}: expected an int of at least 4 (one channel per token)")
        if dtype not in _LOG_TOLERANCE:
            raise FlexRopeError(f"dtype={dtype!r}: expected one of {', '.join(map(str, _LOG_TOLERANCE))}")
        if not isinstance(layout, str):
            raise FlexRopeError(f"layout={layout!r}: expected a string such as 'b s h d'")
        parsed = parse_layout(layout, tuple(sorted({**axes_lengths, "d": head_dim}.items())))
    except FlexRopeError as error:
        raise FlexRopeError(f"check_attention(layout={layout!r}, head_dim={head_dim!r}): {error}") from None
    names = [name for entry in parsed.entries for name in entry]
    sizes = {"b": _BATCH, "h": _HEADS, "s": min(_TOKENS, head_dim), **axes_lengths}
    if sizes["s"] > head_dim or sizes["s"] < 3:
        raise FlexRopeError(f"check_attention(layout={layout!r}): s={sizes['s']}: expected 3 .. head_dim "
                            f"({head_dim}) tokens, one channel of v per token")
    b, h, s = (sizes[axis] if axis in names else 1 for axis in "bhs")
    lead = (2,) if ELLIPSIS in names else ()
    rng = torch.Generator().manual_seed(0)
    content = [torch.randn(*lead, b, h, 1, head_dim, generator=rng, dtype=torch.float64) for _ in "qk"]
    q, k = (c.expand(*lead, b, h, s, head_dim) for c in content)
    scale = _value_scale(b, h)[:, :, None, None]
    v = torch.eye(s, head_dim, dtype=torch.float64).expand(*lead, b, h, s, head_dim) * scale
    given = [parsed.from_canonical(t.to(dtype)).contiguous() for t in (q, k, v)]
    call = f"{getattr(fn, '__qualname__', type(fn).__name__)}(q, k, v) with q, k, v of shape " \
           f"{tuple(given[0].shape)} laid out as {parsed.text!r}"
    try:
        out = fn(*(t.clone() for t in given))
    except Exception as error:
        raise AssertionError(f"{call} raised {type(error).__name__}: {error}") from error
    if not isinstance(out, torch.Tensor) or out.shape != given[0].shape or out.dtype != dtype:
        what = (f"a {type(out).__name__}" if not isinstance(out, torch.Tensor)
                else f"a {out.dtype} tensor of shape {tuple(out.shape)}")
        raise AssertionError(f"{call} returned {what}: expected q's shape and dtype, {dtype}")
    weights = parsed.canonical(out).to(torch.float64) / scale  # (*lead, b, h, s, d): [..., i, j] = w(i, j)
    _check_mixture(call, parsed, weights, s)
    _check_positions(call, weights[..., :s], _LOG_TOLERANCE[dtype])


def _check_mixture(call: str, parsed, weights: torch.Tensor, s: int) -> None:
    """Each token's output is a convex mix of the values of the tokens of its own head and row, along s."""
    rows = weights[..., :s]
    sums = rows.sum(-1)
    bad = ((sums - 1).abs() > 1e-2) | (rows.amin(-1) < -1e-3) | (weights[..., s:].abs().amax(-1) > 1e-3)
    if bool(bad.any()):
        index = torch.unravel_index(bad.flatten().int().argmax(), bad.shape)
        *_, b, h, i = (int(n) for n in index)
        seq_dim = next(dim for dim, entry in enumerate(parsed.entries) if "s" in entry)
        raise AssertionError(
            f"{call}: the output of token {i} (head {h}, batch row {b}) is not a weighted mean of the values of "
            f"the tokens along dim {seq_dim} (s) of its own head (weights summing to {float(sums[index]):.4g}, "
            f"smallest {float(rows[index].min()):.4g}): does the attention run along another axis (the layout "
            f"read as another one), or leave out the softmax?"
        )


def _check_positions(call: str, weights: torch.Tensor, tolerance: float) -> None:
    """Position-blind (every row uniform) or absolute (log w(i, j) - log w(i, i) not a function of i - j)."""
    s = weights.shape[-1]
    usable = weights > _SMALLEST
    logs = torch.where(usable, weights.clamp(min=_SMALLEST).log(), torch.zeros_like(weights))
    diagonal = logs.diagonal(dim1=-2, dim2=-1)[..., :, None]  # log w(i, i)
    relative = logs - diagonal  # log w(i, j) - log w(i, i)
    both = usable & usable.diagonal(dim1=-2, dim2=-1)[..., :, None]
    spread_in_rows = torch.where(both, relative.abs(), torch.zeros_like(relative)).amax()
    if float(spread_in_rows) <= tolerance:
        raise AssertionError(
            f"{call}: position-blind: with the same q and k content at every position, every token weighs "
            f"every key it sees the same; RoPE would make the weights depend on i - j. The same angle on q "
            f"and k of a head cancels in q.k: q and k rotated by their head index (a (b, s, h, d) tensor "
            f"rotated as if it were (b, h, s, d)), or not rotated at all"
        )
    worst, where = 0.0, None
    for offset in range(-(s - 1), s):
        i = torch.arange(max(0, offset), min(s, s + offset))  # rows i whose key j = i - offset exists
        values, ok = relative[..., i, i - offset], both[..., i, i - offset]
        if int(ok.sum()) < 2:
            continue
        high = torch.where(ok, values, torch.full_like(values, -torch.inf)).amax(-1)
        low = torch.where(ok, values, torch.full_like(values, torch.inf)).amin(-1)
        spread = torch.where(ok.sum(-1) >= 2, high - low, torch.zeros_like(high))
        if float(spread.max()) > worst:
            worst, where = float(spread.max()), offset
    if worst > tolerance:
        key = f"{abs(where)} token{'s' if abs(where) != 1 else ''} {'back' if where > 0 else 'ahead'}"
        raise AssertionError(
            f"{call}: the weights depend on absolute positions: the key {key} is weighed "
            f"differently by different queries (log-weights relative to the token itself differ by {worst:.3g}) "
            f"though q and k have the same content at every position; with RoPE shifting every position "
            f"changes nothing. Are positions added to q or k (absolute embeddings), or are q and k rotated at "
            f"different positions?"
        )
