"""Hypothesis strategies: layout strings, and tensors laid out as they declare with their canonical view."""

from __future__ import annotations

from typing import NamedTuple

import einops
import torch
from hypothesis import strategies as st

from .._layout import AXES, ELLIPSIS, _entries, parse_layout


class LaidOut(NamedTuple):
    """A tensor laid out as a layout, and the same values in the canonical (*lead, b, h, s, d) view."""

    x: torch.Tensor  # laid out as the layout, contiguous
    canonical: torch.Tensor  # (*lead, b, h, s, d), a unit axis for an absent b or h
    lengths: dict  # the keyword lengths the layout's groups need, e.g. {"h": 4} for "b s (h d)"
    pattern: str  # the einops pattern from the canonical view to the layout


class LayoutCase(NamedTuple):
    """A layout and a tensor laid out as it declares (unpacks as ``text, lengths, canonical, x, pattern``)."""

    text: str
    lengths: dict
    canonical: torch.Tensor
    x: torch.Tensor
    pattern: str


@st.composite
def layouts(draw, *, ellipsis: bool = True, groups: bool = True) -> str:
    """Layout strings: ``s`` and ``d`` with ``b`` and ``h`` or not, in any order, two neighbours possibly
    grouped (never ``s`` with ``d``), possibly after a leading ``...``. E.g. ``"h (s b) d"``, ``"... s d"``.
    """
    optional = draw(st.sets(st.sampled_from(["b", "h"])))
    names = draw(st.permutations([axis for axis in AXES if axis in optional or axis in "sd"]))
    entries = [[name] for name in names]
    if groups and len(entries) > 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(entries) - 2))
        if {entries[i][0], entries[i + 1][0]} != {"s", "d"}:
            entries[i : i + 2] = [entries[i] + entries[i + 1]]
    text = " ".join(f"({' '.join(e)})" if len(e) > 1 else e[0] for e in entries)
    return f"{ELLIPSIS} {text}" if ellipsis and draw(st.booleans()) else text


@st.composite
def laid_out(draw, layout: str, *, max_side: int = 6, max_lead: int = 2, dtype: torch.dtype = torch.float32,
             **axes_lengths: int) -> LaidOut:
    """A random tensor laid out as ``layout`` (drawn lengths: b, h, s in 1..max_side, d even in 2..8, up to
    ``max_lead`` extra axes for ``...``; lengths given as keywords are kept), with its canonical view."""
    sizes = {axis: draw(st.integers(1, max_side)) for axis in "bhs"}
    sizes["d"] = 2 * draw(st.integers(1, 4))
    sizes.update(axes_lengths)
    names = [name for entry in _entries(layout) for name in entry if name in AXES]
    parsed = parse_layout(layout, tuple(sorted((name, sizes[name]) for name in names)))  # checks the layout
    lead = draw(st.lists(st.integers(1, 3), max_size=max_lead)) if parsed.has_ellipsis else []
    canonical_shape = (*lead, *(sizes[a] if a in names else 1 for a in AXES))
    seed = draw(st.integers(0, 2**16))
    canonical = torch.randn(canonical_shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    source = " ".join(a if a in names else "1" for a in AXES)
    pattern = f"{'... ' if parsed.has_ellipsis else ''}{source} -> {parsed.text}"
    lengths = {entry[0]: sizes[entry[0]] for entry in parsed.entries if len(entry) > 1}
    x = einops.rearrange(canonical, pattern, **lengths).contiguous()
    return LaidOut(x, canonical, lengths, pattern)


@st.composite
def layout_cases(draw, max_lead: int = 2) -> LayoutCase:
    """A layout from :func:`layouts` and a tensor from :func:`laid_out` for it, together."""
    text = draw(layouts())
    case = draw(laid_out(text, max_lead=max_lead))
    return LayoutCase(text, case.lengths, case.canonical, case.x, case.pattern)
