"""Positions: checking them and looking up their angles in the cos/sin tables."""

from __future__ import annotations

import operator
from typing import NamedTuple, Union

import torch

from ._errors import FlexRopeError
from ._kinds import plain


class RowStarts(NamedTuple):
    """One first position per row of the b axis, shape (b,): row i holds ``starts[i] .. starts[i] + s - 1``."""

    starts: torch.Tensor


# Where a tensor's tokens are: an int start (the same for every row), a tensor of positions (s,) or (b, s),
# or RowStarts.
Where = Union[int, torch.Tensor, RowStarts]


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int: ints and numpy integers, never bools, floats or tensors."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):  # SymInt: under torch.compile
        return value
    if isinstance(value, (bool, torch.Tensor)) or not hasattr(value, "__index__"):
        raise FlexRopeError(f"{name}={value!r}: expected an int")
    return operator.index(value)


def _check_device(t: torch.Tensor, x_device: torch.device, name: str) -> None:
    if t.device.type == "meta" and x_device.type != "meta":
        raise FlexRopeError(f"{name} is on the meta device, which holds no values: pass it on {x_device}")


def resolve_positions(
    positions: torch.Tensor | None, offset: object, *, seq_len: int, batch: int, table_len: int,
    device: torch.device,
) -> Where:
    """Where the tokens of a (b, s) block are, its shapes and dtypes checked, and an int start checked against
    the table length. Position values held in tensors are checked by :func:`check_values` (on the host) or
    on the device, as the backend does it."""
    if positions is None:
        if isinstance(offset, torch.Tensor):
            if not _is_integer(offset) or offset.ndim > 1 or offset.numel() not in (1, batch):
                raise FlexRopeError(
                    f"offset of dtype {offset.dtype} and shape {tuple(offset.shape)}: expected an int or an "
                    f"integer tensor of shape ({batch},), one start per row of the b axis"
                )
            _check_device(offset, device, "offset")
            return RowStarts(offset.reshape(1) if offset.ndim == 0 else offset)
        try:
            offset = as_int(offset, "offset")
        except FlexRopeError:
            raise FlexRopeError(
                f"offset={offset!r}: expected an int or an integer tensor of shape ({batch},)"
            ) from None
        if offset < 0:
            raise FlexRopeError(f"offset={offset}: positions must be >= 0")
        if offset + seq_len > table_len:
            raise FlexRopeError(
                f"offset {offset} + sequence length {seq_len} = {offset + seq_len} positions, past the "
                f"table's {table_len} positions: precompute the tables with context_length >= {offset + seq_len}"
            )
        return offset
    if not isinstance(positions, torch.Tensor) or not _is_integer(positions):
        kind = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise FlexRopeError(f"positions of type {kind}: expected an integer tensor (torch.long)")
    if isinstance(offset, torch.Tensor) or as_int(offset, "offset") != 0:
        raise FlexRopeError("both positions and offset were given: pass positions=positions + offset instead")
    shape = tuple(positions.shape)
    if positions.ndim not in (1, 2) or shape[-1] != seq_len or (positions.ndim == 2 and shape[0] not in (1, batch)):
        raise FlexRopeError(
            f"positions of shape {shape}: expected ({seq_len},) or ({batch}, {seq_len}), "
            f"one position per token of the s axis (and per row of the b axis)"
        )
    _check_device(positions, device, "positions")
    return positions


def position_tensor(where: Where, seq_len: int) -> int | torch.Tensor:
    """An int start, or the int64 positions (s,) or (b, s): every integer dtype is read as integers
    (uint8 is no mask, int8 does not overflow)."""
    if isinstance(where, RowStarts):
        starts = where.starts.long()
        return starts[:, None] + torch.arange(seq_len, device=starts.device)
    return where.long() if isinstance(where, torch.Tensor) else where


def _described(where: Where, seq_len: int) -> str:
    return f"offset + arange({seq_len})" if isinstance(where, RowStarts) else "positions"


# Up to this many values, the lowest and highest are found on the host from a list (a decoding step: one
# or a few positions), which costs a fraction of the torch operations' dispatch.
FEW_VALUES = 64


def _value_range(values: torch.Tensor) -> tuple[int, int]:
    if values.numel() <= FEW_VALUES and plain(values):  # tolist() refuses subclasses
        listed = values.tolist()  # positions are 1-D or 2-D
        listed = listed if values.ndim < 2 else [value for row in listed for value in row]
        return min(listed), max(listed)
    low, high = torch.aminmax(values.long())
    return int(low), int(high)


def values_on_host(x: torch.Tensor) -> bool:
    """Whether the position values of a call on ``x`` are checked on the host by :func:`check_values`; on a
    GPU and in a compiled graph a read would sync, and :func:`assert_values_async` (or the kernel) checks them
    on the device."""
    return not (x.is_cuda or torch.compiler.is_compiling())


def check_values(where: Where, seq_len: int, table_len: int) -> None:
    """Raise FlexRopeError for a position held in a tensor that is negative or past the table, reading the
    values on the host (a sync on an accelerator): never clamped, never wrapped."""
    values = where.starts if isinstance(where, RowStarts) else where
    if isinstance(values, int) or values.numel() == 0 or values.device.type == "meta" or seq_len == 0:
        return
    low, high = _value_range(values)
    if isinstance(where, RowStarts):  # row i holds starts[i] .. starts[i] + s - 1
        high += seq_len - 1
    what = _described(where, seq_len)
    if low < 0:
        raise FlexRopeError(f"{what} hold position {low}: positions must be >= 0")
    if high >= table_len:
        raise FlexRopeError(
            f"{what} reach position {high}, past the table's {table_len} positions: "
            f"precompute the tables with context_length > {high}"
        )


def assert_values_async(where: Where, seq_len: int, table_len: int) -> None:
    """The check of :func:`check_values` queued on the device, with no sync: a bad position fails the
    stream (a device-side assert on CUDA, a RuntimeError on the CPU under torch.compile)."""
    positions = position_tensor(where, seq_len)
    if isinstance(positions, int) or positions.device.type == "meta":
        return
    in_range = ((positions >= 0) & (positions < table_len)).all()
    torch._assert_async(in_range, f"flexrope: {_described(where, seq_len)} hold a position < 0 or >= {table_len}")


def angles_at(table: torch.Tensor, where: int | torch.Tensor, seq_len: int, width: int) -> torch.Tensor:
    """The first ``width`` columns of ``table`` at the positions (an int start or an int64 tensor from
    :func:`position_tensor`), shaped to broadcast over a canonical (b h s width) view: (s, width) or
    (b, 1, s, width)."""
    if isinstance(where, int):
        if width == table.shape[1]:
            return table if where == 0 and seq_len == table.shape[0] else table[where : where + seq_len]
        return table[where : where + seq_len, :width]
    rows = table[where.to(table.device), :width]
    return rows if rows.ndim == 2 else rows.unsqueeze(-3)


def _check_cu_seqlens(cu_seqlens: object, where: str) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or not _is_integer(cu_seqlens) or cu_seqlens.ndim != 1:
        kind = (f"a {cu_seqlens.dtype} tensor of shape {tuple(cu_seqlens.shape)}"
                if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__)
        raise FlexRopeError(f"{where}: cu_seqlens is {kind}: expected a 1-D integer tensor such as [0, 3, 8, 10]")
    _check_device(cu_seqlens, torch.device("cpu"), "cu_seqlens")
    cu_seqlens = cu_seqlens.long()  # before any arithmetic: a uint8 difference would wrap around
    if cu_seqlens.numel() == 0 or int(cu_seqlens[0]) != 0:
        raise FlexRopeError(f"{where}: cu_seqlens must start at 0 (the cumulative lengths [0, n0, n0 + n1, ...])")
    lengths = cu_seqlens.diff()
    if (lengths < 0).any():
        at = int(torch.nonzero(lengths < 0)[0])
        raise FlexRopeError(
            f"{where}: cu_seqlens decreases at index {at + 1} ({int(cu_seqlens[at])} -> {int(cu_seqlens[at + 1])}): "
            f"it holds cumulative lengths, which never decrease"
        )
    return cu_seqlens


def packed_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions of a packed row of documents: they restart at 0 at each boundary of ``cu_seqlens``.

    Args:
        cu_seqlens: 1-D integer tensor of cumulative document lengths, starting at 0.

    Returns:
        LongTensor (total,) on ``cu_seqlens``'s device, ``total = cu_seqlens[-1]``.

    Example:
        >>> import torch, flexrope
        >>> flexrope.packed_positions(torch.tensor([0, 3, 8, 10])).tolist()
        [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    """
    cu_seqlens = _check_cu_seqlens(cu_seqlens, "packed_positions")
    lengths = cu_seqlens.diff()
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def _rank_chunks(length: int, cp_size: int, cp_rank: int, load_balanced: bool) -> list[tuple[int, int]]:
    """(start, stop) of the chunks of a sequence of ``length`` tokens that rank ``cp_rank`` holds."""
    if load_balanced:
        chunk = length // (2 * cp_size)
        return [(cp_rank * chunk, (cp_rank + 1) * chunk), ((2 * cp_size - 1 - cp_rank) * chunk,
                                                            (2 * cp_size - cp_rank) * chunk)]
    chunk = length // cp_size
    return [(cp_rank * chunk, (cp_rank + 1) * chunk)]


def context_parallel_indices(
    seq_len: int,
    cp_size: int,
    cp_rank: int,
    *,
    load_balanced: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices along the sequence of the tokens that one context-parallel rank holds, in its local order.

    Use them to shard the full sequence (``x.index_select(s_dim, indices)``) and to gather it back.
    Load-balanced (for causal attention) cuts the sequence, or each packed document, into 2 * cp_size chunks
    and gives rank r chunks r and 2 * cp_size - 1 - r; otherwise rank r holds the r-th of cp_size blocks.
    """
    where = f"context_parallel_indices(seq_len={seq_len!r}, cp_size={cp_size!r}, cp_rank={cp_rank!r})"
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise FlexRopeError(f"{where}: seq_len must be an int >= 0")
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise FlexRopeError(f"{where}: cp_size must be an int >= 1")
    if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise FlexRopeError(f"{where}: cp_rank must be an int in [0, {cp_size})")
    pieces = 2 * cp_size if load_balanced else cp_size
    split = "2 * cp_size" if load_balanced else "cp_size"
    if cu_seqlens is None:
        starts, lengths = [0], [seq_len]
    else:
        cu = _check_cu_seqlens(cu_seqlens, where)
        if int(cu[-1]) != seq_len:
            raise FlexRopeError(f"{where}: cu_seqlens ends at {int(cu[-1])}, not at seq_len={seq_len}")
        starts, lengths = cu[:-1].tolist(), cu.diff().tolist()
    for doc, length in enumerate(lengths):
        if length % pieces:
            what = "the sequence" if cu_seqlens is None else f"document {doc}"
            raise FlexRopeError(
                f"{where}: {what} has {length} tokens, not a multiple of {split} = {pieces}; pad it to a "
                f"multiple of {pieces}"
            )
    ranges = [
        torch.arange(start + lo, start + hi, device=device)
        for start, length in zip(starts, lengths)
        for lo, hi in _rank_chunks(length, cp_size, cp_rank, load_balanced)
    ]
    return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long, device=device)


def context_parallel_positions(
    seq_len: int,
    cp_size: int,
    cp_rank: int,
    *,
    load_balanced: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The global positions of the tokens one context-parallel rank holds, for ``compute_rope(positions=...)``.

    Args:
        seq_len: tokens in the full sequence (the packed total with ``cu_seqlens``).
        cp_size, cp_rank: the context-parallel group size and this rank.
        load_balanced: the dual-chunk split for causal attention (default); False for contiguous blocks.
        cu_seqlens: cumulative document lengths of a packed sequence: each document is split the same way
            and positions restart in each one. Each length must be a multiple of 2 * cp_size (cp_size when
            not load balanced), as TransformerEngine requires.

    Returns:
        LongTensor of seq_len / cp_size positions, in the rank's local order (that of
        :func:`context_parallel_indices`).

    Example:
        >>> import flexrope
        >>> flexrope.context_parallel_positions(8, 2, 0).tolist(), flexrope.context_parallel_positions(8, 2, 1).tolist()
        ([0, 1, 6, 7], [2, 3, 4, 5])
    """
    indices = context_parallel_indices(
        seq_len, cp_size, cp_rank, load_balanced=load_balanced, cu_seqlens=cu_seqlens, device=device
    )
    if cu_seqlens is None:
        return indices
    return packed_positions(cu_seqlens.to(indices.device))[indices]
