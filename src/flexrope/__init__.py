"""flexrope: Rotary Position Embedding for PyTorch in whatever tensor layout the caller declares."""

from ._errors import FlexRopeError, LayoutError
from ._functional import compute_rope
from ._module import RotaryEmbedding
from ._multiaxis import MultiAxisRotaryEmbedding
from ._positions import context_parallel_indices, context_parallel_positions, packed_positions
from ._tables import precompute_rope_params
from ._weights import half_split_to_interleaved, interleaved_to_half_split
from . import presets

__all__ = [
    "FlexRopeError",
    "LayoutError",
    "MultiAxisRotaryEmbedding",
    "RotaryEmbedding",
    "compute_rope",
    "context_parallel_indices",
    "context_parallel_positions",
    "half_split_to_interleaved",
    "interleaved_to_half_split",
    "packed_positions",
    "precompute_rope_params",
    "presets",
]
__version__ = "0.1.0"
