"""Multi-axis RoPE as vision and diffusion models lay it out, each a :class:`MultiAxisRotaryEmbedding`.

| preset | axes (channel pairs) | assignment | frequencies | pairing |
| --- | --- | --- | --- | --- |
| ``flux`` | t, y, x = axes_dim / 2 | sections | per axis | interleaved |
| ``wan`` | f = d/2 - 2 (d // 6), y = x = d // 6 | sections | per axis | interleaved |
| ``pixtral`` | y = x = d / 4 | sections | the 1-D frequencies of d, even ones to y, odd to x | half-split |
| ``qwen2_vl_vision`` | y = x = d / 4 | sections | per axis | half-split |

The text models of vision-language families (Qwen2-VL to Qwen3.5, GLM-4V, ERNIE-4.5-VL, ...):
:meth:`MultiAxisRotaryEmbedding.from_hf_config`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._errors import FlexRopeError
from ._multiaxis import MultiAxisRotaryEmbedding

__all__ = ["flux", "pixtral", "qwen2_vl_vision", "wan"]


def flux(*, theta_base: float = 10_000, axes_dim: Sequence[int] = (16, 56, 56), layout: str = "b s h d",
         context_length: int = 4096) -> MultiAxisRotaryEmbedding:
    """Flux's rotary embedding (diffusers' ``FluxPosEmbed`` with ``apply_rotary_emb``): three axes of
    ``axes_dim`` channels each, interleaved pairs, per-axis frequencies. Positions: Flux's ``ids`` (s, 3)
    transposed to (3, s)."""
    if len(axes_dim) != 3 or any(d % 2 for d in axes_dim):
        raise FlexRopeError(f"flux(axes_dim={tuple(axes_dim)!r}): expected three even channel counts")
    axes = dict(zip(("t", "y", "x"), (d // 2 for d in axes_dim)))
    return MultiAxisRotaryEmbedding(sum(axes_dim), axes=axes, layout=layout, frequencies="per_axis",
                                    theta_base=theta_base, interleaved=True, context_length=context_length)


def wan(head_dim: int, *, theta_base: float = 10_000, layout: str = "b (f y x) h d",
        context_length: int = 1024) -> MultiAxisRotaryEmbedding:
    """Wan's rotary embedding (diffusers' ``WanRotaryPosEmbed`` and its attention's rotation): frames get
    ``head_dim - 4 (head_dim // 6)`` channels, rows and columns ``2 (head_dim // 6)`` each; interleaved pairs,
    per-axis frequencies. With the default layout, ``rope(q, k, f=frames, y=rows, x=columns)`` of the patch
    grid."""
    side = head_dim // 6
    axes = {"f": head_dim // 2 - 2 * side, "y": side, "x": side}
    return MultiAxisRotaryEmbedding(head_dim, axes=axes, layout=layout, frequencies="per_axis",
                                    theta_base=theta_base, interleaved=True, context_length=context_length)


def pixtral(head_dim: int, *, theta_base: float = 10_000, layout: str = "b h (y x) d",
            context_length: int = 1024) -> MultiAxisRotaryEmbedding:
    """Pixtral's 2-D rotary embedding (transformers' ``PixtralVisionRotaryEmbedding``): the 1-D frequencies of
    the whole head, the even ones to the patch row, the odd ones to the column, half-split pairs."""
    if head_dim % 4:
        raise FlexRopeError(f"pixtral(head_dim={head_dim!r}): expected a multiple of 4")
    inv = theta_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return MultiAxisRotaryEmbedding(head_dim, axes={"y": head_dim // 4, "x": head_dim // 4}, layout=layout,
                                    inv_freq=torch.cat([inv[0::2], inv[1::2]]), context_length=context_length)


def qwen2_vl_vision(head_dim: int, *, theta_base: float = 10_000, layout: str = "(y x) h d",
                    context_length: int = 1024) -> MultiAxisRotaryEmbedding:
    """The vision tower's rotary embedding of Qwen2-VL and Qwen2.5-VL (transformers'
    ``Qwen2VLVisionRotaryEmbedding``): rows and columns of the patch grid, d/4 pairs each with the
    frequencies of a d/2 head, half-split pairs."""
    if head_dim % 4:
        raise FlexRopeError(f"qwen2_vl_vision(head_dim={head_dim!r}): expected a multiple of 4")
    return MultiAxisRotaryEmbedding(head_dim, axes={"y": head_dim // 4, "x": head_dim // 4}, layout=layout,
                                    frequencies="per_axis", theta_base=theta_base, context_length=context_length)
