"""``RotaryEmbedding``: the tables held once, q and k rotated in the declared layout."""

from __future__ import annotations

import torch
from torch import nn

from ._autograd import rope
from ._errors import FlexRopeError
from ._functional import bound, checked_positions, parse
from ._tables import check_rotary_dim, precompute_rope_params


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for q and k laid out as ``layout``.

    Notation: b batch, h heads, s sequence, d head dim, r rotary dim.

    Args:
        head_dim: channels per head (d). It is also a check: every call's d axis must have this length, and
            it lets grouped layouts such as ``"b s (h d)"`` work for any head count (GQA).
        layout: einops pattern of q and k, e.g. ``"b h s d"`` (default) or ``"b s h d"``. Parsed here: a bad
            layout fails at construction.
        theta_base: base of the frequencies.
        context_length: positions in the tables; a position past it is an error, never clamped or wrapped.
        rotary_dim: channels that rotate (default head_dim); the rest pass through.
        interleaved: pair channels (2i, 2i+1) instead of (i, i + r/2).
        scaling: a context-extension recipe, or None.
        **axes_lengths: other axis lengths the layout needs, e.g. ``b=2`` for ``"s (b h) d"``.

    The tables ``cos`` and ``sin`` (context_length, r) are non-persistent buffers: never in ``state_dict``,
    they follow ``.to(device)`` but stay float32 when the module is cast to half precision (the rotation of
    bf16 q and k runs in float32). A float64 cast recomputes them in float64. After meta-device construction
    and ``to_empty(device=...)``, call :meth:`reset_parameters` to fill them.

    Example:
        >>> import torch, flexrope
        >>> rope = flexrope.RotaryEmbedding(64, layout="b s h d")
        >>> q, k = torch.randn(2, 10, 8, 64), torch.randn(2, 10, 2, 64)  # 8 query heads, 2 key heads
        >>> q, k = rope(q, k)
        >>> q.shape, k.shape
        (torch.Size([2, 10, 8, 64]), torch.Size([2, 10, 2, 64]))
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        *,
        layout: str = "b h s d",
        theta_base: float = 10_000,
        context_length: int = 4096,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        scaling: dict | None = None,
        **axes_lengths: int,
    ) -> None:
        super().__init__()
        try:
            self.rotary_dim = check_rotary_dim(head_dim, rotary_dim)
            if "d" in axes_lengths:
                raise FlexRopeError(f"d={axes_lengths['d']} was given as a keyword: head_dim gives d")
            self.layout = parse(layout, {"d": head_dim, **axes_lengths})
        except FlexRopeError as error:
            raise type(error)(f"RotaryEmbedding(head_dim={head_dim!r}, layout={layout!r}): {error}") from None
        self.head_dim, self.theta_base, self.context_length = head_dim, theta_base, context_length
        self.interleaved, self.scaling = interleaved, scaling
        cos, sin = self._tables(torch.float32, device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, dtype: torch.dtype, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        return precompute_rope_params(
            self.head_dim,
            self.theta_base,
            self.context_length,
            rotary_dim=self.rotary_dim,
            scaling=self.scaling,
            dtype=dtype,
            device=device,
        )

    def reset_parameters(self) -> None:
        """Recompute the tables in place, on their current device: call it after ``to_empty()``."""
        self.cos, self.sin = self._tables(self.cos.dtype, self.cos.device)

    def _apply(self, fn, recurse=True):
        before = self.cos, self.sin
        super()._apply(fn, recurse)
        if self.cos.dtype == before[0].dtype:
            return self
        if self.cos.dtype == torch.float64:
            self.cos, self.sin = self._tables(torch.float64, self.cos.device)
        else:  # a cast to lower precision: keep the float32 tables, on the new device
            self.cos, self.sin = (t.to(device=new.device) for t, new in zip(before, (self.cos, self.sin)))
        return self

    def _positions(self, x: torch.Tensor, name: str, positions, offset) -> tuple[int, int | torch.Tensor]:
        """The sequence length of ``x`` and its checked positions."""
        try:
            shape = bound(self.layout, x)
            return shape.s, checked_positions(x, shape, self.cos, positions, offset)
        except FlexRopeError as error:
            shape_text = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise type(error)(
                f"RotaryEmbedding(layout={self.layout.text!r}, head_dim={self.head_dim}) on {name} of shape "
                f"{shape_text}: {error}"
            ) from None

    def _rotate(self, x: torch.Tensor, where: int | torch.Tensor) -> torch.Tensor:
        half = self.rotary_dim // 2
        return rope(
            x,
            self.layout,
            self.cos[:, :half],
            self.sin[:, :half],
            where,
            rotary_dim=self.rotary_dim,
            interleaved=self.interleaved,
            inplace=False,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        offset: int | torch.Tensor = 0,
        k_positions: torch.Tensor | None = None,
        k_offset: int | torch.Tensor | None = None,
    ):
        """Rotate q (and k), each laid out as the module's layout.

        Args:
            q: queries, e.g. (b h s d).
            k: keys, optional. May have fewer heads than q (GQA, MQA).
            positions: integer tensor (s,) or (b, s) of q's positions (and k's, unless k_positions is given).
            offset: int or integer tensor (b,): q's first position (and k's, unless k_offset is given).
            k_positions, k_offset: k's own positions, when k is not aligned with q (e.g. queries for the new
                tokens, keys for the whole cache).

        Returns:
            The rotated q, or ``(q, k)`` when k is given.
        """
        if k is None and (k_positions is not None or k_offset is not None):
            raise FlexRopeError("k_positions or k_offset was given without k")
        q_len, q_where = self._positions(q, "q", positions, offset)
        if k is None:
            return self._rotate(q, q_where)
        inherited = k_positions is None and k_offset is None
        if inherited:
            k_positions, k_offset = positions, offset
        k_len, k_where = self._positions(k, "k", k_positions, 0 if k_offset is None else k_offset)
        if inherited and q_len != k_len:
            raise FlexRopeError(
                f"q has {q_len} tokens and k has {k_len}: say where k's tokens are with k_offset= or "
                f"k_positions= (e.g. k_offset=0 for keys of the whole cache)"
            )
        return self._rotate(q, q_where), self._rotate(k, k_where)

    def extra_repr(self) -> str:
        parts = [
            f"head_dim={self.head_dim}",
            f"layout={self.layout.text!r}",
            f"theta_base={self.theta_base}",
            f"context_length={self.context_length}",
        ]
        if self.rotary_dim != self.head_dim:
            parts.append(f"rotary_dim={self.rotary_dim}")
        if self.interleaved:
            parts.append("interleaved=True")
        if self.scaling is not None:
            parts.append(f"scaling={self.scaling!r}")
        return ", ".join(parts)
