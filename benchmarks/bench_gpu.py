"""GPU checks and benchmark of the Triton backend: correctness, no host sync, CUDA graphs, torch.compile, speed.

    python benchmarks/bench_gpu.py [--quick] [--out results_gpu.md]

Checks first (each prints PASS or FAIL): Triton against the eager backend bitwise in every dtype, layout and
pairing; against a float64 reference; the fused QK-norm written into a cache slice and at an out_index; no host
sync (``torch.cuda.set_sync_debug_mode("error")``); CUDA graph capture with tensor positions replayed with new
values; a caller's ``torch.compile(fullgraph=True, dynamic=True)`` over many lengths; a bad position failing the
stream (in a child process: a device-side assert ends its CUDA context).

Then times. GPU time per call is measured with CUDA events over many calls back to back (median of rounds),
next to the floors measured in the same run: ``x.clone()`` for out of place, ``out.copy_(x)`` for in place.
CPU time per call is the host time to issue calls that the GPU has not yet run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import flexrope
from flexrope import RotaryEmbedding, compute_rope

SHAPES = {"b s h d": "bshd", "b h s d": "bhsd", "s b h d": "sbhd"}
CHECKS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    CHECKS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def laid_out(b, s, h, d, layout, dtype):
    dims = {"b": b, "s": s, "h": h, "d": d}
    return torch.randn(*(dims[a] for a in layout.split()), device="cuda").to(dtype)


def with_backend(name, fn):
    saved = os.environ.get("FLEXROPE_BACKEND")
    os.environ["FLEXROPE_BACKEND"] = name
    try:
        return fn()
    finally:
        os.environ["FLEXROPE_BACKEND"] = saved or "auto"


def correctness() -> None:
    cos, sin = flexrope.precompute_rope_params(128, context_length=8192, rotary_dim=96)
    cos, sin = cos.cuda(), sin.cuda()
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in SHAPES:
            for interleaved in (False, True):
                x = laid_out(2, 300, 6, 128, layout, dtype)
                positions = torch.randint(0, 8192, (2, 300), device="cuda")
                for kwargs in (dict(offset=5), dict(positions=positions), dict(offset=torch.tensor([3, 700]).cuda())):
                    kw = dict(interleaved=interleaved, rotary_dim=96, **kwargs)
                    fast = compute_rope(x, cos, sin, layout, **kw)
                    slow = with_backend("eager", lambda: compute_rope(x, cos, sin, layout, **kw))
                    inplace = x.clone()
                    compute_rope(inplace, cos, sin, layout, inplace=True, **kw)
                    same = torch.equal(fast, slow) and torch.equal(inplace, slow) and fast.stride() == x.stride()
                    if not same:
                        check(f"triton == eager bitwise {dtype} {layout} interleaved={interleaved} {list(kwargs)}",
                              False, f"max diff {(fast.double() - slow.double()).abs().max().item():.3g}")
                        return
                ref = with_backend("eager", lambda: compute_rope(x.double().cpu(), cos.double().cpu(),
                                                                 sin.double().cpu(), layout, interleaved=interleaved,
                                                                 rotary_dim=96, offset=5))
                got = compute_rope(x, cos, sin, layout, interleaved=interleaved, rotary_dim=96, offset=5)
                eps = torch.finfo(dtype).eps
                worst = max(worst, ((got.double().cpu() - ref).abs().max() / (ref.abs().max() * eps)).item())
    check("triton == eager bitwise: 4 dtypes x 3 layouts x 2 pairings x (int, positions, row starts), in place too",
          True)
    check("within a few eps of float64", worst < 4, f"worst {worst:.2f} eps (relative to max |x|)")
    rope = RotaryEmbedding(128, layout="b s h d", context_length=8192).cuda()
    q = torch.randn(2, 50, 32, 128, device="cuda", requires_grad=True)
    k = torch.randn(2, 70, 8, 128, device="cuda", requires_grad=True)

    def module():
        q2, k2 = rope(q, k, offset=20, k_offset=0)
        return (q2, k2, *torch.autograd.grad((q2 * 2).sum() + (k2 * 3).sum(), (q, k)))

    fast, slow = module(), with_backend("eager", module)
    check("module q+k (32/8 heads) forward and backward == eager bitwise",
          all(torch.equal(a, b) for a, b in zip(fast, slow)))


def no_sync() -> None:
    rope = RotaryEmbedding(128, layout="b s h d", context_length=4096).cuda()
    cos, sin = rope.cos, rope.sin
    x = torch.randn(4, 64, 32, 128, device="cuda")
    positions = torch.randint(0, 4096, (4, 64), device="cuda")
    offsets = torch.tensor([0, 9, 100, 1000], device="cuda")
    compute_rope(x, cos, sin, "b s h d", positions=positions)  # warm: compile the kernels
    rope(x, x[:, :, :8], positions=positions)
    compute_rope(x, cos, sin, "b s h d", offset=offsets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compute_rope(x, cos, sin, "b s h d", positions=positions)
        compute_rope(x, cos, sin, "b s h d", offset=offsets)
        rope(x, x[:, :, :8], positions=positions)
        check("no host sync with tensor positions and offsets (sync debug mode 'error')", True)
    except RuntimeError as error:
        check("no host sync with tensor positions and offsets", False, str(error)[:200])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_graph() -> None:
    rope = RotaryEmbedding(128, layout="b s h d", context_length=4096).cuda()
    q, k = torch.randn(2, 16, 32, 128, device="cuda"), torch.randn(2, 16, 8, 128, device="cuda")
    positions = torch.zeros(2, 16, dtype=torch.long, device="cuda")
    offsets = torch.zeros(2, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            rope(q, k, positions=positions)
            compute_rope(q, rope.cos, rope.sin, "b s h d", offset=offsets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_q, out_k = rope(q, k, positions=positions)
        out_o = compute_rope(q, rope.cos, rope.sin, "b s h d", offset=offsets)
    ok = True
    for trial in range(3):
        positions.copy_(torch.randint(0, 4096, (2, 16)))
        offsets.copy_(torch.randint(0, 4000, (2,)))
        graph.replay()
        want_q, want_k = rope(q, k, positions=positions)
        want_o = compute_rope(q, rope.cos, rope.sin, "b s h d", offset=offsets)
        ok = ok and torch.equal(out_q, want_q) and torch.equal(out_k, want_k) and torch.equal(out_o, want_o)
    check("CUDA graph capture, replayed with new positions and offsets", ok)


def compiled() -> None:
    import torch._dynamo.testing

    torch._dynamo.reset()
    rope = RotaryEmbedding(128, layout="b s h d", context_length=8192).cuda()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def step(q, k, positions):
        q, k = rope(q, k, positions=positions)
        return q * 2, k + 1

    compiled_step = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    ok = True
    for s in (10, 77, 300, 1000, 5000):
        q, k = torch.randn(2, s, 8, 128, device="cuda"), torch.randn(2, s, 2, 128, device="cuda")
        positions = torch.randint(0, 8192, (2, s), device="cuda")
        got, want = compiled_step(q, k, positions), step(q, k, positions)
        ok = ok and all(torch.equal(a, b) for a, b in zip(got, want))
    check("torch.compile(fullgraph=True, dynamic=True) over lengths 10..5000 == eager, one compile",
          ok and counter.frame_count == 1, f"frames compiled: {counter.frame_count}")


def bad_position_in_child() -> None:
    code = ("import torch, flexrope; c, s = flexrope.precompute_rope_params(64, context_length=16); "
            "x = torch.randn(1, 2, 4, 64, device='cuda'); "
            "y = flexrope.compute_rope(x, c.cuda(), s.cuda(), positions=torch.tensor([0, 1, 16, 2], device='cuda')); "
            "torch.cuda.synchronize(); print('NO ERROR')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    text = run.stdout + run.stderr
    check("a position past the table fails the stream (device-side assert)",
          "NO ERROR" not in text and "assert" in text.lower(), text.strip().splitlines()[-1][:160] if text else "")


def fused(device: str = "cuda") -> None:
    """The fused paths of the Triton kernel against the eager backend: QK-norm and rotation written into a cache
    slice (out=) and at the sequence indices of an out_index (a ring buffer, negative indices skipped), float32
    and bfloat16, both layouts, both pairings; then the module's fused decoding step without a host sync. The
    checks run on the CPU too, in Triton's interpreter (``TRITON_INTERPRET=1``), as the tests do."""
    d, s, slots = 128, 33, 64
    cos, sin = flexrope.precompute_rope_params(d, context_length=256)
    cos, sin = cos.to(device), sin.to(device)
    worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for dtype in worst:
        for layout in ("b s h d", "b h s d"):
            for interleaved in (False, True):
                sizes = {"b": 2, "s": s, "h": 8, "d": d}
                x = torch.randn(*(sizes[a] for a in layout.split()), device=device).to(dtype)
                weight = (torch.rand(d, device=device) + 0.5).to(dtype)
                seq_dim = layout.split().index("s")
                kwargs = dict(offset=5, interleaved=interleaved, norm_weight=weight, norm_eps=1e-6)
                cache = torch.zeros(*(slots if a == "s" else sizes[a] for a in layout.split()), device=device,
                                    dtype=dtype)
                into = cache.narrow(seq_dim, 10, s)
                with_backend("triton", lambda: compute_rope(x, cos, sin, layout, out=into, **kwargs))
                expected = with_backend("eager", lambda: compute_rope(x, cos, sin, layout, **kwargs))
                index = (torch.arange(s, device=device) * 7 + 3) % slots
                index[::5] = -1  # padding: skipped
                ring = torch.zeros_like(cache)
                with_backend("triton", lambda: compute_rope(x, cos, sin, layout, out=ring, out_index=index,
                                                            **kwargs))
                kept = index >= 0
                indexed = torch.zeros_like(cache).index_copy_(seq_dim, index[kept],
                                                              expected.index_select(seq_dim, kept.nonzero()[:, 0]))
                # differences in units of the dtype's eps times the value (at least 1)
                eps = torch.finfo(dtype).eps
                ulps = max(((into - expected).abs() / expected.abs().clamp(min=1)).max().item(),
                           ((ring - indexed).abs() / indexed.abs().clamp(min=1)).max().item()) / eps
                untouched = (cache.narrow(seq_dim, 0, 10).abs().sum() + cache.narrow(seq_dim, 10 + s, slots - 10 - s)
                             .abs().sum()).item() == 0
                worst[dtype] = max(worst[dtype], ulps if untouched else float("inf"))
    check("fused QK-norm into a cache slice and at an out_index equals eager's (both layouts and pairings)",
          worst[torch.float32] <= 8 and worst[torch.bfloat16] <= 1,
          f"worst {worst[torch.float32]:.2f} (float32) and {worst[torch.bfloat16]:.2f} (bfloat16) eps of the "
          f"dtype times the value (the sums of squares in another order; bfloat16: one rounding apart at most)")
    if device != "cuda":
        return
    rope = RotaryEmbedding(d, layout="b s h d", context_length=4096).cuda()
    q, k = torch.randn(1, 1, 32, d, device="cuda"), torch.randn(1, 1, 8, d, device="cuda")
    q_norm, k_norm = torch.nn.RMSNorm(d, eps=1e-6).cuda(), torch.nn.RMSNorm(d, eps=1e-6).cuda()
    q_buffer, cache_k = torch.empty_like(q), torch.zeros(1, 4096, 8, d, device="cuda")
    offset, slot = torch.tensor([4000], device="cuda"), torch.tensor([4000], device="cuda")

    def step():
        with torch.no_grad():
            rope(q, k, offset=offset, q_norm=q_norm, k_norm=k_norm, q_out=q_buffer, k_out=cache_k,
                 k_out_index=slot)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        check("no host sync in the module's fused step (norms, q_out, k_out at a tensor out_index)", True)
    except RuntimeError as error:
        check("no host sync in the module's fused step", False, str(error)[:200])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gpu_ms(fn, *, calls: int, rounds: int = 15) -> float:
    """Median over rounds of the GPU time of ``calls`` back-to-back calls, per call (ms)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    return statistics.median(times)


def cpu_us(fn, *, calls: int = 50, rounds: int = 9) -> float:
    """Median host time to issue one call (us), the GPU idle at the start of each round."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def naive(x, cos, sin):
    """The naive formula on (b s h d): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def speed(shapes, rows: list[str]) -> None:
    cos, sin = flexrope.precompute_rope_params(128, context_length=8192)
    cos, sin = cos.cuda(), sin.cuda()
    compiled_naive = torch.compile(naive)
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        apply_rotary_pos_emb = None
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:  # noqa: BLE001 - not installed, or fails to import
        liger_rotary_pos_emb = None
    rows.append("| shape (b, s, h, d) | dtype | layout | case | GPU ms | floor ms | ratio | CPU us/call |")
    rows.append("|---|---|---|---|---|---|---|---|")
    for b, s, h, d in shapes:
        calls = max(5, int(2e9 // (b * s * h * d * 4)))
        for dtype in (torch.float32, torch.bfloat16):
            for layout in SHAPES:
                x = laid_out(b, s, h, d, layout, dtype)
                out = torch.empty_like(x)
                y = x.clone()
                clone, copy = gpu_ms(x.clone, calls=calls), gpu_ms(lambda: out.copy_(x), calls=calls)
                cases = {
                    "flexrope out of place": (lambda: compute_rope(x, cos, sin, layout), clone),
                    "flexrope in place": (lambda: compute_rope(y, cos, sin, layout, inplace=True), copy),
                }
                if layout == "b s h d":
                    c4, s4 = cos[:s, None, :].to(dtype), sin[:s, None, :].to(dtype)
                    cases["torch.compile(naive formula)"] = (lambda: compiled_naive(x, c4, s4), clone)
                if layout == "b h s d" and apply_rotary_pos_emb is not None:
                    c3, s3 = cos[None, :s].to(dtype), sin[None, :s].to(dtype)
                    cases["transformers apply_rotary_pos_emb (q only)"] = (
                        lambda: apply_rotary_pos_emb(x, x[:, :1], c3, s3)[0], clone)
                for name, (fn, floor) in cases.items():
                    ms = gpu_ms(fn, calls=calls)
                    host = cpu_us(fn, calls=min(calls, 30))
                    rows.append(f"| {(b, s, h, d)} | {str(dtype)[6:]} | {layout} | {name} | {ms:.4f} | {floor:.4f} | "
                                f"{ms / floor:.2f} | {host:.1f} |")
                    print(rows[-1], flush=True)
            # q and k in one launch, against Liger's (both in place in its own layout, b h s d)
            rope = RotaryEmbedding(d, layout="b h s d", context_length=8192).cuda()
            q = torch.randn(b, h, s, d, device="cuda").to(dtype)
            k = torch.randn(b, h // 4, s, d, device="cuda").to(dtype)
            floor = gpu_ms(lambda: (q.clone(), k.clone()), calls=calls)
            cases = {"flexrope module q+k (GQA 4:1)": lambda: rope(q, k)}
            if liger_rotary_pos_emb is not None:
                c3, s3 = cos[None, :s].to(dtype), sin[None, :s].to(dtype)
                cases["Liger q+k (GQA 4:1)"] = lambda: liger_rotary_pos_emb(q, k, c3, s3)
            for name, fn in cases.items():
                ms = gpu_ms(fn, calls=calls)
                rows.append(f"| {(b, s, h, d)} | {str(dtype)[6:]} | b h s d | {name} | {ms:.4f} | {floor:.4f} | "
                            f"{ms / floor:.2f} | {cpu_us(fn, calls=min(calls, 30)):.1f} |")
                print(rows[-1], flush=True)


def use_blocks(elements: int, warps: int, heads: int) -> None:
    """Launch with these block settings from now on: the launch plans cached per geometry are made again."""
    from flexrope import _triton

    _triton.ELEMENTS_PER_PROGRAM, _triton.NUM_WARPS, _triton.HEADS_PER_PROGRAM = elements, warps, heads
    _triton._blocks.cache_clear()
    _triton._plans.clear()


def sweep(rows: list[str]) -> None:
    """Elements, warps and least heads per program, out of place: keep the fastest overall."""
    cos, sin = flexrope.precompute_rope_params(128, context_length=8192)
    cos, sin = cos.cuda(), sin.cuda()
    cases = [((8, 4096, 32, 128), torch.float32, "b s h d"), ((8, 4096, 32, 128), torch.bfloat16, "b s h d"),
             ((8, 4096, 32, 128), torch.bfloat16, "b h s d"), ((8, 4096, 32, 128), torch.bfloat16, "s b h d")]
    tensors = [laid_out(*shape, layout, dtype) for shape, dtype, layout in cases]
    floors = [gpu_ms(x.clone, calls=10) for x in tensors]
    columns = " | ".join(f"{layout} {str(dtype)[6:]}" for _, dtype, layout in cases)
    rows.append(f"| elements | warps | least heads | {columns} |")
    rows.append("|---|---|---|" + "---|" * len(cases))
    best = None
    for elements, warps, heads in [(2048, 4, 4), (4096, 4, 1), (4096, 4, 4), (4096, 8, 4), (8192, 4, 8),
                                   (8192, 8, 8), (16384, 8, 8)]:
        use_blocks(elements, warps, heads)
        ratios = [gpu_ms(lambda x=x, layout=layout: compute_rope(x, cos, sin, layout), calls=10) / f
                  for x, f, (_, _, layout) in zip(tensors, floors, cases)]
        rows.append(f"| {elements} | {warps} | {heads} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
        print(rows[-1], flush=True)
        if best is None or sum(ratios) < best[0]:
            best = (sum(ratios), elements, warps, heads)
    use_blocks(*best[1:])
    rows.append(f"\nfastest: {best[1]} elements, {best[2]} warps, at least {best[3]} heads (used below)\n")
    print(rows[-1], flush=True)


def launch_cost(rows: list[str]) -> None:
    """Host time of one call, split: the kernel launch alone (Triton's launcher) and the whole call."""
    from flexrope import _triton

    cos, sin = flexrope.precompute_rope_params(128, context_length=8192)
    cos, sin = cos.cuda(), sin.cuda()
    x = torch.randn(1, 32, 1, 128, device="cuda")
    out = torch.empty_like(x)
    operand = _triton.Operand(x, out, 100, None, _triton.START)
    ok = _triton.flag(x.device)

    def launch_only():
        _triton.launch([operand], cos, sin, rotary_dim=128, interleaved=False, inverse=False, inplace=False, ok=ok)

    rows.append("")
    rows.append("| host time per call, (1, 32, 1, 128) fp32 | us |")
    rows.append("|---|---|")
    for name, fn in (("torch.empty_like(x) alone", lambda: torch.empty_like(x)),
                     ("_triton.launch alone (Triton's launcher and argument setup)", launch_only),
                     ("compute_rope, int offset", lambda: compute_rope(x, cos, sin, offset=100))):
        rows.append(f"| {name} | {cpu_us(fn, calls=200):.1f} |")
        print(rows[-1], flush=True)


def fused_speed(rows: list[str]) -> None:
    """bench_fused's cases on the GPU: QK-norm, rotation and cache write of q and k at Qwen3-8B's shapes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from bench_fused import qwen3_step
    except ImportError as error:  # transformers missing
        rows.append(f"(fused steps skipped: {error})")
        return
    rows.append("")
    rows.append("| Qwen3-8B attention: q, k (32, 8 heads) | case | GPU ms | floor ms | ratio | CPU us/call |")
    rows.append("|---|---|---|---|---|---|")
    for seq_len in (1, 2048):
        for dtype in (torch.float32, torch.bfloat16):
            name, floor, steps = qwen3_step(seq_len, dtype, "cuda")
            calls = 200 if seq_len == 1 else 20
            with torch.inference_mode():
                floor_ms = gpu_ms(floor, calls=calls)
                for who, fn in steps.items():
                    ms = gpu_ms(fn, calls=calls)
                    rows.append(f"| {name} | {who} | {ms:.4f} | {floor_ms:.4f} | {ms / floor_ms:.2f} | "
                                f"{cpu_us(fn, calls=min(calls, 50)):.1f} |")
                    print(rows[-1], flush=True)


def decode(rows: list[str]) -> None:
    rope = RotaryEmbedding(128, layout="b h s d", context_length=8192).cuda()
    cos, sin = rope.cos, rope.sin
    q, k = torch.randn(1, 32, 1, 128, device="cuda"), torch.randn(1, 8, 1, 128, device="cuda")
    offset = torch.tensor([4000], device="cuda")

    def seed_formula():
        half = 64
        c, s = cos[4000:4001][None, None], sin[4000:4001][None, None]
        return q * c + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * s

    rows.append("")
    rows.append("| decoding step (1, 32, 1, 128) fp32 | GPU us | CPU us/call |")
    rows.append("|---|---|---|")
    cases = {
        "seed formula": seed_formula,
        "flexrope compute_rope, int offset": lambda: compute_rope(q, cos, sin, offset=4000),
        "flexrope compute_rope, tensor offset": lambda: compute_rope(q, cos, sin, offset=offset),
        "flexrope module q+k, tensor offset": lambda: rope(q, k, offset=offset),
    }
    for name, fn in cases.items():
        rows.append(f"| {name} | {gpu_ms(fn, calls=200) * 1e3:.1f} | {cpu_us(fn, calls=200):.1f} |")
        print(rows[-1], flush=True)
    positions = torch.tensor([4000], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rope(q, k, positions=positions)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope(q, k, positions=positions)
    rows.append(f"| flexrope module q+k in a CUDA graph, replay | {gpu_ms(graph.replay, calls=200) * 1e3:.1f} | "
                f"{cpu_us(graph.replay, calls=200):.1f} |")
    print(rows[-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="checks and the smaller shape only")
    parser.add_argument("--out", default=None, help="write the checks and tables to this markdown file")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--checks-only", action="store_true", help="the checks, no timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return 1
    import triton

    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}")
    print(header, flush=True)
    if not args.skip_checks:
        for step in (correctness, no_sync, fused, cuda_graph, compiled, bad_position_in_child):
            try:
                step()
            except Exception as error:  # noqa: BLE001 - report and go on to the next check
                check(step.__name__, False, f"{type(error).__name__}: {str(error)[:300]}")
    rows: list[str] = []
    if args.checks_only:
        return 0 if all(ok for _, ok, _ in CHECKS) else 1
    sweep(rows)
    shapes = [(4, 1024, 32, 128)] if args.quick else [(8, 4096, 32, 128), (4, 1024, 32, 128)]
    speed(shapes, rows)
    fused_speed(rows)
    decode(rows)
    launch_cost(rows)
    report = [header, "", *(f"- {'PASS' if ok else 'FAIL'} {name} {detail}" for name, ok, detail in CHECKS), "",
              *rows]
    if args.out:
        with open(args.out, "w") as file:
            file.write("\n".join(report) + "\n")
    print("\n".join(rows))
    return 0 if all(ok for _, ok, _ in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
