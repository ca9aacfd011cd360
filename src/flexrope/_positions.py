"""Positions: checking them and looking up their angles in the cos/sin tables."""

from __future__ import annotations

import torch

from ._errors import FlexRopeError


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_range(positions: torch.Tensor, table_len: int, what: str) -> None:
    # Negative indices would wrap and large ones fail deep inside indexing: both get a plain error here.
    if positions.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(positions))
    if low < 0:
        raise FlexRopeError(f"{what} hold position {low}: positions must be >= 0")
    if high >= table_len:
        raise FlexRopeError(
            f"{what} reach position {high}, past the table's {table_len} positions: "
            f"precompute the tables with context_length > {high}"
        )


def resolve_positions(
    positions: torch.Tensor | None, offset: int | torch.Tensor, *, seq_len: int, batch: int, table_len: int
) -> int | torch.Tensor:
    """The positions of a (b, s) block: an int start (positions ``start .. start + s - 1`` for every row),
    or an integer tensor of shape (s,) or (b, s). Checked against the table length."""
    if positions is None:
        if isinstance(offset, torch.Tensor):
            if not _is_integer(offset) or offset.ndim > 1 or offset.numel() not in (1, batch):
                raise FlexRopeError(
                    f"offset of dtype {offset.dtype} and shape {tuple(offset.shape)}: expected an int or an "
                    f"integer tensor of shape ({batch},), one start per row of the b axis"
                )
            if offset.ndim == 0:
                offset = offset.reshape(1)
            positions = offset[:, None] + torch.arange(seq_len, device=offset.device, dtype=offset.dtype)
            _check_range(positions, table_len, f"offset + arange({seq_len})")
            return positions
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise FlexRopeError(f"offset={offset!r}: expected an int or an integer tensor of shape ({batch},)")
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
    if isinstance(offset, torch.Tensor) or offset != 0:
        raise FlexRopeError("both positions and offset were given: pass positions=positions + offset instead")
    shape = tuple(positions.shape)
    if positions.ndim not in (1, 2) or shape[-1] != seq_len or (positions.ndim == 2 and shape[0] not in (1, batch)):
        raise FlexRopeError(
            f"positions of shape {shape}: expected ({seq_len},) or ({batch}, {seq_len}), "
            f"one position per token of the s axis (and per row of the b axis)"
        )
    _check_range(positions, table_len, "positions")
    return positions


def angles_at(table: torch.Tensor, positions: int | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows of ``table`` (length, n) at ``positions``, shaped to broadcast over a canonical (b h s n) view."""
    if isinstance(positions, int):
        return table[positions : positions + seq_len]
    rows = table[positions.to(table.device)]
    return rows if rows.ndim == 2 else rows.unsqueeze(-3)
