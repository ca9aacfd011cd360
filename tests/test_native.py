"""The native C loop (the CPU default) gives the eager kernels' bits in every layout, dtype and pairing, in place
and out of place, on one thread or several, and steps aside cleanly where it cannot be built."""

import os
import platform
import tempfile
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexrope
from flexrope import _native, compute_rope

from flexrope.testing import layout_cases


@pytest.fixture
def patch(monkeypatch):
    """Per test: a threshold or a backend one test sets never reaches the next."""
    return monkeypatch


def _both(patch, fn):
    """fn() through the native loop and through the eager kernels."""
    patch.setenv("FLEXROPE_BACKEND", "native")
    fast = fn()
    assert _native._library is not None and not _native.unavailable  # the loop was built, and ran
    patch.setenv("FLEXROPE_BACKEND", "eager")
    slow = fn()
    patch.setenv("FLEXROPE_BACKEND", "native")
    return fast, slow


@settings(max_examples=40)
@given(case=layout_cases(), interleaved=st.booleans(), partial=st.booleans(), per_row=st.booleans(),
       inverse=st.booleans(), start=st.none() | st.integers(0, 26), seed=st.integers(0, 99))
def test_every_layout_equals_eager_bitwise_in_and_out_of_place(case, interleaved, partial, per_row, inverse, start,
                                                              seed):
    with pytest.MonkeyPatch.context() as patch:  # hypothesis runs the body many times per fixture
        _every_layout_case(patch, case, interleaved, partial, per_row, inverse, start, seed)


def _every_layout_case(patch, case, interleaved, partial, per_row, inverse, start, seed):
    text, lengths, canonical, x, _ = case
    d = canonical.shape[-1]
    rotary_dim = d - 2 if partial and d > 2 else None
    cos, sin = flexrope.precompute_rope_params(d, context_length=32, rotary_dim=rotary_dim)
    b, s = canonical.shape[-4], canonical.shape[-2]
    positions = torch.randint(0, 26, (b, s) if per_row else (s,), generator=torch.Generator().manual_seed(seed))
    where = dict(positions=positions) if start is None else dict(offset=start)  # an int start reads whole tables
    kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, inverse=inverse, **where, **lengths)
    fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, text, **kwargs))
    assert torch.equal(fast, slow) and fast.stride() == slow.stride()
    inplace = x.clone()
    assert compute_rope(inplace, cos, sin, text, inplace=True, **kwargs) is inplace
    assert torch.equal(inplace, slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout, shape", [("b h s d", (2, 4, 300, 128)), ("b s h d", (2, 300, 4, 64)),
                                           ("s b h d", (300, 2, 4, 32)), ("b s (h d)", (2, 300, 4 * 48))])
def test_dtypes_on_several_threads_equal_eager_bitwise(patch, dtype, interleaved, layout, shape):
    """Sizes past the threading threshold, head dims with and without the unrolled pair counts (64, 32)."""
    d = 48 if "(h d)" in layout else shape[-1]
    cos, sin = flexrope.precompute_rope_params(d, context_length=512)  # float32: float64 x converts them
    x = torch.randn(shape).to(dtype)
    assert x.numel() >= _native.THREADED_MIN_ELEMENTS
    lengths = {"h": 4} if "(h d)" in layout else {}
    generator = torch.Generator().manual_seed(0)
    wheres = (dict(offset=5), dict(offset=torch.tensor([0, 200])), dict(offset=9, inverse=True),
              dict(positions=torch.randint(0, 512, (300,), generator=generator)),
              dict(positions=torch.randint(0, 512, (2, 300), generator=generator), inverse=True))
    for where in wheres:
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, layout, interleaved=interleaved, **where,
                                                       **lengths))
        assert torch.equal(fast, slow)
        y = x.clone()
        patch.setenv("FLEXROPE_BACKEND", "native")
        compute_rope(y, cos, sin, layout, interleaved=interleaved, inplace=True, **where, **lengths)
        assert torch.equal(y, slow)


@pytest.mark.parametrize("layout, shape", [("b h s d", (3, 7, 9, 16)), ("b s h d", (3, 9, 7, 16)),
                                           ("s b h d", (9, 3, 7, 16))])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("short_tiles", [False, True])
def test_rows_sharing_angles_rotated_in_groups_with_a_remainder(patch, monkeypatch, layout, shape, interleaved,
                                                                short_tiles):
    """7 heads: one group of 4 rows that share their angles and 3 rotated one by one, whether the heads are
    the dim outside the innermost ("b h s d") or the innermost ("b s h d"); per-row offsets and positions
    (angles that vary with the batch row) and partial rotary (the tail copied for each row of a group). With
    short tiles, "b h s d" walks its 9 tokens as a tile of 8 and a tile of 1, every group through each."""
    if short_tiles:
        monkeypatch.setattr(_native, "TABLE_TILE_BYTES", 1)
        monkeypatch.setattr(_native, "_plans", {})
    cos, sin = flexrope.precompute_rope_params(16, context_length=64, rotary_dim=12)
    x = torch.randn(shape).to(torch.bfloat16)
    positions = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    for where in (dict(offset=3), dict(offset=torch.tensor([0, 20, 40])), dict(positions=positions)):
        kwargs = dict(interleaved=interleaved, rotary_dim=12, **where)
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        y = x.clone()
        compute_rope(y, cos, sin, layout, inplace=True, **kwargs)
        assert torch.equal(fast, slow) and torch.equal(y, slow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
@pytest.mark.parametrize("head_dim, rotary_dim", [(18, 18), (40, 26), (64, 54), (64, 40)])
def test_half_precision_pair_counts_past_the_vector_width(patch, dtype, layout, head_dim, rotary_dim):
    """9, 13, 27 and 20 pairs per row: whole vectors of pairs (eight at a time for float16's conversions) and
    the rest one by one, in both pairings, with a pass-through tail, in place and out of place."""
    cos, sin = flexrope.precompute_rope_params(head_dim, context_length=64, rotary_dim=rotary_dim)
    x = torch.randn(2, 5, 11, head_dim).to(dtype)
    for interleaved in (False, True):
        kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, offset=7)
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        y = x.clone()
        compute_rope(y, cos, sin, layout, inplace=True, **kwargs)
        assert torch.equal(fast, slow) and torch.equal(y, slow)


@pytest.mark.parametrize("shape, layout", [((1, 1, 37, 8), "b h s d"), ((5, 1, 3, 8), "b s h d"), ((1, 1, 1, 8),
                                                                                                 "b h s d")])
def test_work_shared_among_more_threads_than_outer_rows(patch, shape, layout):
    """Fewer outer indices than threads: the threads share tiles of the innermost dim (and a single row)."""
    patch.setattr(_native, "THREADED_MIN_ELEMENTS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cos, sin = flexrope.precompute_rope_params(8, context_length=64)
        x = torch.randn(shape)
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, layout, offset=3))
        y = x.clone()
        compute_rope(y, cos, sin, layout, offset=3, inplace=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast, slow) and torch.equal(y, slow)


def test_the_cpu_default_is_the_native_loop_large_and_small(monkeypatch):
    monkeypatch.delenv("FLEXROPE_BACKEND", raising=False)
    calls = []
    original = _native.rotate
    monkeypatch.setattr(_native, "rotate", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    cos, sin = flexrope.precompute_rope_params(64, context_length=256)
    compute_rope(torch.randn(1, 2, 1, 64), cos, sin, offset=7)  # a decoding step
    compute_rope(torch.randn(1, 2, 1, 64), cos, sin, inplace=True)
    compute_rope(torch.randn(2, 8, 256, 64), cos, sin)
    assert calls == [(1, 2, 1, 64), (1, 2, 1, 64), (2, 8, 256, 64)]


def test_without_the_loop_small_calls_take_the_few_operation_path(monkeypatch):
    monkeypatch.delenv("FLEXROPE_BACKEND", raising=False)
    monkeypatch.setattr(_native, "unavailable", True)
    monkeypatch.setattr(_native, "rotate", lambda *a, **k: pytest.fail("the loop ran"))
    cos, sin = flexrope.precompute_rope_params(64, context_length=256)
    x = torch.randn(1, 2, 1, 64)
    want = compute_rope(x, cos, sin, offset=7)
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    assert torch.equal(want, compute_rope(x, cos, sin, offset=7))


def test_gradient_and_double_gradient_through_the_native_loop(patch):
    patch.setenv("FLEXROPE_BACKEND", "native")
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, dtype=torch.float64)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: compute_rope(t, cos, sin, "b s h d", offset=4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: compute_rope(t, cos, sin, "b s h d", offset=4), (x,))


def test_in_place_write_is_seen_by_autograd(patch):
    """The loop writes through a pointer; x's version still moves, so a tensor saved for backward that it
    overwrote is an error, as with the eager kernels."""
    patch.setenv("FLEXROPE_BACKEND", "native")
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    weight = torch.randn(1, 2, 5, 8, requires_grad=True)
    y = torch.randn(1, 2, 5, 8)
    saved = weight * y  # saves y for weight's gradient; y itself needs none
    compute_rope(y, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_no_compiler_turns_the_loop_off_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXROPE_BACKEND", "native")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "unavailable", False)
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    x = torch.randn(2, 3, 9, 8)
    with pytest.warns(RuntimeWarning, match="C loop for CPU calls could not be built") as caught:
        out = compute_rope(x, cos, sin, offset=2)
    assert caught[0].filename == __file__
    assert _native.unavailable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = compute_rope(x, cos, sin, offset=2)
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    assert torch.equal(out, compute_rope(x, cos, sin, offset=2)) and torch.equal(again, out)


def test_built_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _native._build()
    (built,) = (tmp_path / "flexrope").glob("loop-*.so")
    stamp = built.stat().st_mtime_ns
    _native._build()
    assert [p.name for p in (tmp_path / "flexrope").iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


def test_an_unusable_cache_directory_builds_in_the_temporary_directory(monkeypatch, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_directory))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert _native._cache() == tmp_path / "tmp" / f"flexrope-{os.getuid()}"
    _native._build()
    assert list((tmp_path / "tmp" / f"flexrope-{os.getuid()}").glob("loop-*.so"))


@pytest.mark.parametrize("variant", [[], ["-mno-f16c"]])
def test_baseline_builds_equal_eager_bitwise(monkeypatch, tmp_path, variant):
    """The loop as compilers without -march=native build it (nor OpenMP), and float16 without the CPU's
    conversion instructions (F16C, which -march=native turns on where the CPU has them): on the bits."""
    if variant and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("F16C is an x86 extension")
    monkeypatch.setattr(_native, "VARIANTS", (["-march=native", *variant],) if variant else ([],))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name, value in (("_library", None), ("_plans", {}), ("library_path", _native.library_path)):
        monkeypatch.setattr(_native, name, value)  # the process's own loop again after the test
    cos, sin = flexrope.precompute_rope_params(64, context_length=64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for layout, shape in (("b h s d", (2, 5, 40, 64)), ("b s h d", (2, 40, 5, 64))):
            x = torch.randn(shape).to(dtype)
            for interleaved in (False, True):
                for where in (dict(offset=3), dict(positions=torch.randint(0, 64, (2, 40)))):
                    kwargs = dict(interleaved=interleaved, **where)
                    monkeypatch.setenv("FLEXROPE_BACKEND", "native")
                    fast = compute_rope(x, cos, sin, layout, **kwargs)
                    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
                    assert torch.equal(fast, compute_rope(x, cos, sin, layout, **kwargs))
    assert _native.library_path.parent == tmp_path / "flexrope"  # built with the variant, and ran


@pytest.mark.parametrize("theta, rotary_dim, first", [(10_000.0, 128, 0), (500_000.0, 128, 1_000_000),
                                                      (3.7e6, 64, 123_456_789)])
def test_tables_of_a_range_of_positions_are_the_tensor_operations_bits(monkeypatch, theta, rotary_dim, first):
    """The library's float64 cos and sin (dynamic NTK's rows at each step) against torch's, both rounded once to
    float32: bitwise (the libraries' float64 results differ by at most an ulp, which float32 rounding hides)."""
    inv_freq = theta ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    positions = range(first, first + 20_000)
    cos, sin = _native.tables(inv_freq, positions)
    angles = torch.arange(positions.start, positions.stop, dtype=torch.float64)[:, None] * inv_freq
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())
    # tables_at, which dynamic NTK calls, takes them from the library on the CPU in float32
    from flexrope._tables import tables_at

    calls = []
    monkeypatch.setattr(_native, "tables", lambda *args, real=_native.tables: calls.append(args) or real(*args))
    one = tables_at(inv_freq, range(first + 7, first + 8), dtype=torch.float32, device=torch.device("cpu"))
    assert len(calls) == 1 and torch.equal(one[0], cos[7:8]) and torch.equal(one[1], sin[7:8])


def test_positions_read_through_their_strides_in_any_integer_dtype(patch):
    """Positions (b, s) that are a transposed view, every other element of row starts, int32 and uint8: the loop
    reads each through its strides (or an int64 copy), as the eager kernels index them."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)
    x = torch.randn(3, 4, 9, 16)
    generator = torch.Generator().manual_seed(0)
    wheres = [dict(positions=torch.randint(0, 64, (9, 3), generator=generator).t()),
              dict(positions=torch.randint(0, 64, (9,), generator=generator).to(torch.int32)),
              dict(positions=torch.randint(0, 64, (3, 9), generator=generator).to(torch.uint8)),
              dict(offset=torch.tensor([0, 99, 20, 99, 40])[::2])]
    for where in wheres:
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, **where))
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("backend", ["native", "eager", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_empty_tensors(monkeypatch, backend, dtype):
    """A batch, heads or tokens of length 0: out of place a new tensor of x's dtype, device and strides
    (x's memory format, as for any dense x) with x untouched; in place x itself; gradients of x's shape and
    dtype. Through the C loop, the eager kernels and the few-operation path for small calls."""
    monkeypatch.setenv("FLEXROPE_BACKEND", "native" if backend == "native" else "eager")
    if backend == "eager":
        monkeypatch.setattr(flexrope._eager, "SMALL_ELEMENTS", -1)
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, rotary_dim=6)
    for shape in [(0, 2, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)]:
        for x, layout in ((torch.randn(shape).to(dtype), "b h s d"),
                          (torch.randn(shape).to(dtype).transpose(1, 2), "b s h d"),  # heads outermost in memory
                          (torch.randn(shape).to(dtype).permute(2, 0, 1, 3), "s b h d")):
            batch = x.shape[layout.split().index("b")]
            for where in (dict(offset=3), dict(offset=torch.arange(batch))):
                version = x._version
                out = compute_rope(x, cos, sin, layout, rotary_dim=6, **where)
                assert out is not x and out.shape == x.shape and out.dtype == dtype and out.device == x.device
                assert out.stride() == x.stride() and x._version == version
                assert compute_rope(x, cos, sin, layout, rotary_dim=6, inplace=True, **where) is x
            grad_x = x.detach().requires_grad_()
            out = compute_rope(grad_x, cos, sin, layout, rotary_dim=6, offset=1)
            assert out.requires_grad and out.shape == x.shape
            (grad,) = torch.autograd.grad(out, grad_x, torch.ones_like(out))
            assert grad.shape == x.shape and grad.dtype == dtype


def _half_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("pairs", [1, 16])  # one pair per token: element by element; 16: eight at a time (F16C)
def test_float16_conversions_are_torchs_on_every_half_and_at_every_rounding_boundary(patch, pairs):
    """Every one of the 65536 halves read, and float32 results rounded to half at each midpoint between
    halves, one float ulp either side, past the largest half, in the subnormals, NaN payloads, all as torch's
    own conversions give them."""
    patch.setenv("FLEXROPE_BACKEND", "native")
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    # read: the angle 0 (cos 1, sin 0) gives (a * 1 - b * 0, b * 1 + a * 0) in float32: with b = 0, the
    # first channel of each pair is a as the loop read it (a NaN quietened, as torch's float32 of it is)
    x = torch.cat([every.view(-1, pairs), torch.zeros(every.numel() // pairs, pairs, dtype=torch.float16)], dim=-1)
    ones, zeros = torch.ones(x.shape[0], pairs), torch.zeros(x.shape[0], pairs)
    first = compute_rope(x[None, None], ones, zeros, rotary_dim=2 * pairs)[0, 0, :, :pairs].reshape(-1)
    assert torch.equal(_half_bits(first), _half_bits(every.float().to(torch.float16)))
    # written: x = 1 and cos = v, sin = 0 give (v - 0, v + 0) in float32 (-0.0 + 0 is 0), rounded to half
    finite = every.float()[every.isfinite()].unique()
    midpoints = ((finite[:-1].double() + finite[1:].double()) / 2).float()
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    values = torch.cat([finite, midpoints, midpoints.nextafter(up), midpoints.nextafter(down),
                        torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 16,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.int32).view(torch.float32),  # NaN payloads among them
                        torch.tensor([65519.99, 65520.0, 1e10, float("inf"), float("nan"), 2.0**-25, 1e-45, -0.0])])
    values = torch.cat([values, torch.zeros(-values.numel() % pairs)]).view(-1, pairs)
    x = torch.ones(1, 1, values.shape[0], 2 * pairs, dtype=torch.float16)
    out = compute_rope(x, values, torch.zeros_like(values), rotary_dim=2 * pairs)[0, 0]
    zero = torch.zeros_like(values)
    assert torch.equal(_half_bits(out[:, :pairs]), _half_bits((values - zero).to(torch.float16)))
    assert torch.equal(_half_bits(out[:, pairs:]), _half_bits((values + zero).to(torch.float16)))


def _same_bfloat16(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same bits, except that a NaN may be any NaN (torch's own conversion writes 0x7fc0 on one code path
    and 0xffff on another)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("interleaved", [False, True])  # side by side, the loop reads a pair as one 32-bit word
def test_bfloat16_pairs_read_and_rounded_as_torch_in_both_pairings(patch, interleaved):
    """Every one of the 65536 bfloat16 values as the first and as the second channel of a pair (with every
    other value as its partner, at random angles), and float32 results rounded to bfloat16 at each midpoint,
    one float ulp either side, past the largest, among the subnormals and NaN payloads: float32 products and
    sums rounded once to bfloat16, as torch computes them."""
    patch.setenv("FLEXROPE_BACKEND", "native")
    pairs, generator = 16, torch.Generator().manual_seed(0)

    def rotated(a, b, cos, sin):  # pairs (a, b) of rows of 16 pairs each
        x = torch.stack([a, b], -1).flatten(-2) if interleaved else torch.cat([a, b], -1)
        out = compute_rope(x[None, None], cos, sin, rotary_dim=2 * pairs, interleaved=interleaved)[0, 0]
        return (out[:, 0::2], out[:, 1::2]) if interleaved else (out[:, :pairs], out[:, pairs:])

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    a, b = every.view(-1, pairs), every[torch.randperm(every.numel(), generator=generator)].view(-1, pairs)
    cos, sin = torch.rand(2, *a.shape, generator=generator) * 2 - 1
    first, second = rotated(a, b, cos, sin)
    assert _same_bfloat16(first, (a.float() * cos - b.float() * sin).bfloat16())
    assert _same_bfloat16(second, (b.float() * cos + a.float() * sin).bfloat16())
    first, second = rotated(b, a, cos, sin)
    assert _same_bfloat16(second, (a.float() * cos + b.float() * sin).bfloat16())
    # written: x = 1, cos = v and sin = 0 give (v - 0, v + 0) in float32, rounded to bfloat16
    finite = every.float()[every.isfinite()].unique()
    midpoints = ((finite[:-1].double() + finite[1:].double()) / 2).float()
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    values = torch.cat([finite, midpoints, midpoints.nextafter(up), midpoints.nextafter(down),
                        torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 16,), generator=generator,
                                      dtype=torch.int32).view(torch.float32),  # NaN payloads among them
                        torch.tensor([3.3961e38, 3.4e38, 1e39, float("inf"), float("nan"), 1e-45, -0.0])])
    values = torch.cat([values, torch.zeros(-values.numel() % pairs)]).view(-1, pairs)
    ones, zero = torch.ones(values.shape, dtype=torch.bfloat16), torch.zeros_like(values)
    first, second = rotated(ones, ones, values, zero)
    assert _same_bfloat16(first, (values - zero).bfloat16()) and _same_bfloat16(second, (values + zero).bfloat16())


@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_views_and_expanded_inputs(patch, interleaved):
    """Channels contiguous, everything else strided: a slice of a wider head dim, every other token, a
    transposed batch, an expanded batch (out of place). In place, the elements outside the view stay as they
    were."""
    cos, sin = flexrope.precompute_rope_params(8, context_length=64)
    base = torch.randn(3, 20, 5, 12)
    cuts = [lambda t: t[:, 1::2, :, 2:10], lambda t: t.transpose(0, 2)[..., :8]]
    kwargs = dict(interleaved=interleaved, offset=4)
    expanded = base[:1, :9, :, :8].expand(4, 9, 5, 8)
    fast, slow = _both(patch, lambda: compute_rope(expanded, cos, sin, "b s h d", **kwargs))
    assert torch.equal(fast, slow)
    for cut in cuts:
        fast, slow = _both(patch, lambda: compute_rope(cut(base), cos, sin, "b s h d", **kwargs))
        assert torch.equal(fast, slow)
        whole = base.clone()
        compute_rope(cut(whole), cos, sin, "b s h d", inplace=True, **kwargs)
        assert torch.equal(cut(whole), slow)
        outside = torch.ones_like(whole, dtype=torch.bool)
        cut(outside).fill_(False)
        assert torch.equal(whole[outside], base[outside])


def test_in_place_inside_inference_mode(patch):
    """Inference tensors have no version counter to move: the loop's in-place call still works there."""
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    with torch.inference_mode():
        x = torch.randn(2, 3, 5, 8)
        fast, slow = _both(patch, lambda: compute_rope(x.clone(), cos, sin, offset=1, inplace=True))
    assert torch.equal(fast, slow)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _wheres(b, s, context):
    """An int start, row starts (every other element of a tensor), positions (s,) and (b, s), and inverse."""
    generator = torch.Generator().manual_seed(1)
    return (dict(offset=3), dict(offset=(torch.arange(2 * b) * 3)[::2]),
            dict(positions=torch.randint(0, context - 1, (s,), generator=generator)),
            dict(positions=torch.randint(0, context - 1, (b, s), generator=generator)), dict(offset=5, inverse=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout, heads", [("b h s d", 6), ("b h s d", 4), ("b h s d", 2), ("b s h d", 6)])
@pytest.mark.parametrize("tiles", ["whole", "short", "threads"])
def test_non_dense_input_written_into_a_dense_output_by_its_own_strides(patch, dtype, interleaved, layout, heads,
                                                                        tiles):
    """Out of place on a view that is not dense (a window of a wider head dim, every other token, every other
    head): the result is a fresh dense tensor whose strides are not x's, and each row of it, grouped (4 or more
    heads of "b h s d" share their angles, with or without a remainder) or not, and its pass-through channels
    land by out's strides; with the tokens walked whole, in short tiles (8 and 1), or shared among 8 threads
    (tiles that start past the first token)."""
    patch.setattr(_native, "_plans", {})
    if tiles == "short":
        patch.setattr(_native, "TABLE_TILE_BYTES", 1)
    if tiles == "threads":
        patch.setattr(_native, "THREADED_MIN_ELEMENTS", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(8)  # more than the 4 outer rows: tiles of 2 tokens
        try:
            return test_non_dense_input_written_into_a_dense_output_by_its_own_strides(patch, dtype, interleaved,
                                                                                       layout, heads, "whole")
        finally:
            torch.set_num_threads(threads)
    d, rotary_dim, b, s = 16, 10, 2, 9
    cos, sin = flexrope.precompute_rope_params(d, context_length=32, rotary_dim=rotary_dim)
    shape = (b, 2 * heads, 2 * s + 1, d + 6) if layout == "b h s d" else (b, 2 * s + 1, 2 * heads, d + 6)
    base = torch.randn(shape).to(dtype)
    x = base[:, ::2, 1::2, 3:3 + d] if layout == "b h s d" else base[:, 1::2, ::2, 3:3 + d]
    before = base.clone()
    for where in _wheres(b, s, 32):
        kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, **where)
        fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        assert fast.is_contiguous() and fast.stride() != x.stride()
        assert torch.equal(fast, slow), (fast.float() - slow.float()).abs().max()
        assert torch.equal(fast[..., rotary_dim:], x[..., rotary_dim:])  # the tail, copied
        assert torch.equal(base, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_sin_strided_unlike_cos(patch, dtype, interleaved):
    """cos contiguous and sin a slice of a wider table, a transposed copy, or every other row of a longer one
    (and the other way round, and both strided alike): each table read by its own strides."""
    d, b, s = 16, 2, 7
    cos, sin = flexrope.precompute_rope_params(d, context_length=32)
    strided = (lambda t: torch.cat([t, torch.randn(32, 8)], dim=-1)[:, :d],  # a slice of a wider table
               lambda t: t.t().contiguous().t(),  # column-major
               lambda t: torch.stack([t, torch.randn_like(t)], dim=1).flatten(0, 1)[::2])  # every other row
    x = torch.randn(b, 4, s, d).to(dtype)
    for where in _wheres(b, s, 32):
        kwargs = dict(interleaved=interleaved, **where)
        want = _both(patch, lambda: compute_rope(x, cos, sin, **kwargs))[1]
        for view in strided:
            assert torch.equal(view(sin), sin) and view(sin).stride() != sin.stride()
            for tables in ((cos, view(sin)), (view(cos), sin), (view(cos), view(sin))):
                fast, slow = _both(patch, lambda: compute_rope(x, *tables, **kwargs))
                assert torch.equal(fast, slow) and torch.equal(fast, want)


def test_a_prepared_call_holds_what_it_points_into(patch):
    """A call prepared for the loop (q's, while k's is prepared) holds the plan's array and the tensors made for
    it: the cache of plans, full, may drop the plan before the call runs (it did, and the loop read freed memory)."""
    patch.setenv("FLEXROPE_BACKEND", "native")
    cos, sin = flexrope.precompute_rope_params(16, context_length=32)
    x = torch.randn(2, 3, 5, 16)
    expected = compute_rope(x, cos, sin, offset=2)
    out = torch.empty_like(x)
    call = _native.prepared(x, out, cos.double(), sin.double(), 2, rotary_dim=16, interleaved=False, inverse=False)
    _native._plans.clear()
    clutter = [torch.full((64,), -1, dtype=torch.int64) for _ in range(200)]  # the freed memory, written over
    _native.run([call])
    assert torch.equal(out, expected) and len(clutter) == 200
