"""``MultiAxisRotaryEmbedding``: each token rotated by several positions at once (time, rows, columns).

Each channel pair belongs to one axis and turns with that axis's position. Which pair belongs to which axis,
and at which frequency it turns, is the whole difference between the schemes (Qwen2-VL's sections,
Qwen3-VL's round robin, the per-axis frequencies of vision towers and diffusion transformers). The module
reduces every scheme to one inverse frequency and one axis per pair, builds each token's angles from its
positions, and rotates with the same kernels as the 1-D case (per-token tables, ``_dispatch``).

A layout may say where the axes are: ``"b (f y x) h d"`` declares the sequence as a grid of f frames, y rows
and x columns, flattened in that order; ``rope(q, k, f=4, y=30, x=52)`` then rotates every token by its grid
coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._dispatch import Rotation, rope
from ._errors import FlexRopeError, LayoutError
from ._functional import bound, parse, per_token_tables
from ._hf_config import check_default_length
from ._mrope_families import multiaxis_settings
from ._layout import AXES, Layout
from ._tables import check_rotary_dim


def _pair_axes(axes: dict[str, int], assignment: object) -> list[int]:
    """The axis (index into ``axes``) of every pair, in channel order."""
    names, counts = list(axes), list(axes.values())
    total = sum(counts)
    if assignment == "sections":
        return [i for i, n in enumerate(counts) for _ in range(n)]
    if assignment == "round_robin":
        left, out = list(counts), []
        while len(out) < total:
            for i in range(len(names)):
                if left[i]:
                    out.append(i)
                    left[i] -= 1
        return out
    if isinstance(assignment, Sequence) and not isinstance(assignment, str):
        if len(assignment) != total or any(name not in axes for name in assignment):
            raise FlexRopeError(
                f"assignment is a sequence of {len(assignment)} names: expected {total} names, one per pair, each "
                f"one of {', '.join(names)}"
            )
        for name, n in axes.items():
            if list(assignment).count(name) != n:
                raise FlexRopeError(f"assignment gives axis {name!r} {list(assignment).count(name)} pairs but "
                                    f"axes gives it {n}")
        return [names.index(name) for name in assignment]
    raise FlexRopeError(f"assignment={assignment!r}: expected 'sections', 'round_robin' or a sequence of axis names")


def _per_axis(value: object, axes: dict[str, int], name: str, kind: type) -> dict[str, float]:
    if isinstance(value, Mapping):
        if set(value) != set(axes):
            raise FlexRopeError(f"{name} names axes {sorted(value)}: expected one entry per axis, {list(axes)}")
        return {axis: kind(value[axis]) for axis in axes}
    return {axis: kind(value) for axis in axes}


def _inverse_frequencies(axes: dict[str, int], pair_axes: list[int], frequencies: str, theta: dict[str, float],
                         inv_freq: object) -> torch.Tensor:
    """Float64 inverse frequency of every pair, in channel order."""
    total = len(pair_axes)
    if inv_freq is not None:
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.shape != (total,) or not inv_freq.dtype.is_floating_point:
            raise FlexRopeError(f"inv_freq must be a floating tensor of shape ({total},): one frequency per pair")
        return inv_freq.detach().to("cpu", torch.float64)
    names = list(axes)
    if frequencies == "shared":
        if len(set(theta.values())) != 1:
            raise FlexRopeError("frequencies='shared' uses one theta_base for every pair: pass one number")
        base = next(iter(theta.values()))
        return base ** -(torch.arange(total, dtype=torch.float64) * 2 / (2 * total))
    if frequencies == "per_axis":
        out, seen = torch.empty(total, dtype=torch.float64), dict.fromkeys(names, 0)
        for j, a in enumerate(pair_axes):
            name = names[a]
            out[j] = theta[name] ** (-2 * seen[name] / (2 * axes[name]))
            seen[name] += 1
        return out
    raise FlexRopeError(f"frequencies={frequencies!r}: expected 'shared' or 'per_axis' (or pass inv_freq=)")


def _grid_layout(layout: object, axes: dict[str, int]) -> tuple[str, tuple[str, ...]]:
    """A layout with a group of axis names in the place of s, as the plain layout and the grid's axes."""
    if not isinstance(layout, str):
        raise LayoutError(f"layout={layout!r}: expected a string such as 'b s h d' or 'b (f y x) h d'")
    grid: tuple[str, ...] = ()
    text = layout
    for start in [i for i, c in enumerate(layout) if c == "("]:
        stop = layout.find(")", start)
        names = tuple(layout[start + 1 : stop].split())
        if names and all(name in axes for name in names):
            if grid:
                raise LayoutError(f"layout {layout!r} has two groups of grid axes: one group stands for s")
            if "s" in layout.replace(layout[start : stop + 1], " ").split():
                raise LayoutError(f"layout {layout!r} has both s and a grid of axes: the grid stands for s")
            grid = names
            text = layout[:start] + "s" + layout[stop + 1 :]
    return text, grid


class MultiAxisRotaryEmbedding(nn.Module):
    """Rotary position embedding with several position axes: each channel pair turns with one axis.

    Notation: b batch, h heads, s sequence, d head dim, r rotary dim (2 x the pairs of all axes).

    Args:
        head_dim: channels per head (d).
        axes: axis name -> number of channel pairs it rotates, e.g. ``{"t": 16, "y": 24, "x": 24}``. Names are
            free identifiers except b, h, s and d, which layouts use (so Qwen-VL's t, h, w are t, y, x here).
        layout: the layout of q and k; a group of axis names may stand in place of s: ``"b (f y x) h d"``.
        assignment: which pair belongs to which axis: ``"sections"`` (contiguous blocks in the order of
            ``axes``), ``"round_robin"`` (pair j to the next axis that still has pairs: Qwen3-VL), or a
            sequence of axis names, one per pair.
        frequencies: ``"shared"``: pair j turns at theta^(-2j / r) (Qwen2-VL, Qwen3-VL); ``"per_axis"``: the
            k-th pair of axis a at theta_a^(-2k / (2 n_a)) (Flux, Wan, vision towers).
        inv_freq: explicit inverse frequencies, one per pair in channel order (overrides ``frequencies``).
        theta_base: a number, or a dict per axis (``per_axis`` only).
        interleaved: pair channels (2i, 2i+1) instead of (i, i + r/2).
        context_length: positions per axis (an int, or a dict per axis): a position past it is an error.
        attention_factor: what cos and sin are multiplied by (YaRN's attention scaling); 1 otherwise.

    Example:
        >>> import torch, flexrope
        >>> rope = flexrope.MultiAxisRotaryEmbedding(64, axes={"y": 16, "x": 16}, layout="b (y x) h d",
        ...                                          frequencies="per_axis")
        >>> q = torch.randn(2, 6 * 8, 4, 64)  # a 6 x 8 grid of patches, flattened row by row
        >>> rope(q, y=6, x=8).shape
        torch.Size([2, 48, 4, 64])
    """

    def __init__(self, head_dim: int, *, axes: Mapping[str, int], layout: str = "b h s d",
                 assignment: object = "sections", frequencies: str = "shared", inv_freq: torch.Tensor | None = None,
                 theta_base: float | Mapping[str, float] = 10_000, interleaved: bool = False,
                 context_length: int | Mapping[str, int] = 4096, attention_factor: float = 1.0) -> None:
        super().__init__()
        try:
            self.axes = self._checked_axes(axes)
            self.rotary_dim = check_rotary_dim(head_dim, 2 * sum(self.axes.values()))
            text, self.grid = _grid_layout(layout, self.axes)
            self.layout: Layout = parse(text, {"d": head_dim})
            self.pair_axes = _pair_axes(self.axes, assignment)
            theta = _per_axis(theta_base, self.axes, "theta_base", float)
            if any(not (math.isfinite(t) and t > 1) for t in theta.values()):
                raise FlexRopeError(f"theta_base={theta_base!r}: expected numbers larger than 1")
            self.context_length = _per_axis(context_length, self.axes, "context_length", int)
            if any(n < 1 for n in self.context_length.values()):
                raise FlexRopeError(f"context_length={context_length!r}: expected positive ints")
            inv = _inverse_frequencies(self.axes, self.pair_axes, frequencies, theta, inv_freq)
            if isinstance(attention_factor, bool) or not isinstance(attention_factor, (int, float)) or not (
                math.isfinite(attention_factor) and attention_factor > 0
            ):
                raise FlexRopeError(f"attention_factor={attention_factor!r}: expected a finite number > 0")
        except FlexRopeError as error:
            raise type(error)(f"MultiAxisRotaryEmbedding(head_dim={head_dim!r}, axes={dict(axes)!r}, "
                              f"layout={layout!r}): {error}") from None
        self.head_dim, self.interleaved, self.layout_text = head_dim, bool(interleaved), layout
        self.attention_factor = float(attention_factor)
        self._rotation = Rotation(self.layout, self.rotary_dim, self.interleaved)
        # the last call's per-token tables, reused by a call at the same positions (every block of a diffusion
        # transformer, every step): (key, positions or None, cos, sin)
        self._last: tuple | None = None
        self.register_buffer("inv_freq", inv, persistent=False)  # float64: angles are computed in float64
        self.register_buffer("pair_axis", torch.tensor(self.pair_axes, dtype=torch.long), persistent=False)
        self.register_buffer("limits", torch.tensor(list(self.context_length.values())), persistent=False)
        # Each axis's own cos and sin (context length, 2, its pairs), float32, side by side: a call gathers its
        # tokens' rows, one gather per axis for both, instead of evaluating cos and sin per token. The same
        # float64 angles rounded once, so the same bits.
        order = [j for a in range(len(self.axes)) for j, b in enumerate(self.pair_axes) if b == a]
        self._channel_order = None if order == sorted(order) else torch.tensor(order).argsort()
        for a, name in enumerate(self.axes):
            pairs = [j for j, b in enumerate(self.pair_axes) if b == a]
            angles = torch.arange(self.context_length[name], dtype=torch.float64)[:, None] * inv[pairs]
            both = torch.stack([angles.cos(), angles.sin()], 1) * self.attention_factor
            self.register_buffer(f"cos_sin_{name}", both.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # a cast to another dtype leaves the frequencies in float64 and the tables in float32 (as in
        # RotaryEmbedding: half precision q and k are rotated in float32); devices move as usual
        self._last = None
        before = {name: t for name, t in self.named_buffers(recurse=False) if t.dtype.is_floating_point}
        super()._apply(fn, recurse)
        for name, table in before.items():
            moved = getattr(self, name)
            if moved.dtype != table.dtype:
                setattr(self, name, table.to(device=moved.device))
        return self

    @staticmethod
    def _checked_axes(axes: object) -> dict[str, int]:
        if not isinstance(axes, Mapping) or not axes:
            raise FlexRopeError(f"axes={axes!r}: expected a dict of axis name -> number of channel pairs")
        for name, pairs in axes.items():
            if not isinstance(name, str) or not name.isidentifier() or name in AXES:
                raise FlexRopeError(f"axis name {name!r}: expected an identifier other than {', '.join(AXES)} "
                                    f"(the layout's own axes)")
            if type(pairs) is not int or pairs < 1:  # noqa: E721 - bool is not a count
                raise FlexRopeError(f"axes[{name!r}]={pairs!r}: expected a positive number of channel pairs")
        return dict(axes)

    def _context(self, error: FlexRopeError, what: str = "") -> FlexRopeError:
        return type(error)(f"MultiAxisRotaryEmbedding(axes={self.axes}, layout={self.layout_text!r}){what}: {error}")

    def _positions(self, seq_len: int, batch: int, positions: object, grid: dict) -> torch.Tensor:
        """Positions as one integer tensor (A, s) or (A, b, s), axes in the order of ``axes``, checked."""
        names = list(self.axes)
        if positions is None:
            if not self.grid:
                raise FlexRopeError("no positions: pass positions= (a dict per axis, or a tensor (A, s)), or "
                                    "declare a grid in the layout such as 'b (t y x) h d' and pass its lengths")
            missing = [name for name in self.grid if name not in grid]
            extra = [name for name in grid if name not in self.grid]
            if missing or extra:
                raise FlexRopeError(f"grid lengths {grid}: expected {', '.join(f'{n}=' for n in self.grid)} (the "
                                    f"layout's grid), got {'no ' + ', '.join(missing) if missing else ''}"
                                    f"{' and unknown ' + ', '.join(extra) if extra else ''}")
            lengths = [grid[name] for name in self.grid]
            if any(isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1 for n in lengths):
                raise FlexRopeError(f"grid lengths {grid}: expected positive ints")
            if math.prod(lengths) != seq_len:
                raise FlexRopeError(f"grid lengths {grid} multiply to {math.prod(lengths)}, but the sequence has "
                                    f"{seq_len} tokens")
            not_in_grid = [name for name in names if name not in self.grid]
            if not_in_grid:
                raise FlexRopeError(f"axes {not_in_grid} are not in the layout's grid: pass positions= instead")
            # each token's grid coordinates, first axis slowest; integer arithmetic rather than unravel_index,
            # which a caller's dynamic compile would specialize on the grid's lengths
            index, stride, coords = torch.arange(seq_len, device=self.inv_freq.device), 1, {}
            for name, length in zip(reversed(self.grid), reversed(lengths)):
                coords[name] = torch.remainder(torch.div(index, stride, rounding_mode="floor"), length)
                stride = stride * length
            by_name = coords
            return torch.stack([by_name[name] for name in names])
        if grid:
            raise FlexRopeError(f"both positions and grid lengths {grid} were given: pass one of them")
        if isinstance(positions, Mapping):
            missing = [name for name in names if name not in positions]
            extra = [name for name in positions if name not in self.axes]
            if missing or extra:
                raise FlexRopeError(f"positions for axes {sorted(positions)}: expected exactly {names}")
            tensors = [positions[name] for name in names]
            if not all(isinstance(t, torch.Tensor) for t in tensors) or len({t.shape for t in tensors}) != 1:
                raise FlexRopeError("positions: expected one integer tensor per axis, all of one shape (s,) or (b, s)")
            positions = torch.stack(tensors)
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or (
            positions.dtype == torch.bool
        ):
            raise FlexRopeError(f"positions of type {getattr(positions, 'dtype', type(positions).__name__)}: expected "
                                f"an integer tensor (A, s) or (A, b, s), or a dict of them per axis")
        if positions.shape[0] != len(names):
            raise FlexRopeError(f"positions of shape {tuple(positions.shape)}: the first dim must be the number of "
                                f"axes, {len(names)} ({', '.join(names)})")
        if positions.ndim not in (2, 3) or positions.shape[-1] != seq_len or (
            positions.ndim == 3 and positions.shape[1] not in (1, batch)
        ):
            raise FlexRopeError(f"positions of shape {tuple(positions.shape)}: expected ({len(names)}, {seq_len}) "
                                f"or ({len(names)}, {batch}, {seq_len})")
        return positions.long()

    def _check_range(self, positions: torch.Tensor) -> None:
        """Every axis's positions in [0, its context length): on the host, or queued on the device (CUDA, and
        inside a caller's compiled graph) where reading them would sync."""
        if positions.is_cuda or torch.compiler.is_compiling():
            limits = self.limits.to(positions.device).view(-1, *[1] * (positions.ndim - 1))
            in_range = ((positions >= 0) & (positions < limits)).all()
            torch._assert_async(in_range, f"flexrope: positions out of the range of an axis: {self.context_length}")
            return
        for i, (name, limit) in enumerate(self.context_length.items()):  # each axis against its own limit
            values = positions[i]
            if values.numel() == 0 or values.device.type == "meta":
                continue
            low, high = torch.aminmax(values)
            if low < 0:
                raise FlexRopeError(f"axis {name!r}: positions hold position {int(low)}: positions must be >= 0")
            if high >= limit:
                raise FlexRopeError(f"axis {name!r}: positions reach position {int(high)}, past the axis's "
                                    f"context_length of {limit}: pass context_length={{..., {name!r}: "
                                    f"{int(high) + 1}}} or more")

    def tables(self, positions: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos and sin (s, r) or (b, s, r) in the seed format, for ``positions`` as ``forward``
        takes them; ``compute_rope`` takes these tables."""
        try:
            one = positions if isinstance(positions, torch.Tensor) else next(iter(positions.values()), None)
            if not isinstance(one, torch.Tensor):
                raise FlexRopeError("positions: expected a tensor (A, s) or (A, b, s), or a dict of tensors per axis")
            per_axis = one.shape[1:] if one is positions else one.shape  # (s,) or (b, s)
            positions = self._positions(per_axis[-1], per_axis[0] if len(per_axis) == 2 else 1, positions, {})
            self._check_range(positions)
        except FlexRopeError as error:
            raise self._context(error, ".tables") from None
        return self._tables(positions)

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32, *, full_width: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos and sin (..., s, r) in the seed format, or half width (..., s, r/2): each pair's angle
        is the position on its axis times its frequency, in float64, rounded once to float32 (the axes'
        tables), or kept in float64."""
        if dtype != torch.float64:  # cos and sin are views of one (..., s, 2, r/2) gather (the kernels take them)
            parts = [getattr(self, f"cos_sin_{name}").index_select(0, positions[a].flatten())
                     for a, name in enumerate(self.axes)]
            both = torch.cat(parts, dim=-1).unflatten(0, positions.shape[1:])
            if self._channel_order is not None:
                both = both.index_select(-1, self._channel_order.to(both.device))
            cos, sin = both.to(dtype).unbind(-2)
            return (torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)) if full_width else (cos, sin)
        per_pair = positions.to(torch.float64).index_select(0, self.pair_axis.to(positions.device))
        angles = per_pair.movedim(0, -1) * self.inv_freq.to(positions.device)
        cos, sin = (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)
        if not full_width:
            return cos, sin
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def _per_token(self, q: torch.Tensor, shape, positions, grid: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width per-token tables (1 or b, s, r/2) for q's call (the kernels read r/2 angles per token),
        checked; those of the last call where its positions were the same: the same grid lengths, or on the
        CPU, equal position values (compared on the host, where reading them costs no sync). Not inside a
        caller's compiled graph, which traces the computation itself."""
        table_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():
            return self._fresh(q, self._positions(shape.s, shape.b, positions, grid), table_dtype)
        key, last = (tuple(sorted(grid.items())), shape.s, shape.b, q.device, table_dtype), self._last
        if positions is None and last is not None and last[0] == key and last[1] is None:
            return last[2], last[3]
        positions = self._positions(shape.s, shape.b, positions, grid)
        on_host = positions.device.type == "cpu"
        if (last is not None and last[0] == key and last[1] is not None and on_host
                and last[1].shape == positions.shape and torch.equal(last[1], positions)):
            return last[2], last[3]
        cos, sin = self._fresh(q, positions, table_dtype)
        if grid or on_host:
            self._last = (key, None if grid else positions.clone(), cos, sin)
        return cos, sin

    def _fresh(self, q: torch.Tensor, positions: torch.Tensor, table_dtype: torch.dtype):
        self._check_range(positions)
        cos, sin = self._tables(positions.to(q.device), table_dtype, full_width=False)
        return (cos[None], sin[None]) if cos.ndim == 2 else (cos, sin)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None, /, *, positions=None, **grid: int):
        """Rotate q (and k), each laid out as the module's layout.

        Args:
            q, k: queries and keys (k optional, may have other head counts).
            positions: a dict axis -> integer tensor (s,) or (b, s), or one tensor (A, s) or (A, b, s) with the
                axes in the order of ``axes`` (Qwen-VL's ``position_ids`` of shape (3, b, s)).
            **grid: the lengths of the layout's grid axes, e.g. ``f=4, y=30, x=52``: positions are then each
                token's grid coordinates.

        Returns:
            The rotated q, or ``(q, k)``.
        """
        try:
            shape = bound(self.layout, q)
            if k is not None:
                k_shape = bound(self.layout, k)
                if (k_shape.b, k_shape.s) != (shape.b, shape.s):
                    raise FlexRopeError(f"q has (b, s) = ({shape.b}, {shape.s}) but k has ({k_shape.b}, "
                                        f"{k_shape.s}): they share the positions")
            cos, sin = self._per_token(q, shape, positions, grid)
            cos, sin, where = per_token_tables(cos, sin, shape, None, 0)
            where = 0 if where is None else where
        except FlexRopeError as error:
            shape_text = tuple(q.shape) if isinstance(q, torch.Tensor) and not q.is_nested else type(q).__name__
            raise self._context(error, f" on q of shape {shape_text}") from None
        operands = [(q, where)] if k is None else [(q, where), (k, where)]
        out = rope(self._rotation, cos, sin, operands, inplace=False, table_len=cos.shape[0], positions_checked=True)
        return out[0] if k is None else out

    @classmethod
    def from_hf_config(cls, config, *, layer_type: str | None = None, layout: str = "b h s d",
                       context_length: int | Mapping[str, int] | None = None) -> "MultiAxisRotaryEmbedding":
        """The multi-axis (M-RoPE) rotary embedding of a vision-language model's text model, from its config.

        Args:
            config: a ``transformers`` config object or a plain dict (a ``config.json``): the top-level config
                of the model (read through its ``text_config``) or the text model's own. Its ``model_type``
                names the family, which says how pairs are assigned to the axes and paired (see the README's
                table: Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni, PaddleOCR-VL, Qwen3-VL, Qwen3-Omni, Qwen3.5, Cosmos-3,
                Cohere-Compass, HY-V4-VL, GLM-4V, GLM-4.5V, GLM-OCR, GLM-Image, ERNIE-4.5-VL, NeoMME); the
                config's ``mrope_section``, ``partial_rotary_factor``, ``rope_theta`` and ``rope_type`` (linear,
                llama3, yarn) are read. A dict without ``model_type`` is read as Qwen2-VL, or as Qwen3-VL where
                ``mrope_interleaved`` is set.
            layer_type: for configs whose ``rope_parameters`` differ per layer type, the type of the layer.
            layout: the layout of q and k in your code.
            context_length: positions per axis in the tables (an int, or one per axis); default the config's
                ``max_position_embeddings``, refused where its tables would pass 2 GiB.

        Positions are the model's ``position_ids`` of shape (A, b, s) (A = 3: t, y, x; NeoMME's two: y, x).
        """
        try:
            settings = multiaxis_settings(config, layer_type)
            if context_length is not None:
                settings["context_length"] = context_length
            else:  # cos and sin, float32, of each axis's pairs
                check_default_length(settings["context_length"], 2 * 4 * sum(settings["axes"].values()))
        except FlexRopeError as error:
            raise type(error)(f"MultiAxisRotaryEmbedding.from_hf_config: {error}") from None
        return cls(layout=layout, **settings)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, axes={self.axes}, layout={self.layout_text!r}"
