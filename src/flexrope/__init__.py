"""flexrope: Rotary Position Embedding for PyTorch in whatever tensor layout the caller declares."""

from ._errors import FlexRopeError, LayoutError
from ._functional import compute_rope
from ._module import RotaryEmbedding
from ._tables import precompute_rope_params

__all__ = ["FlexRopeError", "LayoutError", "RotaryEmbedding", "compute_rope", "precompute_rope_params"]
__version__ = "0.1.0"
