"""The rotation as one Triton kernel: every layout through its strides, q and k in one launch, no host sync.

The kernel reads the canonical ``(lead, b, h, s, d)`` view of each tensor through its strides, so every
declared layout costs the same and nothing is copied or made contiguous. A program takes a block of tokens
of one (lead, b) row and a block of heads: it looks up the angles of its tokens once and rotates every head
of the block with them. Up to two tensors (q and k, with their own head counts, lengths and positions) share
one launch: programs past the first tensor's heads take the second's.

Positions held in tensors are read on the device. One out of the table's range is never clamped or
wrapped: the kernel writes 0 into a flag, leaves that token's output unwritten, and ``torch._assert_async``
on the flag fails the stream. On CUDA that surfaces as a device-side assert at the next synchronization
(the context is unusable afterwards, as after an out-of-range index in torch's own indexing); on CPU tensors
(Triton's interpreter) it is an immediate FlexRopeError.

The arithmetic is that of the eager kernels, operation for operation and with floating-point contraction
off, so the results are bitwise those of the eager path: ``a cos - b sin`` and ``b cos + a sin`` each
rounded after every multiply and add, in float32 for half precision and float32, in float64 for float64.
"""

from __future__ import annotations

import functools
import os
import itertools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._pairs import memory_order

# Elements of x per program (its rotary channels), warps per program, and heads per program at least: of the
# settings swept on an H200 (benchmarks/results_gpu.md), 4096, 8 and 4 ran closest to x.clone() over fp32 and
# bf16 and three layouts.
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 8
HEADS_PER_PROGRAM = 4
# The positions modes of an operand: an int start, a (s,) or (b, s) tensor, a (b,) tensor of row starts.
START, POSITIONS, ROW_STARTS = 0, 1, 2
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import, as here


@triton.jit
def _stored(v, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """``v`` rounded to ``dtype`` to nearest even. The interpreter's own float32 -> bfloat16 cast truncates:
    there the rounding is done on the bits (NaN excepted), as the GPU's conversion does it."""
    if ROUND_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(dtype), rounded)
    return v.to(dtype)


@triton.jit
def _rotate_operand(
    pid_s, pid_lb, pid_h, x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, ok_ptr,
    B, H, S, start, table_len,
    x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss, t_row, t_col,
    HALF: tl.constexpr, TAIL: tl.constexpr, INTERLEAVED: tl.constexpr, MODE: tl.constexpr,
    INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    gain_ptr, idx_ptr, iok_ptr, eps, i_sb, i_ss, out_len, NORM: tl.constexpr, INDEXED: tl.constexpr,
):
    # NORM: each row RMS-normalised over its channels (sum of squares, then the scale, then times the gain, in
    # COMPUTE) before the rotation. INDEXED: each token written at the sequence index of out that idx_ptr holds,
    # skipped where that is negative; one >= out_len leaves it unwritten and writes 0 into the flag at iok_ptr.
    # offsets in int64: a tensor of 2^31 elements or more (a long context) has int32 strides whose products with
    # an index do not fit in int32 (they wrapped, and the kernel wrote out of x); the channels' offsets too where
    # a channel stride times the head dim reaches 2^31 (WIDE: the channels outermost in a huge tensor)
    lead, b = (pid_lb // B).to(tl.int64), (pid_lb % B).to(tl.int64)
    s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    token = s < S
    if MODE == 1:
        p = tl.load(pos_ptr + b * p_sb + s * p_ss, mask=token, other=0).to(tl.int64)
    elif MODE == 2:
        p = tl.load(pos_ptr + b * p_sb).to(tl.int64) + s
    else:
        p = start + s
    if MODE != 0:
        bad = token & ((p < 0) | (p >= table_len))
        tl.store(ok_ptr + s * 0, tl.zeros_like(s), mask=bad)
        token = token & ~bad
    j = tl.arange(0, BLOCK_P)
    if WIDE:
        j = j.to(tl.int64)
    angles = token[:, None] & (j < HALF)[None, :]
    cos = tl.load(cos_ptr + p[:, None] * t_row + j[None, :] * t_col, mask=angles, other=0.0).to(COMPUTE)
    sin = tl.load(sin_ptr + p[:, None] * t_row + j[None, :] * t_col, mask=angles, other=0.0).to(COMPUTE)
    if INVERSE:
        sin = -sin
    cos, sin = cos[:, None, :], sin[:, None, :]
    h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    rows = token[:, None] & (h < H)[None, :]
    if INDEXED:
        o_s = tl.load(idx_ptr + b * i_sb + s * i_ss, mask=token, other=-1).to(tl.int64)
        past = token & (o_s >= out_len)
        tl.store(iok_ptr + s * 0, tl.zeros_like(s), mask=past)
        written = rows & ((o_s >= 0) & ~past)[:, None]
    else:
        o_s = s
        written = rows
    x_row = x_ptr + lead * x_sl + b * x_sb + s[:, None] * x_ss + h[None, :] * x_sh
    o_row = out_ptr + lead * o_sl + b * o_sb + o_s[:, None] * o_ss + h[None, :] * o_sh
    t = tl.arange(0, BLOCK_T)
    if WIDE:
        t = t.to(tl.int64)
    tail_mask = rows[:, :, None] & (t < TAIL)[None, None, :]
    if NORM:
        if TAIL > 0:
            tail_n = tl.load(x_row[:, :, None] + (2 * HALF + t)[None, None, :] * x_sd, mask=tail_mask,
                             other=0.0).to(COMPUTE)
    if INTERLEAVED:
        # one contiguous load of the 2 * HALF channels, split into the pairs' first and second channels
        c = tl.arange(0, 2 * BLOCK_P)
        if WIDE:
            c = c.to(tl.int64)
        mask = rows[:, :, None] & (c < 2 * HALF)[None, None, :]
        pairs = tl.load(x_row[:, :, None] + c[None, None, :] * x_sd, mask=mask, other=0.0).to(COMPUTE)
        if NORM:
            squares = tl.sum(pairs * pairs, axis=2)
            if TAIL > 0:
                squares += tl.sum(tail_n * tail_n, axis=2)
            scale = (1.0 / tl.sqrt(squares / (2 * HALF + TAIL) + eps))[:, :, None]
            gain = tl.load(gain_ptr + c, mask=c < 2 * HALF, other=0.0).to(COMPUTE)[None, None, :]
            pairs = pairs * scale * gain
            if TAIL > 0:
                tail_n = tail_n * scale * tl.load(gain_ptr + 2 * HALF + t, mask=t < TAIL, other=0.0
                                                  ).to(COMPUTE)[None, None, :]
        a, b2 = tl.split(tl.reshape(pairs, (BLOCK_S, BLOCK_H, BLOCK_P, 2)))
        out = tl.reshape(tl.join(a * cos - b2 * sin, b2 * cos + a * sin), (BLOCK_S, BLOCK_H, 2 * BLOCK_P))
        stored = _stored(out, out_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(o_row[:, :, None] + c[None, None, :] * o_sd, stored,
                 mask=written[:, :, None] & (c < 2 * HALF)[None, None, :])
    else:
        mask = rows[:, :, None] & (j < HALF)[None, None, :]
        first, second = j[None, None, :], (j + HALF)[None, None, :]
        a = tl.load(x_row[:, :, None] + first * x_sd, mask=mask, other=0.0).to(COMPUTE)
        b2 = tl.load(x_row[:, :, None] + second * x_sd, mask=mask, other=0.0).to(COMPUTE)
        if NORM:
            squares = tl.sum(a * a, axis=2) + tl.sum(b2 * b2, axis=2)
            if TAIL > 0:
                squares += tl.sum(tail_n * tail_n, axis=2)
            scale = (1.0 / tl.sqrt(squares / (2 * HALF + TAIL) + eps))[:, :, None]
            a = a * scale * tl.load(gain_ptr + j, mask=j < HALF, other=0.0).to(COMPUTE)[None, None, :]
            b2 = b2 * scale * tl.load(gain_ptr + HALF + j, mask=j < HALF, other=0.0).to(COMPUTE)[None, None, :]
            if TAIL > 0:
                tail_n = tail_n * scale * tl.load(gain_ptr + 2 * HALF + t, mask=t < TAIL, other=0.0
                                                  ).to(COMPUTE)[None, None, :]
        mask = written[:, :, None] & (j < HALF)[None, None, :]
        tl.store(o_row[:, :, None] + first * o_sd, _stored(a * cos - b2 * sin, out_ptr.dtype.element_ty, ROUND_BF16),
                 mask=mask)
        tl.store(o_row[:, :, None] + second * o_sd, _stored(b2 * cos + a * sin, out_ptr.dtype.element_ty, ROUND_BF16),
                 mask=mask)
    if COPY_TAIL:
        tail_written = written[:, :, None] & (t < TAIL)[None, None, :]
        if NORM:
            tl.store(o_row[:, :, None] + (2 * HALF + t)[None, None, :] * o_sd,
                     _stored(tail_n, out_ptr.dtype.element_ty, ROUND_BF16), mask=tail_written)
        else:
            tail = tl.load(x_row[:, :, None] + (2 * HALF + t)[None, None, :] * x_sd, mask=tail_mask)
            tl.store(o_row[:, :, None] + (2 * HALF + t)[None, None, :] * o_sd, tail, mask=tail_written)


@triton.jit
def _rope_one(
    cos_ptr, sin_ptr, ok_ptr, B, table_len, t_row, t_col, s_blocks,
    x_ptr, out_ptr, pos_ptr, H, S, start,
    x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss,
    HALF: tl.constexpr, TAIL: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    COPY_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr, MODE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One tensor: fewer arguments than the pair kernel, which makes each launch cheaper on the host."""
    pid = tl.program_id(0)
    _rotate_operand(
        pid % s_blocks, pid // s_blocks, tl.program_id(1), x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, ok_ptr,
        B, H, S, start, table_len, x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss,
        t_row, t_col, HALF, TAIL, INTERLEAVED, MODE, INVERSE, COPY_TAIL, COMPUTE, ROUND_BF16, WIDE, BLOCK_S, BLOCK_H,
        BLOCK_P, BLOCK_T, cos_ptr, pos_ptr, ok_ptr, 0.0, 0, 0, 0, False, False,
    )


@triton.jit
def _rope_fused(
    cos_ptr, sin_ptr, ok_ptr, B, table_len, t_row, t_col, s_blocks,
    x_ptr, out_ptr, pos_ptr, H, S, start,
    x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss,
    gain_ptr, idx_ptr, iok_ptr, eps, i_sb, i_ss, out_len,
    HALF: tl.constexpr, TAIL: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    COPY_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr, MODE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    NORM: tl.constexpr, INDEXED: tl.constexpr,
):
    """One tensor, its QK-norm fused (NORM) and / or written at out's sequence indices (INDEXED)."""
    pid = tl.program_id(0)
    _rotate_operand(
        pid % s_blocks, pid // s_blocks, tl.program_id(1), x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, ok_ptr,
        B, H, S, start, table_len, x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss,
        t_row, t_col, HALF, TAIL, INTERLEAVED, MODE, INVERSE, COPY_TAIL, COMPUTE, ROUND_BF16, WIDE, BLOCK_S, BLOCK_H,
        BLOCK_P, BLOCK_T, gain_ptr, idx_ptr, iok_ptr, eps, i_sb, i_ss, out_len, NORM, INDEXED,
    )


@triton.jit
def _rope_two(
    cos_ptr, sin_ptr, ok_ptr, B, table_len, t_row, t_col, s_blocks, q_blocks,
    x_ptr, out_ptr, pos_ptr, H, S, start,
    x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss,
    y_ptr, yout_ptr, ypos_ptr, YH, YS, ystart,
    y_sl, y_sb, y_sh, y_ss, y_sd, yo_sl, yo_sb, yo_sh, yo_ss, yo_sd, yp_sb, yp_ss,
    HALF: tl.constexpr, TAIL: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    COPY_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr, MODE: tl.constexpr,
    YMODE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Two tensors (q and k): the programs past the first one's heads take the second one's."""
    pid_s, pid_lb, pid_h = tl.program_id(0) % s_blocks, tl.program_id(0) // s_blocks, tl.program_id(1)
    if pid_h < q_blocks:
        _rotate_operand(
            pid_s, pid_lb, pid_h, x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, ok_ptr, B, H, S, start, table_len,
            x_sl, x_sb, x_sh, x_ss, x_sd, o_sl, o_sb, o_sh, o_ss, o_sd, p_sb, p_ss, t_row, t_col,
            HALF, TAIL, INTERLEAVED, MODE, INVERSE, COPY_TAIL, COMPUTE, ROUND_BF16, WIDE, BLOCK_S, BLOCK_H, BLOCK_P,
            BLOCK_T, cos_ptr, pos_ptr, ok_ptr, 0.0, 0, 0, 0, False, False,
        )
    else:
        _rotate_operand(
            pid_s, pid_lb, pid_h - q_blocks, y_ptr, yout_ptr, cos_ptr, sin_ptr, ypos_ptr, ok_ptr, B, YH, YS,
            ystart, table_len,
            y_sl, y_sb, y_sh, y_ss, y_sd, yo_sl, yo_sb, yo_sh, yo_ss, yo_sd, yp_sb, yp_ss, t_row, t_col,
            HALF, TAIL, INTERLEAVED, YMODE, INVERSE, COPY_TAIL, COMPUTE, ROUND_BF16, WIDE, BLOCK_S, BLOCK_H, BLOCK_P,
            BLOCK_T, cos_ptr, ypos_ptr, ok_ptr, 0.0, 0, 0, 0, False, False,
        )


class Operand(NamedTuple):
    """One tensor to rotate: its canonical (*lead, b, h, s, d) view, the canonical view to write (x's own
    in place), and its positions: an int ``start``, or ``positions`` holding positions or row starts as
    ``mode`` says."""

    x: torch.Tensor
    out: torch.Tensor
    start: int
    positions: torch.Tensor | None
    mode: int
    gain: torch.Tensor | None = None  # the QK-norm's offset + weight (d,), in the compute dtype
    eps: float = 0.0
    index: torch.Tensor | None = None  # (b, s): each token's sequence index in out


def _merged(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (lead, b, h, s, d) lengths and strides of ``t`` (*lead, b, h, s, d), its lead axes merged into one;
    None where they share no one stride."""
    shape, stride = t.shape, t.stride()
    count = len(shape) - 4
    # unit axes move no pointer, and their strides say nothing (a view may give them any): left out
    lead = [(n, step) for n, step in zip(shape[:count], stride[:count]) if n != 1]
    if not lead:
        return (1, *shape[count:]), (0, *stride[count:])
    if all(lead[i][1] == lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1)):
        return (math.prod(n for n, _ in lead), *shape[count:]), (lead[-1][1], *stride[count:])
    return None


@functools.lru_cache(maxsize=None)
def flag(device: torch.device) -> torch.Tensor:
    """A one-element int32 flag per device: 1 while every position read on the device was in range."""
    return torch.ones(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def index_flag(device: torch.device) -> torch.Tensor:
    """A one-element int32 flag per device: 1 while every out_index read on the device was in range."""
    return torch.ones(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=1024)
def _blocks(half: int, heads: int, seq_len: int, tokens_inner: bool) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_P): a program's tokens and heads, along the one that is closer in memory
    first (tokens in (b h s d), heads in (b s h d)), so that its loads are long contiguous runs; at least
    HEADS_PER_PROGRAM heads either way, so that the angles it reads are a small part of what it moves."""
    block_p = triton.next_power_of_2(half)
    room = max(1, ELEMENTS_PER_PROGRAM // (2 * block_p))
    block_h = min(triton.next_power_of_2(heads), room if not tokens_inner else min(room, HEADS_PER_PROGRAM))
    block_s = min(triton.next_power_of_2(seq_len), max(1, room // block_h))
    block_h = min(triton.next_power_of_2(heads), max(block_h, room // block_s))
    return block_s, block_h, block_p


def empty_in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """A new dense tensor of x's shape whose dims lie in memory in x's order (channels innermost)."""
    order = memory_order(x)
    out = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device)
    return out.permute([order.index(d) for d in range(x.ndim)])


def _plan(operands: list[Operand], cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
          inverse: bool, inplace: bool) -> tuple | None:
    """What a launch needs besides its tensors and int starts, for one geometry: the kernel, the grid, the int
    arguments around each operand's start, the compile-time constants, whether the tables need copying to
    share strides. None where lead axes do not merge."""
    views = [(_merged(op.x), _merged(op.out)) for op in operands]
    if any(x is None or out is None for x, out in views):
        return None
    copy_tables = cos.stride() != sin.stride()
    table_stride = (cos.shape[1], 1) if copy_tables else cos.stride()  # (L, width): contiguous strides
    (shape, stride), _ = views[0]
    half, tail = rotary_dim // 2, shape[4] - rotary_dim
    seq_len = max(x[0][3] for x, _ in views)
    heads = max(x[0][2] for x, _ in views)
    block_s, block_h, block_p = _blocks(half, heads, seq_len, stride[3] < stride[2])
    blocks, s_blocks = [-(-x[0][2] // block_h) for x, _ in views], -(-seq_len // block_s)
    # token blocks and (lead, b) rows share the first axis of the grid (2^31 - 1 programs; the second and third
    # allow 65535 on CUDA, fewer than the rows of a batch of windows), token blocks fastest; head blocks second
    grid = (s_blocks * shape[0] * shape[1], sum(blocks))
    head = [shape[1], cos.shape[0], *table_stride, s_blocks] + ([blocks[0]] if len(operands) == 2 else [])
    fused = operands[0].gain is not None or operands[0].index is not None
    around_start = []
    for op, (x, out) in zip(operands, views):
        pos, p_sb, p_ss = op.positions, 0, 0
        if pos is not None:
            if op.mode == ROW_STARTS:
                p_sb = pos.stride(0)
            elif pos.ndim == 1:
                p_ss = pos.stride(0)
            else:
                p_sb, p_ss = (pos.stride(0) if pos.shape[0] > 1 else 0), pos.stride(1)
        after = (*x[1], *out[1], p_sb, p_ss)
        if fused:  # the index's strides over (b, s) and out's sequence length
            after += ((0, 0) if op.index is None else (op.index.stride(0) if op.index.shape[0] > 1 else 0,
                                                       op.index.stride(1))) + (out[0][3],)
        around_start.append(((x[0][2], x[0][3]), after))
    constants = dict(
        HALF=half, TAIL=tail, INTERLEAVED=interleaved, INVERSE=inverse, COPY_TAIL=tail > 0 and not inplace,
        COMPUTE=tl.float64 if operands[0].x.dtype == torch.float64 else tl.float32, ROUND_BF16=INTERPRETED,
        WIDE=any(sizes[4] * strides[4] >= 2**31 for pair in views for sizes, strides in pair),
        MODE=operands[0].mode, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_P=block_p,
        BLOCK_T=triton.next_power_of_2(max(tail, 1)), num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    if len(operands) == 2:
        constants["YMODE"] = operands[1].mode
    if fused:
        constants.update(NORM=operands[0].gain is not None, INDEXED=operands[0].index is not None)
        return _rope_fused, grid, head, around_start, constants, copy_tables
    return _rope_one if len(operands) == 1 else _rope_two, grid, head, around_start, constants, copy_tables


_plans: dict[tuple, tuple | None] = {}


def launch(
    operands: list[Operand], cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, interleaved: bool,
    inverse: bool, inplace: bool, ok: torch.Tensor,
) -> None:
    """Rotate one or two operands (the same lead and batch lengths, dtype and device) in one launch. A geometry
    seen before costs a dict lookup: its plan holds everything but the tensors and the int starts."""
    key = (*((op.x.shape, op.x.stride(), op.out.stride(), op.out.shape, op.mode,
              None if op.positions is None else (op.positions.shape, op.positions.stride()), op.gain is not None,
              None if op.index is None else (op.index.shape, op.index.stride())) for op in operands),
           cos.shape, cos.stride(), sin.stride(), operands[0].x.dtype, rotary_dim, interleaved, inverse, inplace)
    plan = _plans.get(key, False)
    if plan is False:
        if len(_plans) >= 1024:
            _plans.clear()
        plan = _plans[key] = _plan(operands, cos, sin, rotary_dim, interleaved, inverse, inplace)
    if plan is None:  # rare: lead axes that do not merge, one launch per lead index
        for op in operands:
            for index in itertools.product(*(range(n) for n in op.x.shape[:-4])):
                launch([op._replace(x=op.x[index], out=op.out[index])], cos, sin, rotary_dim=rotary_dim,
                       interleaved=interleaved, inverse=inverse, inplace=inplace, ok=ok)
        return
    kernel, grid, head, around_start, constants, copy_tables = plan
    if copy_tables:
        cos, sin = cos.contiguous(), sin.contiguous()
    args = [cos, sin, ok, *head]
    for op, (before, after) in zip(operands, around_start):
        if kernel is _rope_fused:  # the index's strides and out's length follow the norm's and index's tensors
            after, (i_sb, i_ss, out_len) = after[:-3], after[-3:]
        args += [op.x, op.out, op.x if op.positions is None else op.positions, *before, op.start, *after]
        if kernel is _rope_fused:
            args += [op.x if op.gain is None else op.gain, op.x if op.index is None else op.index,
                     index_flag(op.x.device), op.eps, i_sb, i_ss, out_len]
    kernel[grid](*args, **constants)


@torch.library.custom_op("flexrope::rotate", mutates_args=())
def rotate_op(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor], start: int,
    mode: int, rotary_dim: int, interleaved: bool, inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of canonical view ``x`` as an operator that a caller's torch.compile graph calls without
    a break: (the rotated tensor, dense in x's memory order; the positions flag)."""
    out, ok = _rotate_op_fake(x, cos, sin, positions, start, mode, rotary_dim, interleaved, inverse)
    ok.fill_(1)
    launch([Operand(x, out, start, positions, mode)], cos, sin, rotary_dim=rotary_dim, interleaved=interleaved,
           inverse=inverse, inplace=False, ok=ok)
    return out, ok


@rotate_op.register_fake
def _rotate_op_fake(x, cos, sin, positions, start, mode, rotary_dim, interleaved, inverse):
    return empty_in_memory_order(x), torch.empty(1, dtype=torch.int32, device=x.device)
