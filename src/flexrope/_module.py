"""``RotaryEmbedding``: the tables held once, q and k rotated in the declared layout."""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from ._dispatch import (Rotation, _shares_elements, check_out, check_out_index, refuse_grad_into, rope, rope_at,
                        write_at)
from ._errors import FlexRopeError
from ._functional import bound, checked_flag, checked_positions, parse
from ._kinds import plain
from ._positions import RowStarts, Where, assert_values_async, check_values, position_tensor, values_on_host
from . import _native
from ._qknorm import module_norm, native_applies, norm_settings, normed_rotation
from ._hf_config import check_default_length, layer_rope, settings_from_hf_config
from ._scaling import frequencies, parse_scaling, softmax_scale_factor
from ._tables import check_rotary_dim, precompute_rope_params, tables_at


def _rows(where: Where, seq_len: int) -> tuple[torch.Tensor | range, int | torch.Tensor]:
    """The positions whose angles a call reads, and where each token finds its own among them."""
    if isinstance(where, int):
        return range(where, where + seq_len), 0
    positions = position_tensor(where, seq_len)
    return positions.flatten(), torch.arange(positions.numel(), device=positions.device).view(positions.shape)


def _own_storages(pairs: list[tuple]) -> bool:
    """Whether the tensors of ``pairs`` ((x, out, name, out_index) of q and k) are each in a storage of their
    own (an out that is x is not)."""
    storages = []
    try:  # (not storage_address: this is every call's; a meta tensor's address is 0, the same for all)
        for x, out, _, _ in pairs:
            storages.append(x.untyped_storage().data_ptr())
            if isinstance(out, torch.Tensor):
                storages.append(out.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # no storage to tell (a wrapper subclass, a sparse out)
        return False
    return len(set(storages)) == len(storages)


def _apart(pairs: list[tuple], outs: list) -> None:
    """Refuse q's out over k or k's out over q (the first one written over the other before it is read), and two
    outs over each other. ``pairs``: (x, out, name, out_index) of q and k; ``outs``: their checked outs."""
    (q, _, q_name, _), (k, _, k_name, _) = pairs
    q_out, k_out = outs
    for out, name, other, other_name in ((q_out, q_name, k, k_name), (k_out, k_name, q, q_name)):
        if out is not None and _shares_elements(out, other):
            raise FlexRopeError(f"{name}_out overlaps {other_name} in memory: {other_name} would be overwritten "
                                f"before it is read; pass a {name}_out apart from {other_name}")
    if q_out is not None and k_out is not None and _shares_elements(q_out, k_out):
        raise FlexRopeError(f"{q_name}_out and {k_name}_out overlap in memory: one would be written over the "
                            f"other; pass outs apart from each other")


def _reach(where: Where, seq_len: int) -> int:
    """1 + the largest position: the length of the sequence, as length-dependent recipes count it (reads
    tensor positions on the host: only these recipes need it)."""
    if isinstance(where, int):
        return where + seq_len
    if isinstance(where, RowStarts):
        return int(where.starts.long().max()) + seq_len if where.starts.numel() else 0
    return int(where.long().max()) + 1 if where.numel() else 0


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
        scaling: a context-extension recipe (a Hugging Face ``rope_scaling`` dict), or None. For ``dynamic``
            and ``longrope``, whose frequencies depend on the length of the sequence, each call uses the
            frequencies of its own length: 1 + the largest position among q and k, as the reference does.
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
            interleaved = checked_flag("interleaved", interleaved)
            if "d" in axes_lengths:
                raise FlexRopeError(f"d={axes_lengths['d']} was given as a keyword: head_dim gives d")
            self.layout = parse(layout, {"d": head_dim, **axes_lengths}, keywords=("theta_base", "context_length",
                                "rotary_dim", "interleaved", "scaling"))
            self._recipe = parse_scaling(scaling, rotary_dim=self.rotary_dim, head_dim=head_dim, theta_base=theta_base)
        except FlexRopeError as error:
            raise type(error)(f"RotaryEmbedding(head_dim={head_dim!r}, layout={layout!r}): {error}") from None
        self.head_dim, self.theta_base, self.context_length = head_dim, theta_base, context_length
        self.interleaved, self.scaling = interleaved, scaling
        self._rotation = Rotation(self.layout, self.rotary_dim, bool(interleaved))
        self._halves: dict[int, tuple] = {}  # the fused CPU call's half-width tables (_half_tables)
        self._dynamic = self._recipe is not None and self._recipe.rope_type == "dynamic"
        recipe = self._recipe
        # L0 when calls of at most L0 positions use other tables than longer ones (dynamic, longrope)
        self._short_length = recipe.original_length if (
            recipe is not None and recipe.length_dependent and recipe.original_length < context_length) else None
        # dynamic NTK: up to this many positions the tables hold the call's angles; past it, rows per call
        self._plain_limit = min(recipe.original_length, context_length) if self._dynamic else None
        # the attention's softmax scale: 1/sqrt(d) (of the whole q.k head, from_hf_config says which), times
        # mscale^2 where YaRN sets mscale_all_dim (DeepSeek)
        self.softmax_scale = head_dim ** -0.5 * softmax_scale_factor(self._recipe)
        for name, table in self._tables(torch.float32, device=None).items():
            self.register_buffer(name, table, persistent=False)

    def _tables(self, dtype: torch.dtype, device: torch.device | None) -> dict[str, torch.Tensor]:
        """The buffers: tables for ``context_length`` positions, and for L0 where the recipe depends on length."""
        lengths = {"": self.context_length}
        if self._short_length is not None:
            lengths["short_"] = self._short_length
        tables = {}
        for prefix, length in lengths.items():
            tables[f"{prefix}cos"], tables[f"{prefix}sin"] = precompute_rope_params(
                self.head_dim,
                self.theta_base,
                length,
                rotary_dim=self.rotary_dim,
                scaling=self.scaling,
                dtype=dtype,
                device=device,
            )
        return tables

    def reset_parameters(self) -> None:
        """Recompute the tables in place, on their current device: call it after ``to_empty()``."""
        for name, table in self._tables(self.cos.dtype, self.cos.device).items():
            setattr(self, name, table)

    def _apply(self, fn, recurse=True):
        before = dict(self.named_buffers(recurse=False))
        super()._apply(fn, recurse)
        if self.cos.dtype == before["cos"].dtype:
            return self
        if self.cos.dtype == torch.float64:
            self.reset_parameters()
        else:  # a cast to lower precision: keep the float32 tables, on the new device
            for name, table in before.items():
                setattr(self, name, table.to(device=getattr(self, name).device))
        return self

    def _rotate(self, operands: list[tuple[torch.Tensor, int, Where]], inverse: bool, outs: tuple | None = None
                ) -> tuple[torch.Tensor, ...]:
        """Rotate each (x, sequence length, where) with the tables its call needs (into ``outs``, one tensor
        or None per operand, where given)."""
        outs = outs or (None,) * len(operands)
        inplace = all(out is x for out, (x, _, _) in zip(outs, operands))
        if inplace or not any(out is not None for out in outs):
            outs = None
        short = self._short_length
        reach = max(_reach(where, length) for _, length, where in operands) if short or self._dynamic else 0
        if self._dynamic and reach > self._plain_limit:
            # dynamic NTK past L0: the frequencies of this very length, at the rows this call reads alone
            inv_freq, attention_factor = frequencies(self._recipe, self.rotary_dim, self.theta_base, reach)
            table = self.cos
            (_, length, where), *others = operands
            given = outs or (None,) * len(operands)
            if isinstance(where, int) and all(other[1:] == (length, where) for other in others):
                # q and k at a step share their rows
                groups = [(where, length, [x for x, _, _ in operands], given)]
            else:
                groups = [(where, length, [x], (out,)) for (x, length, where), out in zip(operands, given)]
            out = []
            for where, length, xs, into in groups:
                rows, local = _rows(where, length)
                cos, sin = tables_at(inv_freq, rows, dtype=table.dtype, device=table.device,
                                     attention_factor=attention_factor)
                out += rope(self._rotation, cos, sin, [(x, local) for x in xs], inplace=inplace,
                            table_len=cos.shape[0], inverse=inverse, positions_checked=True, outs=into)
            return tuple(out)
        cos, sin = self._buffers["cos"], self._buffers["sin"]
        if short is not None and reach <= short:
            cos, sin = self.short_cos, self.short_sin
        return rope(self._rotation, cos, sin, [(x, where) for x, _, where in operands], inplace=inplace,
                    table_len=cos.shape[0], inverse=inverse, positions_checked=values_on_host(operands[0][0]),
                    outs=outs)

    @classmethod
    def from_hf_config(cls, config, *, layer_type: str | None = None, layer_idx: int | None = None,
                       layout: str = "b h s d", context_length: int | None = None,
                       **axes_lengths: int) -> "RotaryEmbedding | None":
        """The module a Hugging Face model's attention uses, from its config.

        Args:
            config: a ``transformers`` config object or a plain dict (a ``config.json``): ``head_dim`` or
                ``hidden_size`` / ``num_attention_heads`` (or ``n_embd`` / ``n_head``), ``rope_theta``,
                ``rope_scaling`` or ``rope_parameters``, ``partial_rotary_factor`` or ``rotary_pct``,
                ``max_position_embeddings`` (or ``n_positions``); GPT-J's ``rotary_dim``; DeepSeek's
                ``qk_rope_head_dim`` and ``rope_interleave`` (the module is then the one of the rotary slice).
            layer_type: for configs whose ``rope_parameters`` differ per layer type (Gemma 3 and 4:
                ``"sliding_attention"``, ``"full_attention"``), the type of the layer this module serves.
            layer_idx: the layer this module serves, instead of ``layer_type``: its type is read from the
                config's ``layer_types``, and a layer that does not rotate (SmolLM3's and Llama 4's
                ``no_rope_layers``, Cohere 2's full attention layers) gives None, not a module.
            layout: the layout of q and k in your code.
            context_length: positions in the tables; default ``max_position_embeddings``.

        A composite config (vision-language, speech) is read through its text config. The family (the
        ``model_type``) decides what the config leaves unsaid, from flexrope's table (docs/families.md): the
        pairing, a multi-head latent attention's rope slice, which layers rotate. A family missing from the
        table, or one the module cannot express, is a FlexRopeError that says what to build instead.

        The module's ``softmax_scale`` is the scale of the attention's scores that the config implies:
        1/sqrt of the q.k head dim (DeepSeek: ``qk_nope_head_dim + qk_rope_head_dim``), times YaRN's
        mscale^2 where ``mscale_all_dim`` is set.
        """
        try:
            if layer_idx is not None:
                rotates, kind = layer_rope(config, layer_idx)
                if not rotates:
                    return None
                if layer_type is not None and kind != layer_type:
                    raise FlexRopeError(f"layer_type={layer_type!r} was passed but layer {layer_idx} is of type "
                                        f"{kind!r}: pass one of them")
                layer_type = kind
            settings = settings_from_hf_config(config, layer_type)
        except FlexRopeError as error:
            raise type(error)(f"RotaryEmbedding.from_hf_config: {error}") from None
        if context_length is not None:
            settings["context_length"] = context_length
        else:  # the config's max_position_embeddings, within reason: cos and sin, float32, full width
            try:
                check_default_length(settings["context_length"],
                                     2 * 4 * (settings.get("rotary_dim") or settings["head_dim"]))
            except FlexRopeError as error:
                raise type(error)(f"RotaryEmbedding.from_hf_config: {error}") from None
        qk_head_dim = settings.pop("qk_head_dim")
        rope = cls(layout=layout, **settings, **axes_lengths)
        rope.softmax_scale = qk_head_dim ** -0.5 * softmax_scale_factor(rope._recipe)
        return rope

    def _context(self, error: FlexRopeError, what: str) -> FlexRopeError:
        return type(error)(f"RotaryEmbedding(layout={self.layout.text!r}, head_dim={self.head_dim}){what}: {error}")

    def _positions(self, x: torch.Tensor, name: str, positions, offset) -> tuple[int, Where]:
        """The sequence length of ``x`` and where its tokens are, checked."""
        try:
            shape = bound(self.layout, x)
            cos = self._buffers["cos"]  # (nn.Module's __getattr__ is Python: every call reads the tables)
            if not self._dynamic:
                where = checked_positions(x, shape, cos, positions, offset)
                if not isinstance(where, int) and values_on_host(x):  # (on a GPU: on the device, in the call)
                    check_values(where, shape.s, cos.shape[0])  # here, to say whose positions they are
                return shape.s, where
            # dynamic NTK exists to run past the original length: any position >= 0, its rows computed per call
            where = checked_positions(x, shape, cos, positions, offset, table_len=sys.maxsize)
            check_values(where, shape.s, sys.maxsize)
            return shape.s, where
        except FlexRopeError as error:
            shape_text = tuple(x.shape) if isinstance(x, torch.Tensor) and not x.is_nested else type(x).__name__
            raise self._context(error, f" on {name} of shape {shape_text}") from None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        offset: int | torch.Tensor = 0,
        k_positions: torch.Tensor | None = None,
        k_offset: int | torch.Tensor | None = None,
        inverse: bool = False,
        q_out: torch.Tensor | None = None,
        k_out: torch.Tensor | None = None,
        q_norm: object = None,
        k_norm: object = None,
        q_out_index: torch.Tensor | None = None,
        k_out_index: torch.Tensor | None = None,
    ):
        """Rotate q (and k), each laid out as the module's layout.

        Args:
            q: queries, e.g. (b h s d).
            k: keys, optional. May have fewer heads than q (GQA, MQA).
            positions: integer tensor (s,) or (b, s) of q's positions (and k's, unless k_positions is given).
            offset: int or integer tensor (b,): q's first position (and k's, unless k_offset is given).
            k_positions, k_offset: k's own positions, when k is not aligned with q (e.g. queries for the new
                tokens, keys for the whole cache).
            inverse: rotate by the negated angles, undoing a rotation at the same positions.
            q_out, k_out: tensors of q's (k's) shape, dtype and device, laid out as the module's layout with any
                strides (``cache_k[:, n:n + s]``), that the rotation is written into, in the same pass, and
                returned; ``q_out=q`` is in place. As torch's ``out=``, no autograd.
            q_norm, k_norm: the attention's QK-norm, applied to each head before the rotation in the same pass:
                a ``torch.nn.RMSNorm`` over the head dim, or a model's own (``.weight`` and ``.eps`` or
                ``.variance_epsilon``: transformers' Qwen3RMSNorm), called once on a probe to learn whether it
                scales by ``weight`` or, as Gemma's do, by ``1 + weight`` (a norm that is neither, a LayerNorm,
                is refused); or a tuple (weight, eps, offset). Gradients flow to q, k and the weights.
            q_out_index, k_out_index: integer tensors (s,) or (b, s) of q's (k's) tokens: each token's sequence
                index in ``q_out`` (``k_out``), as ``compute_rope``'s ``out_index``: a ring buffer or a shared
                cache written by index, a negative index skipping its token; the out's sequence length may then
                differ.

        Returns:
            The rotated q, or ``(q, k)`` when k is given (``q_out``, ``k_out`` where given).
        """
        if k is None and (k_positions is not None or k_offset is not None or k_out is not None
                          or k_out_index is not None):
            raise self._context(FlexRopeError("k_positions, k_offset, k_out or k_out_index was given without k"), "")
        q_len, q_where = self._positions(q, "q", positions, offset)
        if k is None and k_norm is not None:
            raise self._context(FlexRopeError("k_norm was given without k"), "")
        outs = self._outs([(q, q_out, "q", q_out_index)] + ([] if k is None else [(k, k_out, "k", k_out_index)]))
        indices = None
        if q_out_index is not None or k_out_index is not None:
            indices = self._indices([(q, outs[0], "q", q_out_index)] + ([] if k is None else
                                                                         [(k, outs[1], "k", k_out_index)]))
        normed = q_norm is not None or k_norm is not None
        if k is None and (normed or indices):
            return self._normed([(q, q_len, q_where, q_norm, q_out, "q")], inverse, indices)[0]
        if k is None:
            return self._rotate([(q, q_len, q_where)], inverse, outs)[0]
        inherited = k_positions is None and k_offset is None
        if inherited:
            k_positions, k_offset = positions, offset
        k_len, k_where = self._positions(k, "k", k_positions, 0 if k_offset is None else k_offset)
        if inherited and q_len != k_len:
            raise self._context(FlexRopeError(
                f"q has {q_len} tokens and k has {k_len}: say where k's tokens are with k_offset= or "
                f"k_positions= (e.g. k_offset=0 for keys of the whole cache)"
            ), "")
        if normed or indices:
            return self._normed([(q, q_len, q_where, q_norm, q_out, "q"), (k, k_len, k_where, k_norm, k_out, "k")],
                                inverse, indices)
        q, k = self._rotate([(q, q_len, q_where), (k, k_len, k_where)], inverse, outs)
        return q, k

    def _normed(self, operands: list[tuple], inverse: bool, indices: tuple | None = None) -> tuple[torch.Tensor, ...]:
        """Each (x, sequence length, where, norm, out, name): its norm (where given) and rotation, into out (at the
        checked out indices of ``indices``, one per operand, where given)."""
        try:
            if indices is not None and not any(norm is not None for *_, norm, _, _ in operands):
                return tuple(self._at(x, length, where, out, index, inverse)
                             for (x, length, where, _, out, _), index in zip(operands, indices))
            if inverse or self._dynamic:
                raise FlexRopeError("q_norm/k_norm with inverse=True or dynamic NTK scaling: normalise first, "
                                    "then rotate")
            cos, sin = self._buffers["cos"], self._buffers["sin"]
            reach = max(_reach(where, length) for _, length, where, *_ in operands) if self._short_length else 0
            if self._short_length is not None and reach <= self._short_length:
                cos, sin = self.short_cos, self.short_sin
            if indices is None and not torch.is_grad_enabled() and native_applies(operands[0][0]):
                looped = self._looped(operands, cos, sin)
                if looped is not None:
                    return looped
            settings = []
            for x, length, where, norm, out, name in operands:  # every operand checked before any is written
                if norm is None:
                    if out is not None:
                        refuse_grad_into(f"{name}_out", [(name, x)])
                    settings.append(None)
                    continue
                # (not module_norm: traced by torch.compile, addresses and versions are not to be read)
                weight, eps, offset = norm_settings(norm, f"{name}_norm", x, self.head_dim)
                if out is not None:
                    refuse_grad_into(f"{name}_out", [(name, x), (f"{name}_norm's weight", weight)])
                settings.append((weight, eps, offset))
            results = []
            for i, ((x, length, where, norm, out, name), setting) in enumerate(zip(operands, settings)):
                index = None if indices is None else indices[i]
                if setting is None:
                    results.append(self._at(x, length, where, out, index, False) if index is not None else
                                   self._rotate([(x, length, where)], False, (out,))[0])
                    continue
                if not isinstance(where, int) and not values_on_host(x):
                    assert_values_async(where, length, cos.shape[0])
                results.append(normed_rotation(self.layout, x, *setting, cos, sin, where, length, self.rotary_dim,
                                               self.interleaved, out=out, out_index=index))
            return tuple(results)
        except FlexRopeError as error:
            raise self._context(error, "") from None

    def _half_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first rotary_dim / 2 columns of the tables, contiguous, for the C loop's fused calls: the angles of a
        token fill whole cache lines (read from the full-width rows, the CPU fetched twice their bytes: the
        bfloat16 prefill of Qwen3's q and k took 4% longer). Made on first use and kept while the tables are the
        same tensors at the same versions (half the tables' memory again; tables without a version counter,
        inference tensors, and calls under a dispatch mode, which would see or wrap the copies, read them as they
        are)."""
        if torch._C._len_torch_dispatch_stack() != 0 or not (plain(cos) and plain(sin)):
            return cos, sin
        try:
            versions = cos._version, sin._version
        except RuntimeError:
            return cos, sin
        halves = self.__dict__.setdefault("_halves", {})
        held = halves.get(id(cos))
        if held is not None and held[0]() is cos and held[1]() is sin and held[2] == versions:
            return held[3], held[4]
        if len(halves) >= 2:  # the tables and the short ones (LongRoPE)
            halves.clear()
        half = self.rotary_dim // 2
        cos_half, sin_half = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        halves[id(cos)] = (weakref.ref(cos), weakref.ref(sin), versions, cos_half, sin_half)
        return cos_half, sin_half

    def _looped(self, operands: list[tuple], cos: torch.Tensor, sin: torch.Tensor) -> tuple | None:
        """A call without gradients on the CPU, each operand normed (a decoding step): straight to the C loop,
        norm, rotation and write in one pass per operand, with the checks of the general path (which takes an
        operand the loop does not); None where an operand has no norm."""
        calls = []
        for x, length, where, norm, out, name in operands:  # every check before anything is written
            if norm is None or not x.is_cpu:
                return None
            calls.append((x, length, where, *module_norm(norm, name + "_norm", x, self.head_dim), out))
        layout, prepared = self.layout, []
        permutation = layout.permutation  # (None where the canonical view is not a permutation: "b s (h d)")
        cos_half, sin_half = self._half_tables(cos, sin)
        for x, length, where, weight, eps, offset, out in calls:
            target = out if out is not None else torch.empty_like(x)  # x's strides where x is dense
            x_c, target_c = (x, target) if permutation else (layout.canonical(x), layout.canonical(target))
            prepared.append((target, _native.prepared(x_c, target_c, cos_half, sin_half, where,
                                                      rotary_dim=self.rotary_dim,
                                                      interleaved=self.interleaved, inverse=False, weight=weight,
                                                      offset=offset, eps=eps, permutation=permutation)))
        _native.run([call for _, call in prepared if call is not None])  # q's and k's: one call of the loop
        results = []
        for (target, call), (x, length, where, weight, eps, offset, out) in zip(prepared, calls):
            if call is not None:
                torch.autograd.graph.increment_version(target)
                results.append(target)
            else:  # e.g. channels not contiguous: the general path
                results.append(normed_rotation(layout, x, weight, eps, offset, cos, sin, where, length,
                                               self.rotary_dim, self.interleaved, out=out))
        return tuple(results)

    def _outs(self, pairs: list[tuple]) -> tuple | None:
        """The checked ``q_out`` / ``k_out`` (x itself where it is x: in place), None where neither is given.
        Each pair: (x, out, name, out_index)."""
        if all(out is None and index is None for _, out, _, index in pairs):
            return None
        checked = []
        # q, k and the outs each in a storage of their own (a decoding step's usual case): no element to look for
        # in two of them (a traced graph has no storages: check_out and _apart know)
        own = not torch.compiler.is_compiling() and _own_storages(pairs)
        try:
            for x, out, name, index in pairs:
                if out is None:
                    if index is not None:
                        raise FlexRopeError(f"{name}_out_index= needs {name}_out=, the tensor it indexes")
                    checked.append(None)
                elif check_out(self.layout, x, out, name, name + "_out", indexed=index is not None,
                               own_storages=own):
                    checked.append(x)
                else:
                    checked.append(out)
            if len(pairs) == 2 and not own and not torch.compiler.is_compiling():
                _apart(pairs, checked)
        except FlexRopeError as error:
            raise self._context(error, "") from None
        return tuple(checked)

    def _indices(self, pairs: list[tuple]) -> tuple:
        """Each (x, checked out, name, out_index): the out_index checked, (b, s), or None."""
        try:
            checked = []
            for x, out, name, index in pairs:
                try:
                    checked.append(None if index is None else check_out_index(self.layout, x, out, index))
                except FlexRopeError as error:
                    raise FlexRopeError(str(error).replace("out_index", f"{name}_out_index", 1)) from None
            return tuple(checked)
        except FlexRopeError as error:
            raise self._context(error, "") from None

    def _at(self, x, length, where, out, index, inverse) -> torch.Tensor:
        """The rotation of x written into out at the checked indices ``index`` (or into out, where None)."""
        if index is None:
            return self._rotate([(x, length, where)], inverse, (out,))[0]
        if self._dynamic:  # tables computed per call: through a temporary
            return write_at(self.layout, self._rotate([(x, length, where)], inverse, None)[0], out, index)
        cos, sin = self._buffers["cos"], self._buffers["sin"]
        if self._short_length is not None and _reach(where, length) <= self._short_length:
            cos, sin = self.short_cos, self.short_sin
        return rope_at(self._rotation, cos, sin, x, where, out, index, table_len=cos.shape[0], inverse=inverse,
                       positions_checked=values_on_host(x))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_halves"] = {}  # (weak references do not pickle; the half-width tables are made again on use)
        return state

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
