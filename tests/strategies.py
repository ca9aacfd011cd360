"""Hypothesis strategies: declared layouts and tensors laid out as they declare."""

import einops
import torch
from hypothesis import strategies as st

from flexrope._layout import AXES


@st.composite
def layouts(draw, max_lead=2):
    """A layout case: (layout, axes_lengths, canonical tensor (*lead, b, h, s, d), x laid out as the layout)."""
    optional = draw(st.sets(st.sampled_from(["b", "h"])))
    names = draw(st.permutations([axis for axis in AXES if axis in optional or axis in "sd"]))
    sizes = {axis: draw(st.integers(1, 6)) for axis in "bhs"}
    sizes["d"] = 2 * draw(st.integers(1, 4))
    entries = [[name] for name in names]
    # Group two neighbours (never s with d), giving the length of the first.
    lengths = {}
    if len(entries) > 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(entries) - 2))
        if {entries[i][0], entries[i + 1][0]} != {"s", "d"}:
            lengths[entries[i][0]] = sizes[entries[i][0]]
            entries[i : i + 2] = [entries[i] + entries[i + 1]]
    lead = draw(st.lists(st.integers(1, 3), max_size=max_lead)) if draw(st.booleans()) else None
    text = " ".join(f"({' '.join(e)})" if len(e) > 1 else e[0] for e in entries)
    if lead is not None:
        text = "... " + text
    canonical_shape = (*(lead or ()), *(sizes[a] if a in names else 1 for a in AXES))
    canonical = torch.randn(canonical_shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    pattern = f"{'... ' if lead is not None else ''}{' '.join(a if a in names else '1' for a in AXES)} -> {text}"
    x = einops.rearrange(canonical, pattern, **lengths).contiguous()
    return text, lengths, canonical, x, pattern
