"""Independent references, written from the definition of RoPE (not from flexrope's kernels)."""

from __future__ import annotations

import math

import torch


def pair_indices(rotary_dim: int, interleaved: bool) -> list[tuple[int, int]]:
    """The (first, second) channel of each pair i: (i, i + r/2) half-split, (2i, 2i + 1) interleaved."""
    half = rotary_dim // 2
    if interleaved:
        return [(2 * i, 2 * i + 1) for i in range(half)]
    return [(i, i + half) for i in range(half)]


def rope_loop(x, positions, *, theta=10_000.0, rotary_dim=None, interleaved=False, inv_freq=None):
    """RoPE as a float64 loop over pairs.

    Args:
        x: (b h s d) tensor, any floating dtype.
        positions: (b, s) integer tensor, the position of each token.
        theta, rotary_dim, interleaved: as in :func:`flexrope.compute_rope`; ``inv_freq`` (r/2,) replaces
            ``theta ** (-2i / r)``.

    Returns:
        The rotated (b h s d) tensor in float64.
    """
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
    """RoPE as complex multiplication, in float64: each pair is a complex number times exp(i * angle).

    ``x`` is (b h s d), ``positions`` (b, s); every channel rotates.
    """
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


def float64_angle_truth(position: int, i: int, rotary_dim: int, theta: float) -> tuple[float, float]:
    """cos and sin of the angle of pair ``i`` at ``position``, from Python floats (float64) alone."""
    angle = position * theta ** (-2.0 * i / rotary_dim)
    return math.cos(angle), math.sin(angle)


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Absolute error bound for a rotation of values up to ``scale`` whose result is rounded to ``dtype``.

    A table entry rounded once, two products, one sum and the final rounding: a few units of ``dtype``'s
    epsilon (float32's at least, the precision the rotation runs in) times the magnitude.
    """
    if dtype == torch.float64:
        return 1e-12 * scale  # the angle itself, position * inv_freq, carries float64 rounding
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return 4 * eps * scale
