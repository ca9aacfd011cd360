"""QK-norm, rotation and the KV-cache write of q and k, at Qwen3-8B's attention shapes (32 query heads, 8 key
heads, head dim 128), a decoding step and a 2,048-token prefill, float32 and bfloat16:

- (a) transformers' own modules: Qwen3RMSNorm on q and k, then apply_rotary_pos_emb, then a copy into the cache;
- (b) flexrope unfused: the same norms, flexrope's rotation, then the copy;
- (c) flexrope fused: ``rope(q, k, q_norm=..., k_norm=..., q_out=..., k_out=cache[:, n:n + s])``, one pass;
- (d) flexrope's rotation of q and k alone (out of place), what a decoding step cost before the fusion.

Ratios to the floor measured in the same run: one ``out.copy_(x)`` of q and of k (q into its buffer, k into
its cache slice); (c) / (d), the fused step against the rotation alone, from (c) and (d) timed in alternating
rounds of their own.

    python benchmarks/bench_fused.py [--quick]
"""

import argparse
from typing import Callable

import torch

import harness
from flexrope import RotaryEmbedding

HEADS, KV_HEADS, HEAD_DIM, CACHE = 32, 8, 128, 4096


def _operands(seq_len: int, dtype: torch.dtype, device: str, layout: str) -> tuple:
    """q, k, their Qwen3RMSNorms, q's buffer and k's slot of the cache, in ``layout`` ("b s h d" or "b h s d"),
    and the first position."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    start = 0 if seq_len > 1 else 2048
    q = torch.randn(1, seq_len, HEADS, HEAD_DIM, device=device).to(dtype)  # "b s h d": as the projections make them
    k = torch.randn(1, seq_len, KV_HEADS, HEAD_DIM, device=device).to(dtype)
    q_norm, k_norm = Qwen3RMSNorm(HEAD_DIM, eps=1e-6), Qwen3RMSNorm(HEAD_DIM, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5), k_norm.weight.uniform_(0.5, 1.5)
    q_norm, k_norm = q_norm.to(device, dtype), k_norm.to(device, dtype)
    cache_k = torch.zeros(1, CACHE, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    if layout == "b h s d":
        q, k, cache_k = (t.transpose(1, 2).contiguous() for t in (q, k, cache_k))
        k_slot = cache_k[:, :, start:start + seq_len]
    else:
        k_slot = cache_k[:, start:start + seq_len]
    return q, k, q_norm, k_norm, torch.empty_like(q), k_slot, start


def qwen3_step(seq_len: int, dtype: torch.dtype, device: str = "cpu") -> tuple[str, Callable, dict[str, Callable]]:
    """The case's name, its floor and the four callables (a)-(d), on ``device`` (bench_gpu times them on CUDA)."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    q, k, q_norm, k_norm, q_buffer, k_slot, start = _operands(seq_len, dtype, device, "b s h d")
    rope = RotaryEmbedding(HEAD_DIM, layout="b s h d", context_length=CACHE, theta_base=1_000_000).to(device)
    # transformers' per-token tables (1, s, d) in the model's dtype, as its rotary module returns them
    cos, sin = (table[start:start + seq_len, :HEAD_DIM][None].to(dtype) for table in (rope.cos, rope.sin))

    def floor():
        q_buffer.copy_(q), k_slot.copy_(k)

    def transformers_modules():
        q_rot, k_rot = apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
        q_buffer.copy_(q_rot.transpose(1, 2)), k_slot.copy_(k_rot.transpose(1, 2))

    def unfused():
        q_rot, k_rot = rope(q_norm(q), k_norm(k), offset=start)
        q_buffer.copy_(q_rot), k_slot.copy_(k_rot)

    def fused():
        rope(q, k, offset=start, q_norm=q_norm, k_norm=k_norm, q_out=q_buffer, k_out=k_slot)

    def rotation_alone():
        rope(q, k, offset=start)

    name = f"{'decode' if seq_len == 1 else f'prefill {seq_len}'} {str(dtype).removeprefix('torch.')}"
    return name, floor, {"(a) transformers modules": transformers_modules, "(b) flexrope unfused": unfused,
                         "(c) flexrope fused, out=": fused, "(d) flexrope rotation only": rotation_alone}


def cases(seq_len: int, dtype: torch.dtype, rounds: int, number: int) -> list[harness.Result]:
    name, floor, steps = qwen3_step(seq_len, dtype)
    results = []
    with torch.inference_mode():
        for who, fn in steps.items():
            seconds, floor_seconds = harness.compare(fn, floor, rounds=rounds, number=number)
            results.append(harness.Result(name, who, seconds, floor_seconds, "out.copy_(x)"))
        # the fused step against the rotation alone, in alternating rounds of their own (the goal's ratio)
        seconds, rotation_seconds = harness.compare(steps["(c) flexrope fused, out="],
                                                    steps["(d) flexrope rotation only"], rounds=rounds, number=number)
        results.append(harness.Result(name, "(c) against (d)", seconds, rotation_seconds, "(d)"))
    return results


def other_layouts(dtype: torch.dtype, rounds: int, number: int) -> list[harness.Result]:
    """(c) at prefill where the common unit does not apply as it is: "b h s d" (a head's tokens side by side) and
    interleaved pairs, each against its own floor."""
    results = []
    for layout, interleaved in (("b h s d", False), ("b s h d", True)):
        q, k, q_norm, k_norm, q_buffer, k_slot, start = _operands(2048, dtype, "cpu", layout)
        rope = RotaryEmbedding(HEAD_DIM, layout=layout, context_length=CACHE, theta_base=1_000_000,
                               interleaved=interleaved)

        def floor():
            q_buffer.copy_(q), k_slot.copy_(k)

        def fused():
            rope(q, k, offset=start, q_norm=q_norm, k_norm=k_norm, q_out=q_buffer, k_out=k_slot)

        with torch.inference_mode():
            seconds, floor_seconds = harness.compare(fused, floor, rounds=rounds, number=number)
        results.append(harness.Result(f"prefill 2048 {str(dtype).removeprefix('torch.')}",
                                      f"(c) \"{layout}\"{', interleaved' if interleaved else ''}", seconds,
                                      floor_seconds, "out.copy_(x)"))
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else 9
    print(harness.header())
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        results += cases(1, dtype, rounds, 200)
        results += cases(2048, dtype, rounds, 3)
    print(harness.table([r for r in results if r.floor_name != "(d)"]))
    print(harness.table([r for dtype in (torch.float32, torch.bfloat16) for r in other_layouts(dtype, rounds, 3)]))
    for case in dict.fromkeys(r.case for r in results):
        by = {r.who[:3]: r for r in results if r.case == case and r.floor_name != "(d)"}
        step = next(r for r in results if r.case == case and r.floor_name == "(d)")
        print(f"{case}: (c)/(a) {by['(c)'].seconds / by['(a)'].seconds:.3f}, (c)/(d) {step.ratio:.3f} (fused step / "
              f"rotation alone, timed in alternating rounds: {step.seconds * 1e6:.1f} / {step.floor * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
