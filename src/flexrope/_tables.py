"""The cos/sin tables: inverse frequencies and angles, computed in float64 and rounded once.

Tables are in the seed format: shape (context_length, rotary_dim), the rotary_dim/2 angles of each position
written twice, ``[t0 .. tn-1, t0 .. tn-1]``. In float32, ``position * inv_freq`` loses the angle at long
context (0.075 off in cos at position 1,048,575 with theta 500,000); in float64 and rounded once it is within
3e-8 of the truth.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._errors import FlexRopeError
from ._scaling import frequencies, parse_scaling

# Rows of the float64 angle table made at once: bounds the temporary memory at long context.
_CHUNK_ROWS = 1 << 16


def check_rotary_dim(head_dim: object, rotary_dim: object) -> int:
    """The rotary dim (head_dim when None), checked: positive, even, at most head_dim."""
    if type(head_dim) is not int or head_dim < 1:  # noqa: E721 - bool is not a dim
        raise FlexRopeError(f"head_dim={head_dim!r}: expected a positive int")
    if rotary_dim is None:
        rotary_dim = head_dim
    elif type(rotary_dim) is not int or rotary_dim < 1:  # noqa: E721
        raise FlexRopeError(f"rotary_dim={rotary_dim!r}: expected a positive int or None")
    if rotary_dim % 2:
        what = f"rotary_dim={rotary_dim}" if rotary_dim != head_dim else f"head dim {head_dim}"
        raise FlexRopeError(f"{what} is odd: channels rotate in pairs, so the rotary dim must be even")
    if rotary_dim > head_dim:
        raise FlexRopeError(f"rotary_dim={rotary_dim} is larger than the head dim {head_dim}")
    return rotary_dim


def _float64_device(device: torch.device) -> torch.device:
    # MPS has no float64: the angles are made on the CPU and the rounded tables moved.
    return torch.device("cpu") if device.type == "mps" else device


def tables_from_inverse_frequencies(
    inv_freq: torch.Tensor,
    context_length: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed-format cos and sin tables for positions ``0 .. context_length - 1`` from float64 ``inv_freq``,
    times ``attention_factor``."""
    half = inv_freq.shape[0]
    work = _float64_device(device)
    inv_freq = inv_freq.to(device=work, dtype=torch.float64)
    cos = torch.empty(context_length, 2 * half, dtype=dtype, device=work)
    sin = torch.empty_like(cos)
    for row in range(0, context_length, _CHUNK_ROWS):
        stop = min(row + _CHUNK_ROWS, context_length)
        angles = torch.arange(row, stop, dtype=torch.float64, device=work)[:, None] * inv_freq
        for table, values in ((cos, angles.cos()), (sin, angles.sin())):
            table[row:stop, :half] = values if attention_factor == 1.0 else values * attention_factor
            table[row:stop, half:] = table[row:stop, :half]
    return cos.to(device), sin.to(device)


def tables_at(
    inv_freq: torch.Tensor, positions: torch.Tensor | range, *, dtype: torch.dtype, device: torch.device,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos and sin tables (N, r/2) of the N ``positions`` (a tensor or a range) alone, from float64
    ``inv_freq``, times ``attention_factor``: the rows a call reads, where a whole table would be wasted
    (dynamic NTK). The fewest operations: a decoding step calls this every time."""
    if isinstance(positions, range) and device.type == "cpu" and dtype == torch.float32 and attention_factor == 1.0:
        tables = _native.tables(inv_freq, positions)  # the same bits, in one call rather than six operations
        if tables is not None:
            return tables
    work = _float64_device(device)
    inv_freq = inv_freq if inv_freq.device == work else inv_freq.to(work)
    if isinstance(positions, range) and len(positions) == 1:  # a decoding step: one product, exact as the outer
        angles = inv_freq.mul(float(positions[0])).unsqueeze(0)
    else:
        if isinstance(positions, range):
            positions = torch.arange(positions.start, positions.stop, device=work)
        angles = positions.to(device=work, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def precompute_rope_params(
    head_dim: int,
    theta_base: float = 10_000,
    context_length: int = 4096,
    *,
    rotary_dim: int | None = None,
    scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables for positions ``0 .. context_length - 1``.

    Args:
        head_dim: channels per head (d).
        theta_base: the base of the frequencies, ``inv_freq_i = theta_base ** (-2i / rotary_dim)``.
        context_length: number of positions (rows) in the tables.
        rotary_dim: channels that rotate (r), the first r of each head; the rest pass through. Defaults to
            head_dim. Frequencies are computed from r, not from head_dim.
        scaling: a context-extension recipe: a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict
            (``rope_type`` or ``type``: default, linear, dynamic, yarn, longrope, llama3) or the seed's llama3
            ``freq_config``; ``None`` for plain RoPE. ``dynamic`` and ``longrope`` depend on the length of the
            sequence: these tables are those of a sequence of ``context_length`` tokens.
        dtype: floating dtype of the tables. The angles are computed in float64 and rounded once to it.
        device: where the tables live; default torch's default device (so ``with torch.device("meta")``
            makes meta tables).

    Returns:
        ``(cos, sin)``, each of shape (context_length, rotary_dim): the r/2 angles of each position written
        twice, ``[t0 .. tn-1, t0 .. tn-1]``, as the seed code and Hugging Face lay them out.

    Example:
        >>> import flexrope
        >>> cos, sin = flexrope.precompute_rope_params(64, context_length=16)
        >>> cos.shape, sin.dtype
        (torch.Size([16, 64]), torch.float32)
    """
    try:
        rotary_dim = check_rotary_dim(head_dim, rotary_dim)
        if type(context_length) is not int or context_length < 1:  # noqa: E721
            raise FlexRopeError(f"context_length={context_length!r}: expected a positive int")
        if isinstance(theta_base, bool) or not isinstance(theta_base, (int, float)) or not (
            math.isfinite(theta_base) and theta_base > 1
        ):
            raise FlexRopeError(f"theta_base={theta_base!r}: expected a finite number larger than 1")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise FlexRopeError(f"dtype={dtype!r}: expected a floating torch dtype such as torch.float32")
        recipe = parse_scaling(scaling, rotary_dim=rotary_dim, head_dim=head_dim, theta_base=theta_base)
    except FlexRopeError as error:
        raise FlexRopeError(f"precompute_rope_params(head_dim={head_dim!r}): {error}") from None
    device = torch.get_default_device() if device is None else torch.device(device)
    inv_freq, attention_factor = frequencies(recipe, rotary_dim, theta_base, context_length)
    return tables_from_inverse_frequencies(
        inv_freq, context_length, dtype=dtype, device=device, attention_factor=attention_factor
    )
