"""Independent references, written from the definition of RoPE (not from flexrope's code)."""

import math

import torch


def pair_indices(rotary_dim, interleaved):
    """The (first, second) channel of each pair i."""
    half = rotary_dim // 2
    if interleaved:
        return [(2 * i, 2 * i + 1) for i in range(half)]
    return [(i, i + half) for i in range(half)]


def rope_loop(x, positions, *, theta=10_000.0, rotary_dim=None, interleaved=False, inv_freq=None):
    """Float64 loop over pairs. x: (b, h, s, d) tensor; positions: (b, s) integer tensor."""
    x = x.to(torch.float64)
    rotary_dim = rotary_dim or x.shape[-1]
    out = x.clone()
    pos = positions.to(torch.float64)[:, None, :]  # (b, 1, s)
    for i, (p, q) in enumerate(pair_indices(rotary_dim, interleaved)):
        freq = inv_freq[i] if inv_freq is not None else theta ** (-2.0 * i / rotary_dim)
        angle = pos * freq
        c, s_ = torch.cos(angle), torch.sin(angle)
        a, b = x[..., p], x[..., q]
        out[..., p] = a * c - b * s_
        out[..., q] = b * c + a * s_
    return out


def rope_complex(x, positions, *, theta=10_000.0, interleaved=False):
    """Complex-number formulation: each pair is a complex number multiplied by exp(i * angle)."""
    x = x.to(torch.float64)
    d = x.shape[-1]
    half = d // 2
    if interleaved:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], half, 2).contiguous())
    else:
        z = torch.complex(x[..., :half], x[..., half:])
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.to(torch.float64)[:, None, :, None] * freqs
    z = z * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        return torch.view_as_real(z).reshape(x.shape)
    return torch.cat([z.real, z.imag], dim=-1)


def seed_precompute_rope_params(head_dim, theta_base=10_000, context_length=4096):
    """The seed's table code, float32 throughout (the book's LLMs-from-scratch ``precompute_rope_params``)."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    positions = torch.arange(context_length)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def seed_compute_rope(x, cos, sin):
    """The seed's rotation: assumes x is (b, h, s, d) and does not check it."""
    _, _, seq_len, head_dim = x.shape
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    cos = cos[:seq_len, :].unsqueeze(0).unsqueeze(0)
    sin = sin[:seq_len, :].unsqueeze(0).unsqueeze(0)
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def float64_angle_truth(position, i, rotary_dim, theta):
    """cos and sin of one angle, from Python floats (float64) alone."""
    angle = position * theta ** (-2.0 * i / rotary_dim)
    return math.cos(angle), math.sin(angle)


def tolerance(dtype, scale=1.0):
    """Absolute error bound for a rotation of values up to ``scale`` whose result is rounded to ``dtype``.

    A table entry rounded once, two products, one sum and the final rounding: a few units of ``dtype``'s
    epsilon (float32's at least, the precision the rotation runs in) times the magnitude.
    """
    if dtype == torch.float64:
        return 1e-12 * scale  # the angle itself, position * inv_freq, carries float64 rounding
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return 4 * eps * scale
