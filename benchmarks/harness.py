"""Timing of flexrope on the CPU against the floors and the peers that are installed (``bench_rope.py``).

Every ratio is to a floor timed in the same process, in alternating rounds with the case itself, so that a
machine slowing down or speeding up moves both: ``x.clone()`` for out-of-place calls (a read, an allocation
and a write of x), ``out.copy_(x)`` for in-place ones (a read and a write, nothing allocated).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from flexrope import RotaryEmbedding, compute_rope, precompute_rope_params

LAYOUT_SHAPES = {"b h s d": "bhsd", "b s h d": "bshd", "s b h d": "sbhd"}


@dataclass
class Result:
    case: str
    who: str
    seconds: float
    floor: float
    floor_name: str = "x.clone()"
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor


def _time_once(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(fn: Callable[[], object], floor: Callable[[], object], *, rounds: int, number: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``floor``, measured in alternating rounds after a warm-up."""
    for _ in range(2):
        fn(), floor()
    times, floors = [], []
    for _ in range(rounds):
        floors.append(_time_once(floor, number))
        times.append(_time_once(fn, number))
    return statistics.median(times), statistics.median(floors)


def seed_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The seed's formula on (b h s d), re-implemented from its description: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    cos = cos[offset : offset + x.shape[-2]].unsqueeze(0).unsqueeze(0)
    sin = sin[offset : offset + x.shape[-2]].unsqueeze(0).unsqueeze(0)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def _peers(head_dim: int, context: int, cos: torch.Tensor, sin: torch.Tensor, notes: list[str]):
    """Peer callables by (layout, pairing): each peer rotates in its own native layout and pairing."""
    peers: dict[tuple[str, bool], dict[str, Callable]] = {
        ("b h s d", False): {"seed formula": lambda x: seed_rope(x, cos.to(x.dtype), sin.to(x.dtype))}
    }
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        def hf(x):
            c, s = cos[: x.shape[-2]].to(x.dtype)[None], sin[: x.shape[-2]].to(x.dtype)[None]
            return apply_rotary_pos_emb(x, x, c, s)  # q and k: half of the time is one tensor's

        peers[("b h s d", False)]["transformers (per tensor)"] = hf
    except ImportError:
        notes.append("transformers not installed: skipped")
    try:
        import rotary_embedding_torch

        module = rotary_embedding_torch.RotaryEmbedding(dim=head_dim, cache_if_possible=False)
        peers.setdefault(("b h s d", True), {})["rotary-embedding-torch"] = module.rotate_queries_or_keys
    except ImportError:
        notes.append("rotary-embedding-torch not installed: skipped")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchtune.modules import RotaryPositionalEmbeddings
        module = RotaryPositionalEmbeddings(head_dim, max_seq_len=context)
        peers.setdefault(("b s h d", True), {})["torchtune"] = module
    except Exception as error:  # noqa: BLE001 - torchtune fails to import for many reasons (torchao)
        notes.append(f"torchtune unavailable ({type(error).__name__}): skipped")
    return peers


def run(
    shape: tuple[int, int, int, int] = (4, 32, 1024, 128),
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    layouts: tuple[str, ...] = tuple(LAYOUT_SHAPES),
    rounds: int = 7,
    number: int = 3,
    peers: bool = True,
) -> tuple[list[Result], list[str]]:
    """Time every case; returns the results and notes (skipped peers)."""
    b, h, s, d = shape
    notes: list[str] = []
    cos, sin = precompute_rope_params(d, context_length=max(s, 4096))
    peer_table = _peers(d, max(s, 4096), cos, sin, notes) if peers else {}
    results = []
    for dtype in dtypes:
        canonical = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(0)).to(dtype)
        for layout in layouts:
            x = canonical.permute(*[("bhsd".index(a)) for a in LAYOUT_SHAPES[layout]]).contiguous()
            dtype_name = str(dtype).removeprefix("torch.")
            for interleaved in (False, True):
                pairing = "interleaved" if interleaved else "half-split"
                case = f"{layout} {pairing} {dtype_name}"
                candidates = {
                    "flexrope": lambda x=x, i=interleaved, lay=layout: compute_rope(x, cos, sin, lay, interleaved=i),
                }
                work = x.clone()
                candidates["flexrope inplace"] = lambda w=work, i=interleaved, lay=layout: compute_rope(
                    w, cos, sin, lay, interleaved=i, inplace=True)
                candidates.update({name: (lambda f=f, x=x: f(x)) for name, f in
                                   peer_table.get((layout, interleaved), {}).items()})
                out = torch.empty_like(x)
                for who, fn in candidates.items():
                    inplace = who == "flexrope inplace"
                    floor_fn = (lambda out=out, x=x: out.copy_(x)) if inplace else x.clone
                    with torch.no_grad():
                        seconds, floor = compare(fn, floor_fn, rounds=rounds, number=number)
                    if who.startswith("transformers"):
                        seconds /= 2
                    results.append(Result(case, who, seconds, floor, "out.copy_(x)" if inplace else "x.clone()"))
    return results, notes


def decode_latency(*, rounds: int = 7, number: int = 200) -> list[Result]:
    """One decoding step, (1, 32, 1, 128) at position 100, float32: flexrope (the position as an int, as a
    tensor, and the module with q and k of 8 heads at a tensor offset, as a KV-cache loop passes it) against
    the seed's formula.

    Latency this small drifts with the machine, so every candidate and the floor are timed round-robin in
    each round, and each reports its median."""
    cos, sin = precompute_rope_params(128, context_length=4096)
    x, k, position = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 1, 128), torch.tensor([100])
    rope = RotaryEmbedding(128, context_length=4096)
    candidates = {
        "flexrope": lambda: compute_rope(x, cos, sin, offset=100),
        "flexrope b s h d": lambda: compute_rope(x.transpose(1, 2), cos, sin, "b s h d", offset=100),
        "flexrope positions tensor": lambda: compute_rope(x, cos, sin, positions=position),
        "flexrope module q+k": lambda: rope(x, k, offset=position),
        "seed formula": lambda: seed_rope(x, cos, sin, offset=100),
        "x.clone()": x.clone,
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            _time_once(fn, number)
        for _ in range(rounds):
            for name, fn in candidates.items():
                times[name].append(_time_once(fn, number))
    floor = statistics.median(times.pop("x.clone()"))
    return [Result("decode (1 32 1 128) float32", name, statistics.median(t), floor) for name, t in times.items()]


def header() -> str:
    return (f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}; python {platform.python_version()}")


def table(results: list[Result]) -> str:
    lines = [f"{'case':<34} {'who':<26} {'time':>10} {'floor':>12} {'floor time':>10} {'ratio':>7}"]
    for r in results:
        unit, scale = ("us", 1e6) if r.seconds < 1e-3 else ("ms", 1e3)
        lines.append(f"{r.case:<34} {r.who:<26} {r.seconds * scale:>7.2f} {unit} {r.floor_name:>12} "
                     f"{r.floor * scale:>7.2f} {unit} {r.ratio:>6.2f}x")
    return "\n".join(lines)
