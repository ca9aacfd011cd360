"""Converting q/k projection weights between interleaved and half-split channel order.

Interleaved checkpoints (Meta's Llama, GPT-J) pair channels (2i, 2i+1) of each head; half-split ones
(Hugging Face Llama, GPT-NeoX) pair (i, i + r/2). Reordering the output rows of the q and k projections
(and their biases) within each head turns one into the other: attention scores are unchanged, so a
checkpoint of one convention runs with the other's rotation.
"""

from __future__ import annotations

import torch

from ._errors import FlexRopeError
from ._tables import check_rotary_dim


def _head_order(head_dim: int, rotary_dim: int, to_half_split: bool) -> torch.Tensor:
    """For one head: output channel j takes input channel order[j]."""
    half = rotary_dim // 2
    interleaved = torch.arange(rotary_dim).view(half, 2).t().reshape(-1)  # 0 2 4 ... 1 3 5 ...
    rotary = interleaved if to_half_split else torch.argsort(interleaved)
    return torch.cat([rotary, torch.arange(rotary_dim, head_dim)])


def _permute(weight: torch.Tensor, num_heads: int, rotary_dim: int | None, to_half_split: bool, name: str):
    if not isinstance(weight, torch.Tensor) or weight.ndim not in (1, 2):
        raise FlexRopeError(f"{name}: expected a projection weight (out, in) or bias (out,) tensor")
    if type(num_heads) is not int or num_heads < 1 or weight.shape[0] % num_heads:  # noqa: E721
        raise FlexRopeError(
            f"{name}: {weight.shape[0]} output rows do not split into num_heads={num_heads!r} heads; pass the "
            f"head count of this projection (num_kv_heads for k under GQA)"
        )
    head_dim = weight.shape[0] // num_heads
    rotary_dim = check_rotary_dim(head_dim, rotary_dim)
    order = _head_order(head_dim, rotary_dim, to_half_split).to(weight.device)
    heads = weight.reshape(num_heads, head_dim, *weight.shape[1:])
    return heads.index_select(1, order).reshape(weight.shape)


def interleaved_to_half_split(weight: torch.Tensor, num_heads: int, *, rotary_dim: int | None = None) -> torch.Tensor:
    """Reorder the output rows of a q or k projection (weight or bias) from interleaved to half-split pairs.

    Args:
        weight: (num_heads * head_dim, in_features) weight or (num_heads * head_dim,) bias.
        num_heads: heads of this projection: num_attention_heads for q, num_key_value_heads for k.
        rotary_dim: channels that rotate per head (partial rotary); the rest keep their place.

    Example:
        >>> import torch, flexrope
        >>> w = torch.arange(8.0)[:, None]  # one head of 8 channels
        >>> flexrope.interleaved_to_half_split(w, 1).flatten().tolist()
        [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    return _permute(weight, num_heads, rotary_dim, True, "interleaved_to_half_split")


def half_split_to_interleaved(weight: torch.Tensor, num_heads: int, *, rotary_dim: int | None = None) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half_split`."""
    return _permute(weight, num_heads, rotary_dim, False, "half_split_to_interleaved")
