"""flexrope.testing: check your own RoPE and attention in the layout you call them with.

- :func:`check_rope` calls your RoPE on tensors laid out as you declare, compares it with the rotation in
  float64 and, when it differs, names the mistake (tokens rotated by their head index, the other pairing,
  another base, float32 angles, fewer channels rotating, the negated angle, ...).
- :func:`check_attention` checks that an attention using RoPE sees where tokens are, and only where they are
  relative to each other.
- Hypothesis strategies for your own property tests: :func:`layouts` (layout strings), :func:`laid_out`
  (tensors laid out as a layout, with their canonical (*lead, b, h, s, d) view), :func:`layout_cases` (both).
- References written from the definition, in float64: :func:`rope_loop`, :func:`rope_complex`, and
  :func:`tolerance` for comparisons.

The strategies need hypothesis (``pip install flexrope[testing]``); the checks and references need only torch.
"""

from ._attention import check_attention
from ._check import check_rope
from ._reference import float64_angle_truth, pair_indices, rope_complex, rope_loop, tolerance

_STRATEGIES = ("LaidOut", "LayoutCase", "laid_out", "layout_cases", "layouts")

__all__ = [
    "check_attention",
    "check_rope",
    "float64_angle_truth",
    "pair_indices",
    "rope_complex",
    "rope_loop",
    "tolerance",
    *_STRATEGIES,
]


def __getattr__(name: str):
    # The strategies import hypothesis, a test-time dependency: only when one is asked for.
    if name not in _STRATEGIES:
        raise AttributeError(f"module 'flexrope.testing' has no attribute {name!r}")
    try:
        from . import _strategies
    except ImportError as error:
        if error.name != "hypothesis":
            raise
        raise ImportError(
            f"flexrope.testing.{name} is a hypothesis strategy, and hypothesis is not installed: "
            f"pip install flexrope[testing] (or pip install hypothesis)", name="hypothesis"
        ) from None
    return getattr(_strategies, name)
