"""The book's (LLMs-from-scratch) RoPE, re-implemented from its formulas: the code whose layout bug flexrope
exists for. ``compute_rope`` assumes x is (b, h, s, d) and does not check it."""

import torch


def seed_precompute_rope_params(head_dim, theta_base=10_000, context_length=4096):
    """The book's ``precompute_rope_params``: float32 throughout, tables [cos over all r channels, half-split]."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    positions = torch.arange(context_length)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def seed_compute_rope(x, cos, sin):
    """The book's ``compute_rope``: reads the sequence length from dim 2, whatever x's layout."""
    _, _, seq_len, head_dim = x.shape
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    cos = cos[:seq_len, :].unsqueeze(0).unsqueeze(0)
    sin = sin[:seq_len, :].unsqueeze(0).unsqueeze(0)
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)
