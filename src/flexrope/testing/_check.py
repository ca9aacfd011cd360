"""``check_rope``: a user's RoPE against the rotation in float64, and a diagnosis when they differ.

A handful of fixed examples (fixed seed, three shapes), not a search: a check in a user's test suite must be
fast and give the same verdict on every run, and the known mistakes show on any example. A mismatch is then
explained by recomputing, for each usual mistake in turn, what the output would be had the function made it,
and keeping the first one that matches every example within the output dtype's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._errors import FlexRopeError
from .._layout import ELLIPSIS, Layout, parse_layout
from .._scaling import Scaling, frequencies, parse_scaling
from .._tables import check_rotary_dim

# (rtol, atol) per output dtype: torch.testing's for float64 and float32 (which pass float32 tables at the
# short positions drawn by default); four roundings of the dtype (table, two products, sum) for half types.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (4e-3, 1e-5),
    torch.bfloat16: (3.2e-2, 1e-5),
}
# (b, h, s) of the examples: s never equal to h or b, so a sequence read from another axis shows.
SHAPES = ((2, 3, 7), (1, 4, 12), (3, 2, 5))
# Bases of released models (and round neighbours), tried first when the frequencies are off.
BASES = (10_000, 500_000, 1_000_000, 100_000, 50_000, 5_000_000, 10_000_000, 1_000, 20_000, 25_000, 40_000,
         75_000, 150_000, 200_000, 250_000, 2_000_000, 8_000_000, 1_000_000_000)
DEFAULT_MAX_POSITION = 64  # float32 tables (the book's, Hugging Face's) pass below it; long ones need float64 angles
_AXIS_INDEX = {"h": "head index", "b": "batch index"}


@dataclass
class _Spec:
    """What the caller declared, checked."""

    fn_name: str
    layout: Layout
    head_dim: int
    theta: float
    interleaved: bool
    rotary_dim: int
    scaling: Scaling | None
    dtype: torch.dtype

    def inv_freq(self, seq_len: int, theta: float | None = None, rotary_dim: int | None = None):
        """Float64 inverse frequencies and the factor on cos and sin, flexrope's (scaling recipes included)."""
        rotary_dim = rotary_dim or self.rotary_dim
        scaling = self.scaling if rotary_dim == self.rotary_dim else None
        return frequencies(scaling, rotary_dim, float(theta or self.theta), seq_len)


@dataclass
class _Example:
    x: torch.Tensor  # as passed to fn (a copy of it, should fn write into its input)
    canonical: torch.Tensor  # float64 (*lead, b, h, s, d) of x
    out: torch.Tensor  # float64 (*lead, b, h, s, d) of fn's output
    positions: torch.Tensor  # float64, broadcasts against canonical[..., 0]: (*1, b, 1, s)
    bound: torch.Tensor  # the tolerance of each element: atol + rtol * the token's magnitude, (*lead, b, h, s, 1)
    seq_len: int  # the largest position + 1 (what dynamic scaling reads)


def _pairs(rotary_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    half = torch.arange(rotary_dim // 2)
    return (2 * half, 2 * half + 1) if interleaved else (half, half + rotary_dim // 2)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, interleaved: bool,
           factor: float = 1.0, swap: bool = False) -> torch.Tensor:
    """RoPE from the definition, in float64: pair j of the first 2 * len(inv_freq) channels of ``x``
    (..., d) turned by ``positions`` (broadcast against x[..., 0]) times ``inv_freq[j]``; ``swap`` exchanges
    cos and sin."""
    first, second = _pairs(2 * inv_freq.shape[0], interleaved)
    angle = positions[..., None] * inv_freq
    cos, sin = angle.cos() * factor, angle.sin() * factor
    if swap:
        cos, sin = sin, cos
    a, b = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = a * cos - b * sin
    out[..., second] = b * cos + a * sin
    return out


def _within(example: _Example, expected: torch.Tensor) -> bool:
    return bool(((example.out - expected).abs() <= example.bound).all())


def _describe_call(spec: _Spec, x: torch.Tensor) -> str:
    return f"{spec.fn_name}(x) with x of shape {tuple(x.shape)} laid out as {spec.layout.text!r}"


def _checked_output(spec: _Spec, x: torch.Tensor, out: object) -> torch.Tensor:
    call = _describe_call(spec, x)
    if not isinstance(out, torch.Tensor):
        hint = " (return the rotated x alone)" if isinstance(out, (tuple, list)) else ""
        raise AssertionError(f"{call} returned a {type(out).__name__}: expected a tensor of x's shape "
                             f"{tuple(x.shape)}{hint}")
    if out.shape != x.shape:
        hint = (": the same lengths in another order, the function returns another layout"
                if sorted(out.shape) == sorted(x.shape) else "")
        raise AssertionError(f"{call} returned shape {tuple(out.shape)}: a RoPE keeps x's shape{hint}")
    if out.dtype != x.dtype:
        raise AssertionError(f"{call} returned {out.dtype}: a RoPE keeps x's dtype {x.dtype} (cast the result "
                             f"back with .to(x.dtype), or make the tables in x's dtype)")
    if out.device != x.device:
        raise AssertionError(f"{call} returned a tensor on {out.device}: x is on {x.device}")
    return out


def _canonical(layout: Layout, t: torch.Tensor) -> torch.Tensor:
    return layout.canonical(t).to(torch.float64)


def _draw_positions(rng: torch.Generator, index: int, b: int, s: int, max_position: int) -> torch.Tensor:
    """(b, s) positions below ``max_position``: the last ones first (where precision is lost), then from 0
    (where every frequency is seen unwrapped), then anywhere, in any order."""
    if index == 0:
        starts = max_position - s - torch.arange(b) * min(s, max(0, (max_position - s) // max(b, 1)))
    elif index == 1:
        starts = torch.zeros(b, dtype=torch.long)
    else:
        return torch.stack([torch.randperm(max_position, generator=rng)[:s] for _ in range(b)])
    return starts.clamp(min=0)[:, None] + torch.arange(s)


def _examples(fn, spec: _Spec, lengths: dict, with_positions: bool, max_position: int) -> list[_Example]:
    names = [name for entry in spec.layout.entries for name in entry]
    rng = torch.Generator().manual_seed(0)
    rtol, atol = TOLERANCES.get(spec.dtype, TOLERANCES[torch.float32])
    examples = []
    for index, (b, h, s) in enumerate(SHAPES):
        sizes = {"b": b, "h": h, "s": s, "d": spec.head_dim, **lengths}
        b, h, s = (sizes[a] if a in names else 1 for a in "bhs")
        lead = (2,) if ELLIPSIS in names else ()
        canonical = torch.randn(*lead, b, h, s, spec.head_dim, generator=rng, dtype=torch.float64)
        x = spec.layout.from_canonical(canonical.to(spec.dtype)).contiguous()
        if with_positions:
            positions = _draw_positions(rng, index, b, s, max_position)
            passed = positions if "b" in names else positions[0]
        else:
            positions = torch.arange(s).expand(b, s)
        given = x.clone()
        try:
            out = fn(x, passed.clone()) if with_positions else fn(x)
        except Exception as error:
            raise AssertionError(f"{_describe_call(spec, given)} raised {type(error).__name__}: {error}") from error
        out = _checked_output(spec, given, out)
        seen = _canonical(spec.layout, given)
        scale = seen.abs().amax(-1, keepdim=True) * 1.5  # bounds the magnitude of each pair of the token
        examples.append(_Example(
            given, seen, _canonical(spec.layout, out), positions.to(torch.float64)[:, None, :],
            atol + rtol * scale, int(positions.max()) + 1,
        ))
    return examples


def _expected(spec: _Spec, example: _Example, positions=None, *, theta=None, rotary_dim=None, inv_freq=None,
              interleaved=None, swap=False) -> torch.Tensor:
    inv, factor = spec.inv_freq(example.seq_len, theta, rotary_dim)
    return rotate(example.canonical, example.positions if positions is None else positions,
                  inv if inv_freq is None else inv_freq, factor=factor, swap=swap,
                  interleaved=spec.interleaved if interleaved is None else interleaved)


def _explains(examples: list[_Example], make) -> bool:
    return all(_within(example, make(example)) for example in examples)


def _sequence_axis(spec: _Spec, examples: list[_Example]) -> str | None:
    """The sequence read from another dim of x: each token rotated by its index along that dim."""
    ndim = examples[0].x.ndim
    entries = spec.layout.entry_of_dim(ndim)
    seq_dim = next(dim for dim, entry in enumerate(entries) if "s" in entry)
    for dim, entry in enumerate(entries):
        if dim == seq_dim or "d" in entry:
            continue

        def make(example, dim=dim):
            shape = example.x.shape
            index = torch.arange(shape[dim], dtype=torch.float64).view([-1 if k == dim else 1 for k in range(ndim)])
            per_token = _canonical(spec.layout, index.expand(shape))[..., 0]
            return _expected(spec, example, per_token)

        if _explains(examples, make):
            name = " ".join(entry) if entry != (ELLIPSIS,) else "..."
            what = _AXIS_INDEX.get(entry[0], f"index along dim {dim}") if len(entry) == 1 else (
                f"index along dim {dim}")
            where = f"dim {dim} ({name})"
            seq = f"dim {seq_dim} ({' '.join(entries[seq_dim])})"
            return (f"the sequence is read from {where} instead of {seq}: each token is rotated by its {what}; "
                    f"declare the layout or transpose")
    return None


def _partial(spec: _Spec, examples: list[_Example]) -> str | None:
    """How many leading channels rotate, when it is not the declared rotary dim."""
    d, r = spec.head_dim, spec.rotary_dim
    same = torch.stack([
        ((example.out - example.canonical).abs() <= example.bound).flatten(0, -2).all(0) for example in examples
    ]).all(0)
    untouched = 0
    while untouched < d and same[d - 1 - untouched]:
        untouched += 1
    rotated = d - untouched
    if rotated == r or rotated == 0:
        return None
    if rotated > r:
        rotated = d if rotated % 2 == 0 else rotated
    if rotated % 2:
        return None
    for source, width in (("rotary_dim", rotated), ("the head dim", d)):
        def make(example, width=width):
            inv = spec.inv_freq(example.seq_len, rotary_dim=width)[0][: rotated // 2]
            return _expected(spec, example, inv_freq=inv, rotary_dim=rotated)

        if width >= rotated and _explains(examples, make):
            freqs = f"frequencies from {source} ({width})"
            if rotated < r:
                return (f"only the first {rotated} channels rotate (rotary_dim={rotated}, {freqs}) where "
                        f"{r} were declared; the other {d - rotated} pass through")
            return f"all {rotated} channels rotate ({freqs}) where rotary_dim={r} was declared"
    if rotated < r:
        return (f"only the first {rotated} channels rotate where {r} were declared (the last {d - rotated} pass "
                f"through), and the rotated ones match no frequencies tried")
    return None


def _measured_angles(spec: _Spec, example: _Example):
    """Per pair of the declared pairing: the angle fn turned it by, the true angle, |z_in| and the tolerance."""
    first, second = _pairs(spec.rotary_dim, spec.interleaved)
    z_in = torch.complex(example.canonical[..., first], example.canonical[..., second])
    z_out = torch.complex(example.out[..., first], example.out[..., second])
    inv, _ = spec.inv_freq(example.seq_len)
    true = example.positions[..., None] * inv
    return z_out / z_in, true, z_in.abs(), example.bound, inv


def _ulp32(value: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(value.abs().clamp(min=1e-30)))
    return torch.where(value == 0, torch.zeros_like(value), torch.pow(2.0, exponent - 23))


def _float32_angles(spec: _Spec, examples: list[_Example]) -> str | None:
    """Every pair turned by its angle as float32 holds it: position * inv_freq rounded to 24 bits."""
    if spec.scaling is not None and spec.scaling.rope_type != "linear":
        return None
    worst, where = 0.0, 0
    for example in examples:
        ratio, true, size, bound, inv = _measured_angles(spec, example)
        firm = size >= 0.3 * size.amax(-1, keepdim=True)  # pairs too small to measure an angle on are skipped
        noise = 2 * bound / size.clamp(min=1e-12)
        off = torch.angle(ratio * torch.polar(torch.ones_like(true), -true)).abs()
        allowance = 2 * _ulp32(true) + 4 * example.positions.abs()[..., None] * _ulp32(inv) + noise
        if not bool(((off <= allowance) | ~firm).all()) or not bool(((ratio.abs() - 1).abs() <= noise).all()):
            return None
        off = torch.where(firm, off, torch.zeros_like(off))
        if off.max() > worst:
            worst = float(off.max())
            index = torch.unravel_index(off.argmax(), off.shape)
            where = int(example.positions.expand(off.shape[:-1])[index[:-1]])
    if worst == 0.0:
        return None
    return (f"angles in float32 lose {worst:.1e} at position {where:,}: float32 holds position * inv_freq to 24 "
            f"bits; compute the angles in float64 and round the tables once (flexrope.precompute_rope_params "
            f"does)")


def _fitted_base(spec: _Spec, examples: list[_Example]) -> float | None:
    """The base whose frequencies best explain the angles fn turned the pairs by, unwrapped from position 1 up."""
    measured: dict[int, list[float]] = {}
    for example in examples:
        ratio, _, size, _, _ = _measured_angles(spec, example)
        positions = example.positions.expand(ratio.shape[:-1])
        firm = size >= 0.5
        for p in positions.unique().tolist():
            if p <= 0:
                continue
            mask = (positions == p)[..., None] & firm
            for j in range(1, ratio.shape[-1]):
                angles = torch.angle(ratio[..., j])[mask[..., j]]
                if angles.numel():
                    measured.setdefault(j, []).append((p, float(angles.median())))
    estimates = []
    n = spec.rotary_dim // 2
    for j, samples in measured.items():
        samples.sort()
        if samples[0][0] != 1 or not (n // 4 <= j <= max(n // 4, 3 * n // 4)):
            continue
        inv = samples[0][1]
        for p, angle in samples[1:]:
            turns = round((p * inv - angle) / (2 * math.pi))
            inv = (angle + 2 * math.pi * turns) / p
        if inv > 0:
            estimates.append(inv ** (-spec.rotary_dim / (2 * j)))
    if not estimates or max(estimates) > 1.02 * min(estimates):  # the pairs disagree: no one base explains them
        return None
    return float(torch.tensor(estimates).median())


def _base(spec: _Spec, examples: list[_Example]) -> str | None:
    declared = f"{spec.theta:.0f}" if float(spec.theta).is_integer() else f"{spec.theta:g}"
    fitted = _fitted_base(spec, examples)
    candidates = [float(base) for base in BASES if base != spec.theta]
    if fitted is not None:
        candidates = [float(f"{fitted:.{digits}g}") for digits in range(1, 7)] + candidates
    for theta in dict.fromkeys(candidates):
        if theta > 1 and theta != spec.theta and _explains(examples, lambda e, t=theta: _expected(spec, e, theta=t)):
            used = f"{theta:.0f}" if theta.is_integer() else f"{theta:g}"
            return f"theta {used} where {declared} was declared: the frequencies use another base"
    if fitted is not None and abs(math.log(fitted / spec.theta)) > 0.01:
        return (f"the frequencies fit theta {fitted:.4g} where {declared} was declared, but not exactly: check how "
                f"inv_freq is computed")
    return None


def _suspects(spec: _Spec):
    """(diagnosis, what the output would be) for each usual mistake, in the order they are tried."""
    pairing = "pairs i with i + r/2 (half-split)" if spec.interleaved else "pairs 2i with 2i+1 (interleaved)"
    yield ("nothing rotates: the output equals the input", lambda e: e.canonical)
    yield (f"{pairing} but {'interleaved' if spec.interleaved else 'half-split'} was declared: declare "
           f"interleaved={not spec.interleaved} if the model's q and k weights are in that order, or pair the "
           f"channels as declared",
           lambda e: _expected(spec, e, interleaved=not spec.interleaved))
    yield ("rotation by the negated angle (sin with the wrong sign, or the inverse rotation)",
           lambda e: _expected(spec, e, -e.positions))
    yield ("positions start at 1, not 0: each token is rotated by its position + 1",
           lambda e: _expected(spec, e, e.positions + 1))
    yield ("positions are one less than they should be: each token is rotated by its position - 1",
           lambda e: _expected(spec, e, e.positions - 1))
    yield ("cos and sin are swapped", lambda e: _expected(spec, e, swap=True))
    yield ("every batch row is rotated by the positions of the first row, not its own",
           lambda e: _expected(spec, e, e.positions[:1].expand_as(e.positions)))
    if spec.scaling is not None:
        yield (f"the {spec.scaling.rope_type} scaling is not applied: the frequencies are the plain ones of theta "
               f"{spec.theta:g}", lambda e: rotate(e.canonical, e.positions, frequencies(None, spec.rotary_dim,
                                                                                       spec.theta, e.seq_len)[0],
                                                   interleaved=spec.interleaved))


def _largest_error(spec: _Spec, examples: list[_Example]) -> str:
    example = max(examples, key=lambda e: float(((e.out - _expected(spec, e)).abs() - e.bound).max()))
    expected = _expected(spec, example)
    error = (example.out - expected).abs()
    flat = int((error - example.bound).argmax())
    index = torch.unravel_index(torch.tensor(flat), error.shape)
    *lead, b, h, s, c = (int(i) for i in index)
    position = int(example.positions.expand(error.shape[:-1])[tuple(index[:-1])])
    offsets = torch.arange(example.x.numel()).view(example.x.shape)
    in_x = tuple(int(i) for i in torch.unravel_index(spec.layout.canonical(offsets)[tuple(index)], example.x.shape))
    off = int((~(error <= example.bound)).sum())  # NaN is off too
    row = f" of batch row {b}" if lead == [] else f" of batch row {b} (leading index {tuple(lead)})"
    return (f"no known mistake explains it; the largest error, {float(error[tuple(index)]):.3g}, is at token {s} "
            f"(position {position}), head {h}, channel {c}{row}: x{list(in_x)} in {spec.layout.text!r}, expected "
            f"{float(expected[tuple(index)]):.6g}, got {float(example.out[tuple(index)]):.6g} "
            f"({off} element{'s' if off != 1 else ''} of {error.numel()} off in this example)")


def diagnose(spec: _Spec, examples: list[_Example]) -> str:
    for message, make in _suspects(spec):
        try:
            if _explains(examples, make):
                return message
        except (RuntimeError, TypeError):  # a suspect that does not apply to these shapes
            continue
    for suspect in (_sequence_axis, _partial, _base, _float32_angles):
        message = suspect(spec, examples)
        if message:
            return message
    return _largest_error(spec, examples)


def check_rope(
    fn,
    layout: str,
    *,
    head_dim: int,
    theta_base: float = 10_000,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    scaling: dict | None = None,
    positions: bool = False,
    max_position: int | None = None,
    dtype: torch.dtype = torch.float32,
    **axes_lengths: int,
) -> None:
    """Check that ``fn`` is RoPE in ``layout``: raise ``AssertionError`` with a diagnosis where it is not.

    ``fn(x)`` (or ``fn(x, positions)`` with ``positions=True``) is called on three random tensors laid out
    as ``layout`` (fixed seed: the same examples every run), of shapes with distinct lengths of b, h and s,
    and compared with the rotation from the definition in float64, with flexrope's frequencies (scaling
    recipes included), within a tolerance derived from x's dtype. When they differ, the usual mistakes are
    tried against the output, and the message names the one that explains it: the sequence read from
    another axis (tokens rotated by their head index), the other pairing, another base, angles in float32,
    fewer channels rotating, the negated angle, positions off by one, cos and sin swapped; otherwise, where
    the largest error is (token, head, channel).

    Args:
        fn: the RoPE under test: ``fn(x) -> rotated x``, same shape, layout and dtype.
        layout: the layout ``fn`` is called with, e.g. ``"b s h d"``.
        head_dim: d, the channels of each head.
        theta_base, interleaved, rotary_dim, scaling: what ``fn`` claims to do, as in
            :func:`flexrope.precompute_rope_params` and :func:`flexrope.compute_rope`.
        positions: call ``fn(x, positions)`` with int64 positions drawn below ``max_position``, of shape
            (b, s), or (s,) when the layout has no b; the first example holds the last positions. Otherwise
            tokens are at 0 .. s-1.
        max_position: the bound of drawn positions, with ``positions=True`` only. Default 64: float32 angles
            (the book's and Hugging Face's tables) pass below it; give the model's context length (e.g. 2**20)
            to hold ``fn`` to float64 angles there.
        dtype: the dtype of x.
        **axes_lengths: lengths kept fixed (needed for groups such as ``"b s (h d)"``: ``h=4``).

    Raises:
        AssertionError: ``fn`` is not RoPE in ``layout``; the message says why.
        FlexRopeError: the arguments of ``check_rope`` itself are wrong.

    Example:
        >>> import torch, flexrope
        >>> from flexrope.testing import check_rope
        >>> cos, sin = flexrope.precompute_rope_params(16)
        >>> check_rope(lambda x: flexrope.compute_rope(x, cos, sin, "b s h d"), "b s h d", head_dim=16)
        >>> reads_bhsd = lambda x: flexrope.compute_rope(x, cos, sin, "b h s d")
        >>> check_rope(reads_bhsd, "b s h d", head_dim=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: ... the sequence is read from dim 2 (h) instead of dim 1 (s): each token is rotated by ...
    """
    try:
        if not callable(fn):
            raise FlexRopeError(f"fn={fn!r}: expected a callable, fn(x) -> rotated x")
        if "d" in axes_lengths and axes_lengths["d"] != head_dim:
            raise FlexRopeError(f"d={axes_lengths['d']} but head_dim={head_dim}: give head_dim alone")
        if not isinstance(layout, str):
            raise FlexRopeError(f"layout={layout!r}: expected a string such as 'b s h d'")
        parsed = parse_layout(layout, tuple(sorted({**axes_lengths, "d": head_dim}.items())))
        rotary_dim = check_rotary_dim(head_dim, rotary_dim)
        recipe = parse_scaling(scaling, rotary_dim=rotary_dim, head_dim=head_dim, theta_base=theta_base)
        if isinstance(theta_base, bool) or not isinstance(theta_base, (int, float)) or not theta_base > 1:
            raise FlexRopeError(f"theta_base={theta_base!r}: expected a number larger than 1")
        if dtype not in TOLERANCES:
            raise FlexRopeError(f"dtype={dtype!r}: expected one of {', '.join(map(str, TOLERANCES))}")
        if max_position is not None and not positions:
            raise FlexRopeError(f"max_position={max_position} without positions=True: tokens are at 0 .. s-1; "
                                f"pass positions=True to call fn(x, positions)")
        max_position = DEFAULT_MAX_POSITION if max_position is None else max_position
        longest = max(s for _, _, s in SHAPES) if "s" not in axes_lengths else axes_lengths["s"]
        if type(max_position) is not int or max_position < longest:  # noqa: E721
            raise FlexRopeError(f"max_position={max_position!r}: expected an int of at least {longest}, the "
                                f"longest sequence drawn")
    except FlexRopeError as error:
        raise FlexRopeError(f"check_rope(layout={layout!r}, head_dim={head_dim!r}): {error}") from None
    spec = _Spec(getattr(fn, "__qualname__", type(fn).__name__), parsed, head_dim, float(theta_base),
                 bool(interleaved), rotary_dim, recipe, dtype)
    lengths = {name: value for name, value in axes_lengths.items() if name in "bhs"}
    examples = _examples(fn, spec, lengths, positions, max_position)
    failing = [example for example in examples if not _within(example, _expected(spec, example))]
    if not failing:
        return
    worst = max(float((e.out - _expected(spec, e)).abs().max()) for e in failing)
    declared = [f"head_dim={head_dim}", f"theta_base={theta_base}"]
    declared += ["interleaved" if spec.interleaved else "half-split"]
    declared += [f"rotary_dim={rotary_dim}"] if rotary_dim != head_dim else []
    declared += [f"scaling={recipe.rope_type}"] if recipe else []
    raise AssertionError(
        f"{spec.fn_name} is not RoPE in layout {parsed.text!r} ({', '.join(declared)}): {len(failing)} of "
        f"{len(examples)} examples differ, by up to {worst:.3g}; diagnosis: {diagnose(spec, examples)}"
    )
