"""DTensor inputs: each rank rotates its local shard, where no shard cuts the sequence or the head dim."""

from __future__ import annotations

import sys

import torch

from ._errors import FlexRopeError
from ._layout import Layout
from ._positions import RowStarts


DTENSOR_MODULE = "torch.distributed.tensor"


def dtensor_class(x: torch.Tensor):
    # Only code that made a DTensor has imported torch.distributed.tensor: no import here for anyone else.
    module = sys.modules.get(DTENSOR_MODULE)
    return module.DTensor if module is not None and isinstance(x, module.DTensor) else None


def check_shards(x, layout: Layout, where) -> None:
    """Raise FlexRopeError for a placement whose local shards cannot be rotated on their own."""
    entries = layout.entry_of_dim(x.ndim)
    for placement in x.placements:
        if placement.is_partial():
            raise FlexRopeError(f"x is a DTensor with a partial placement ({placement}): reduce it first")
        if placement.is_shard():
            entry = entries[placement.dim]
            if "s" in entry or "d" in entry:
                axis = "s (sequence)" if "s" in entry else "d (head dim)"
                raise FlexRopeError(
                    f"x is a DTensor sharded along dim {placement.dim}, which holds {axis}: shard along batch or "
                    f"heads, or rotate the local shards with context_parallel_positions"
                )
            per_row = (isinstance(where, torch.Tensor) and where.ndim == 2 and where.shape[0] > 1) or (
                isinstance(where, RowStarts) and where.starts.numel() > 1
            )
            if "b" in entry and per_row:
                raise FlexRopeError(
                    f"x is a DTensor sharded along dim {placement.dim} (batch) with per-row positions: rotate "
                    f"the local shards with their own rows of positions"
                )


def from_local(dtensor, x, local: torch.Tensor):
    """The DTensor of x's placements around the rotated local shard."""
    return dtensor.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
