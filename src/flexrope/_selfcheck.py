"""``python -m flexrope``: check every layout and both pairings against a float64 reference on this machine."""

from __future__ import annotations

import itertools
import platform

import einops
import torch

from . import _native
from ._functional import compute_rope
from ._tables import precompute_rope_params

SHAPE = {"b": 2, "h": 8, "s": 256, "d": 64}
EXTRA_LAYOUTS = [("b s (h d)", {"h": SHAPE["h"]}), ("... s h d", {}), ("s (b h) d", {"b": SHAPE["b"]})]


def layouts() -> list[tuple[str, dict]]:
    """Every permutation of "b h s d", then grouped and ellipsis layouts."""
    return [(" ".join(p), {}) for p in itertools.permutations("bhsd")] + EXTRA_LAYOUTS


def complex_reference(x: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """RoPE of canonical (b h s d) ``x`` as complex multiplication, in float64."""
    x = x.double()
    d = x.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x.unflatten(-1, (d // 2, 2)).contiguous())
    else:
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * freqs
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(z).flatten(-2) if interleaved else torch.cat([z.real, z.imag], dim=-1)


def run(tolerance: float = 1e-5) -> bool:
    """Print the table and return whether every case is within ``tolerance`` of the reference."""
    _native._loaded()  # built here, once, where it is not yet cached: running this pre-builds the C loop
    theta = 10_000.0
    cos, sin = precompute_rope_params(SHAPE["d"], theta_base=theta, context_length=SHAPE["s"])
    canonical = torch.randn(*(SHAPE[a] for a in "bhsd"), generator=torch.Generator().manual_seed(0))
    expected = {pairing: complex_reference(canonical, theta, pairing) for pairing in (False, True)}
    print(f"flexrope self-check: torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"float32 x of (b h s d) = {tuple(SHAPE.values())}, every layout, against a float64 complex reference\n")
    print(f"{'layout':<12} {'pairing':<12} {'max error':>10}")
    ok = True
    for layout, lengths in layouts():
        source = f"b h s d -> {layout.replace('...', 'b')}" if "..." in layout else f"b h s d -> {layout}"
        x = einops.rearrange(canonical, source, **lengths).contiguous()
        for interleaved in (False, True):
            y = compute_rope(x, cos, sin, layout, interleaved=interleaved, **lengths)
            back = einops.rearrange(y, f"{source.split(' -> ')[1]} -> b h s d", **lengths)
            error = (back.double() - expected[interleaved]).abs().max().item()
            mark = "" if error <= tolerance else "  FAIL"
            ok = ok and error <= tolerance
            pairing = "interleaved" if interleaved else "half-split"
            print(f"{layout:<12} {pairing:<12} {error:>10.2e}{mark}")
    print(f"\n{'all layouts agree with the reference' if ok else 'SOME CASES FAILED'} (tolerance {tolerance:g})")
    if _native.library_path is not None:
        print(f"CPU calls ran the C loop, built by your C compiler: {_native.library_path}")
        cached = _native.library_path.parent in _native._caches()
        print("(cached there: later processes load it without building)" if cached else
              "(built for this process alone: the cache was refused, see the warning above)")
    elif _native.unavailable:
        print("CPU calls ran the eager kernels: the C loop could not be built here (see the warning above)")
    print("Speed is measured against the memory floor by benchmarks/bench_rope.py (CPU) and")
    print("benchmarks/bench_gpu.py (CUDA); their results are in benchmarks/results*.md.")
    return ok
